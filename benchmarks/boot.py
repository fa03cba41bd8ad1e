"""Boot time: `corral vm run --wait` against the same QEMU command line run by hand, on the same tiny guest.

Runs are interleaved (corral, plain, corral, plain...) so all see the same machine load. corral's time is
the whole command, from the CLI's start to its return once the guest agent answers; plain QEMU's is from
process start to the guest's `corral-guest-ready` line on the serial console (printed after the guest agent
started). "Same argv" is the command line corral rendered for the first VM (its device set: 24 hot-plug root
ports, balloon, QMP, seccomp), with a fresh overlay disk and the serial console on a pipe: the ratio against it
is the cost of management, goal <= 1.05. "Minimal argv" is a hand-written command line with only the devices
the guest needs, to show what corral's device set costs.

    python benchmarks/boot.py [--runs 7] [--machines]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import READY_LINE, BenchDaemon, median, plain_qemu_boot, print_table


def corral_argv(daemon: BenchDaemon) -> list[str]:
    """The QEMU command line corral renders for `vm run --image tiny --memory 256M` (read from its run record)."""
    daemon.cli("vm", "run", "argv-probe", "--image", "tiny", "--memory", "256M", "--no-wait")
    try:
        records = list((daemon.home / "run").glob("*/runtime.json"))
        return list(json.loads(records[0].read_text())["argv"])
    finally:
        daemon.cli("vm", "delete", "argv-probe", "--force")


def same_argv_boot(argv: list[str], files: dict[str, Path]) -> float:
    """corral's own argv, by hand: paths moved to a scratch directory, a fresh overlay of the same image, the
    serial console on stdout (instead of a socket with a log file), no -runas (the scratch files are root's)."""
    work = Path(tempfile.mkdtemp(prefix="corral-p-", dir="/tmp"))
    disk = work / "root.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(files["rootfs"]), "-F", "qcow2", str(disk)], check=True
    )
    run_dir = next(Path(a.split("path=")[1].split(",")[0]).parent for a in argv if "id=qga0" in a)
    rendered: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "-runas":
            skip = True
            continue
        if "id=serial0" in arg:
            arg = "backend=stdio,id=serial0,signal=off"
        elif "node-name=disk0-file" in arg:
            arg = f"driver=file,filename={disk},node-name=disk0-file"
        rendered.append(arg.replace(str(run_dir), str(work)))
    started = time.monotonic()
    proc = subprocess.Popen(rendered, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buffer = b""
    try:
        assert proc.stdout is not None
        while READY_LINE not in buffer:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("QEMU with corral's argv exited before the guest was ready")
            buffer += chunk
        return time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


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
        argv = corral_argv(daemon)
        corral_times, plain_times, delete_times, cli_times, sdk_times = [], [], [], [], []
        minimal_times: list[float] = []
        corral_boot(daemon)  # warm caches once; not counted
        for _ in range(args.runs):
            booted, deleted = corral_boot(daemon)
            corral_times.append(booted)
            delete_times.append(deleted)
            plain_times.append(same_argv_boot(argv, files))
            minimal_times.append(plain_qemu_boot(files))
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
                "plain QEMU, same argv, to ready line",
                f"{median(plain_times):.3f}",
                f"{min(plain_times):.3f}",
                f"{max(plain_times):.3f}",
            ],
            [
                "plain QEMU, minimal argv, to ready line",
                f"{median(minimal_times):.3f}",
                f"{min(minimal_times):.3f}",
                f"{max(minimal_times):.3f}",
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
        sdk_ratio = median(sdk_times) / median(plain_times)
        devices = median(plain_times) / median(minimal_times)
        print(f"\nratio corral CLI / plain QEMU, same argv (medians): {ratio:.3f}  (goal <= 1.05)")
        print(f"ratio corral SDK / plain QEMU, same argv (medians): {sdk_ratio:.3f}")
        print(f"ratio same argv / minimal argv (corral's device set): {devices:.3f}")
        figures = {
            "runs": args.runs,
            "cli": median(corral_times),
            "sdk": median(sdk_times),
            "plain_same_argv": median(plain_times),
            "plain_minimal_argv": median(minimal_times),
            "delete": median(delete_times),
            "vm_list": median(cli_times),
            "ratio_cli": ratio,
            "ratio_sdk": sdk_ratio,
            "ratio_devices": devices,
        }
        print(json.dumps({key: round(value, 4) for key, value in figures.items()}))

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
