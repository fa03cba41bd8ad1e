"""The daemon's own cost when nothing happens: CPU share and memory with N idle VMs.

Starts `corral serve` on a throw-away home, boots N tiny VMs (all jobs submitted at once, then waited for), lets
the host settle, then reads the daemon's CPU time (utime + stime of /proc/PID/stat, all its threads; QEMU runs
in its own processes and is not counted) over a window, and its RSS and PSS at the end. Goal (issue 17): <= 1 %
of one core and <= 80 MiB RSS with 30 idle VMs.

    python benchmarks/idle.py [--vms 30] [--memory 128M] [--window 60] [--settle 15] [--rounds 1]

With --rounds > 1 the window is measured that many times back to back (the same VMs) and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BenchDaemon, median, print_table

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss / 1024, pss / 1024


def boot_all(daemon: BenchDaemon, count: int, memory: str) -> float:
    """Boot ``count`` VMs at once and wait until every guest agent answered; the seconds it took."""
    from corral.client import Client

    started = time.monotonic()
    with Client(home=daemon.home) as corral:
        specs = [{"name": f"i-{uuid.uuid4().hex[:6]}", "image": "tiny", "memory": memory} for _ in range(count)]
        accepted = [corral.create_vm(spec, start=True, wait=True) for spec in specs]
        for answer in accepted:
            corral.wait_job(answer["job"]["id"], timeout=1800)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=30)
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of idle measured")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds to wait after the last boot")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    with BenchDaemon() as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        empty_rss = memory_mib(pid)[0]
        boot_seconds = boot_all(daemon, args.vms, args.memory)
        time.sleep(args.settle)  # the boots' last address refreshes and samples; nothing to wait on
        shares: list[float] = []
        for _ in range(args.rounds):
            cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
            time.sleep(args.window)
            shares.append((cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before) * 100)
        rss, pss = memory_mib(pid)
        print_table(
            f"Idle daemon with {args.vms} VMs of {args.memory} ({args.rounds} x {args.window:.0f} s windows)",
            ["what", "value", "goal"],
            [
                ["CPU, % of one core (median)", f"{median(shares):.2f}", "<= 1.0"],
                ["RSS, MiB", f"{rss:.1f}", "<= 80"],
                ["PSS, MiB", f"{pss:.1f}", ""],
                ["RSS with no VM, MiB", f"{empty_rss:.1f}", ""],
                [f"boot of all {args.vms}, s", f"{boot_seconds:.1f}", ""],
            ],
        )
        figures = {
            "vms": args.vms,
            "cpu_percent": round(median(shares), 3),
            "cpu_percent_rounds": [round(s, 3) for s in shares],
            "rss_mib": round(rss, 1),
            "pss_mib": round(pss, 1),
            "rss_empty_mib": round(empty_rss, 1),
            "boot_seconds": round(boot_seconds, 1),
        }
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
