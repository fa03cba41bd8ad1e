"""Boot time: `corral vm run --wait` against plain qemu-system-x86_64 on the same tiny guest.

Runs are interleaved (corral, plain, corral, plain...) so both see the same machine load. corral's time is
the whole command, from the CLI's start to its return once the guest agent answers; plain QEMU's is from
process start to the guest's `corral-guest-ready` line on the serial console. The ratio is the cost of
management: goal <= 1.05.

    python benchmarks/boot.py [--runs 7] [--machines]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BenchDaemon, median, plain_qemu_boot, print_table


def corral_boot(daemon: BenchDaemon) -> tuple[float, float]:
    """(seconds for `vm run --wait`, seconds for `vm delete --force`)."""
    name = f"b-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    daemon.cli("vm", "run", name, "--image", "tiny", "--memory", "256M")
    booted = time.monotonic() - started
    started = time.monotonic()
    daemon.cli("vm", "delete", name, "--force")
    return booted, time.monotonic() - started


def sdk_boot(daemon: BenchDaemon) -> float:
    """The same boot through the Python SDK in this process: management cost without CLI start-up."""
    from corral.client import Client

    name = f"s-{uuid.uuid4().hex[:6]}"
    with Client(home=daemon.home) as corral:
        started = time.monotonic()
        corral.wait_job(corral.create_vm({"name": name, "image": "tiny"}, start=True, wait=True)["job"]["id"])
        booted = time.monotonic() - started
        corral.wait_job(corral.delete_vm(name, force=True)["job"]["id"])
    return booted


def cli_overhead(daemon: BenchDaemon) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "corral", "vm", "list"], env=daemon.env, capture_output=True, check=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--machines", action="store_true", help="also compare machine types with plain QEMU")
    args = parser.parse_args()

    with BenchDaemon() as daemon:
        files = daemon.image_files()
        corral_times, plain_times, delete_times, cli_times, sdk_times = [], [], [], [], []
        corral_boot(daemon)  # warm caches once; not counted
        for _ in range(args.runs):
            booted, deleted = corral_boot(daemon)
            corral_times.append(booted)
            delete_times.append(deleted)
            plain_times.append(plain_qemu_boot(files))
            sdk_times.append(sdk_boot(daemon))
            cli_times.append(cli_overhead(daemon))
        rows = [
            [
                "corral vm run --wait",
                f"{median(corral_times):.3f}",
                f"{min(corral_times):.3f}",
                f"{max(corral_times):.3f}",
            ],
            [
                "plain QEMU to ready line",
                f"{median(plain_times):.3f}",
                f"{min(plain_times):.3f}",
                f"{max(plain_times):.3f}",
            ],
            [
                "SDK create(start, wait) + job wait",
                f"{median(sdk_times):.3f}",
                f"{min(sdk_times):.3f}",
                f"{max(sdk_times):.3f}",
            ],
            [
                "corral vm delete --force",
                f"{median(delete_times):.3f}",
                f"{min(delete_times):.3f}",
                f"{max(delete_times):.3f}",
            ],
            [
                "corral vm list (CLI start-up + 1 call)",
                f"{median(cli_times):.3f}",
                f"{min(cli_times):.3f}",
                f"{max(cli_times):.3f}",
            ],
        ]
        print_table(
            f"Boot of the tiny guest under TCG, {args.runs} interleaved runs (seconds)",
            ["what", "median", "min", "max"],
            rows,
        )
        ratio = median(corral_times) / median(plain_times)
        print(f"\nratio corral CLI / plain QEMU (medians): {ratio:.3f}  (goal <= 1.05)")
        print(f"ratio corral SDK / plain QEMU (medians): {median(sdk_times) / median(plain_times):.3f}")

        if args.machines:
            times: dict[str, list[float]] = {"q35": [], "q35-hpet": [], "pc": []}
            for _ in range(args.runs):
                for machine in times:
                    times[machine].append(plain_qemu_boot(files, machine))
            print_table(
                "Plain QEMU boot to the ready line by machine type (seconds)",
                ["machine", "median", "min"],
                [[m, f"{median(t):.3f}", f"{min(t):.3f}"] for m, t in times.items()],
            )


if __name__ == "__main__":
    main()
