"""Automatic ballooning after a load step: how long a host's memory use takes to come back under the target.

One daemon with a host memory budget (``balloon_host_memory``, docs/optimization.md: the guests' memory counts as
the host's use) and the default balloon settings (target 80 %, steps of 5 % of a VM's memory every 5 s). ``--vms``
tiny guests run under the target; then one more starts (the load step) and pushes use over it. Sampled every
second from the VMs' balloon sizes: use against the target over time, the time until it is back under the target
(goal <= 60 s, counted from the step), the peak, and how many balloon moves it took. The last line is a JSON
summary.

    python benchmarks/balloon.py [--vms 2] [--memory 256] [--budget 800] [--watch 90]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BenchDaemon, print_table

MiB = 1 << 20


def guest_memory(daemon: BenchDaemon, names: list[str]) -> dict[str, int]:
    """What each running guest has now (its balloon's size), as the agent last recorded it."""
    vms = {vm["name"]: vm for vm in daemon.client_call("vms")}  # type: ignore[union-attr]
    return {name: int(vms[name].get("memory_actual") or 0) for name in names if name in vms}


def balloon_moves(daemon: BenchDaemon) -> list[dict[str, object]]:
    from corral.client import Client

    with Client(home=daemon.home) as corral:
        return list(corral.events(types=["vm.balloon"], limit=10_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=2, help="guests running before the step")
    parser.add_argument("--memory", type=int, default=256, help="each guest's memory, MiB")
    parser.add_argument("--budget", type=int, default=800, help="the host memory budget, MiB")
    parser.add_argument("--watch", type=float, default=90.0, help="seconds to follow after the step")
    args = parser.parse_args()
    budget, target = args.budget * MiB, 0.8 * args.budget * MiB
    if (args.vms + 1) * args.memory * MiB <= target or args.vms * args.memory * MiB > target:
        parser.error("choose --vms, --memory and --budget so that the step, and only it, passes the target")
    tag = uuid.uuid4().hex[:4]
    names = [f"bl{tag}-{index}" for index in range(args.vms + 1)]
    with BenchDaemon({"CORRAL_BALLOON_HOST_MEMORY": str(budget)}) as daemon:
        for name in names[:-1]:
            daemon.cli("vm", "run", name, "--image", "tiny", "--memory", f"{args.memory}M")
        before = sum(guest_memory(daemon, names).values())
        step_at = time.monotonic()
        daemon.cli("vm", "run", names[-1], "--image", "tiny", "--memory", f"{args.memory}M", "--no-wait")
        samples: list[tuple[float, int]] = []
        back_under = None
        while time.monotonic() - step_at < args.watch:
            used = sum(guest_memory(daemon, names).values())
            elapsed = time.monotonic() - step_at
            samples.append((elapsed, used))
            over = used > target
            if over and back_under is not None:
                back_under = None  # it went over again: count from the last crossing
            if not over and back_under is None and any(u > target for _, u in samples):
                back_under = elapsed
            time.sleep(1.0)
        moves = balloon_moves(daemon)
        final = guest_memory(daemon, names)
    peak = max(used for _, used in samples)
    rows = [
        [f"{elapsed:5.1f}", f"{used // MiB}", f"{100 * used / budget:.0f} %", "over" if used > target else ""]
        for elapsed, used in samples[:: max(1, len(samples) // 30)]
    ]
    print_table(
        f"host memory use after the step (budget {args.budget} MiB, target {target / MiB:.0f} MiB)",
        ["SECONDS", "USED MIB", "OF BUDGET", ""],
        rows,
    )
    summary = {
        "vms_before": args.vms,
        "memory_mib": args.memory,
        "budget_mib": args.budget,
        "target_mib": round(target / MiB),
        "used_before_mib": before // MiB,
        "peak_mib": peak // MiB,
        "seconds_back_under_target": None if back_under is None else round(back_under, 1),
        "goal_seconds": 60,
        "balloon_moves": len(moves),
        "final_mib": {name: value // MiB for name, value in final.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
