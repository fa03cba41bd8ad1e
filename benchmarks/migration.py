"""Live migration: total time and guest downtime for idle and memory-dirtying guests, shared and storage moves.

One guest per (memory size, load) is booted once and moved back and forth between run directories of this host
(TCP over loopback, multifd, default tuning): shared-storage moves open the same disk, storage moves mirror the
disk over NBD into a fresh blank image each time. Every move is checked: the serial counter must continue, the
memory-dirtying loop must keep finding its copies intact, the kernel log must stay clean, and at the end the
loop's data and seed must match the checksums taken before the first move.

    python benchmarks/migration.py [--runs 3] [--sizes 256,1024] [--postcopy fallback]

Goal: downtime <= 50 ms for idle and busy guests, and no guest ever corrupted. Figures are medians on a shared
2-core host: noisy, compare orders of magnitude rather than single milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from _common import median, print_table  # noqa: E402
from tests.integration.migration_lab import (  # noqa: E402
    COUNTER,
    Lab,
    SerialWatch,
    kernel_trouble,
    max_tick_gap,
    start_busy,
    stop_busy_and_verify,
)

from corral.engine.live_migration import MigrationTuning, migrate  # noqa: E402
from corral.images.tiny import build_tiny_image  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _series(lab: Lab, memory_mib: int, busy: bool, runs: int, tuning: MigrationTuning) -> list[dict[str, Any]]:
    """Boot one guest and move it ``runs`` times with shared storage and ``runs`` times with storage copy."""
    name = f"m{memory_mib}{'b' if busy else 'i'}"
    guest = await lab.boot(name, memory_mib)
    watch = SerialWatch(guest.plan.serial_log).start()
    await guest.background(COUNTER)
    await watch.wait_for("tick 3", 30)
    if busy:
        await start_busy(guest, watch, size_mib=64 if memory_mib <= 256 else 256)
        await asyncio.sleep(2.0)
    rows = []
    for hop, mode in enumerate(["shared", "storage"] * runs, start=1):
        disk = None
        storage: list[str] = []
        if mode == "storage":
            disk = lab.blank_like(guest.plan.disks[0].path, f"{name}-disk{hop}")
            storage = ["disk0"]
        plan, destination = await lab.destination(guest, disk=disk, suffix=f"h{hop}")
        after = SerialWatch(plan.serial_log).start()
        started = time.monotonic()
        result = await migrate(
            guest.proc, destination, tuning=tuning, storage_nodes=storage, nbd_port=_free_port() if storage else None
        )
        elapsed = time.monotonic() - started
        lab.moved(guest, plan, destination)
        await after.wait_for("tick", 30)
        if busy:
            await after.wait_for(" ok", 120)  # a copy written across the move was checked
        await asyncio.sleep(0.3)
        await watch.stop()
        gap, last, first = max_tick_gap(watch.ticks(), after.ticks())
        trouble = kernel_trouble(watch.text() + "\n" + after.text())
        healthy = first == last + 1 and not trouble
        if trouble:
            print(f"  !! {name} hop {hop}: {trouble[:3]}", file=sys.stderr)
        rows.append(
            {
                "memory": memory_mib,
                "load": "busy" if busy else "idle",
                "mode": mode,
                "total": elapsed,
                "downtime": result.downtime_ms,
                "paused": result.paused_ms,
                "gap": gap * 1000,
                "postcopy": result.postcopy,
                "healthy": healthy,
                "disk_s": result.disk_s,
            }
        )
        print(
            f"  {name} {mode:7} total {elapsed:6.2f} s  downtime {result.downtime_ms} ms  "
            f"paused {result.paused_ms or 0:.1f} ms  counter gap {gap * 1000:.0f} ms  "
            f"{'postcopy ' if result.postcopy else ''}{'ok' if healthy else 'UNHEALTHY'}",
            flush=True,
        )
        watch = after
        for old in list(lab.procs):  # exited sources: drop their sessions
            if old.exited:
                lab.procs.remove(old)
    if busy:
        try:
            await stop_busy_and_verify(guest, watch)
        except AssertionError as exc:
            print(f"  !! {name}: {exc}", file=sys.stderr)
            rows[-1]["healthy"] = False
    await watch.stop()
    await guest.proc.quit()
    return rows


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    image_dir = Path(tempfile.mkdtemp(prefix="corral-bimg-", dir="/tmp"))
    image = build_tiny_image(image_dir, Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral")))
    tuning = MigrationTuning(postcopy=args.postcopy, tcg_safe=not args.tcg_live)
    rows: list[dict[str, Any]] = []
    lab = Lab(image)
    try:
        for memory_mib in args.sizes:
            for busy in (False, True):
                rows += await _series(lab, memory_mib, busy, args.runs, tuning)
    finally:
        await lab.close()
        shutil.rmtree(image_dir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="moves per mode and guest")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[256, 1024],
        help="guest memory sizes in MiB",
    )
    parser.add_argument("--postcopy", default="fallback", choices=["never", "fallback", "always"])
    parser.add_argument(
        "--tcg-live",
        action="store_true",
        help="copy live under TCG too (50 ms downtime limit): loses writes of busy guests here",
    )
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    table = []
    for memory_mib in args.sizes:
        for load in ("idle", "busy"):
            for mode in ("shared", "storage"):
                group = [r for r in rows if (r["memory"], r["load"], r["mode"]) == (memory_mib, load, mode)]
                if not group:
                    continue
                table.append(
                    [
                        f"{memory_mib} MiB",
                        load,
                        mode,
                        len(group),
                        f"{median([r['total'] for r in group]):.2f}",
                        f"{median([r['downtime'] or 0 for r in group]):.0f}",
                        f"{median([r['paused'] or 0 for r in group]):.0f}",
                        f"{max(r['downtime'] or 0 for r in group):.0f}",
                        f"{median([r['gap'] for r in group]):.0f}",
                        sum(r["postcopy"] for r in group),
                        "yes" if all(r["healthy"] for r in group) else "NO",
                    ]
                )
    print_table(
        "Live migration, loopback TCP, multifd (medians; goal: downtime <= 50 ms, no guest corrupted)",
        [
            "guest",
            "load",
            "storage",
            "moves",
            "total s",
            "downtime ms",
            "paused ms",
            "max downtime ms",
            "counter gap ms",
            "postcopy",
            "healthy",
        ],
        table,
    )
    print(
        "downtime: QEMU's query-migrate figure; paused: source STOP to destination RESUME (QMP event times);\n"
        "counter gap: largest gap between the guest's 100 ms serial ticks across the move, as the host saw them."
    )
    if not all(r["healthy"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
