"""Consolidation: plan 10,000 VMs of varied shapes on 1,000 unlike hosts through the real planner and store (SQLite),
no QEMU. Hosts are rows as agents register them; VMs are spread over every host first (as ``spread`` placement
leaves a pool), so there is much to consolidate.

Measured, as medians over ``--runs``: the plan's time (loading the pool and its history from the store, the
heuristic; goal <= 10 s), hosts freed, the gap to the optimum or to HiGHS's bound (goal <= 5 %) and migrations per
freed host. On a smaller pool (``--small-hosts``) the assignment MILP itself finishes, and the gap is to the
optimum. The last line is a JSON summary.

    python benchmarks/consolidation.py [--hosts 1000] [--vms 10000] [--runs 3] [--small-hosts 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table
from sqlalchemy import insert

from corral.cluster import packing_bound, planner, plans
from corral.store.db import Store
from corral.store.models import VM, Host, new_id, utcnow

GIB = 1 << 30
HOST_SHAPES = [(16, 64), (32, 128), (48, 192), (64, 256)]  # CPUs, GiB
VM_SHAPES = [(1, 1), (1, 2), (2, 2), (2, 4), (4, 8), (4, 16), (8, 16), (8, 32)]


def build(directory: Path, hosts: int, vms: int, seed: int) -> Store:
    store = Store(f"sqlite:///{directory / f'bench-{hosts}.db'}")
    store.migrate()
    rng = random.Random(seed)
    now = utcnow()
    host_rows = []
    for index in range(hosts):
        cpus, memory = HOST_SHAPES[index % len(HOST_SHAPES)]
        host_rows.append(
            {
                "id": new_id(),
                "name": f"h{index:04d}",
                "state": "online",
                "cpus": cpus,
                "memory": memory * GIB,
                "reserved_memory": 0,
                "cpu_overcommit": 4.0,
                "memory_overcommit": 1.0,
                "storage_total": 4096 * GIB,
                "storage_free": 4096 * GIB,
                "storage_overcommit": 4.0,
                "accel": "kvm",
                "qemu_version": "7.2.0",
                "drained": False,
                "standby": False,
                "usage": {},
                "heartbeat_at": now,
                "created_at": now,
            }
        )
    vm_rows = []
    for index in range(vms):
        cpus, memory = rng.choice(VM_SHAPES)
        host = host_rows[index % hosts]["name"]
        vm_rows.append(
            {
                "id": new_id(),
                "name": f"vm{index:05d}",
                "project": "default",
                "host": host,
                "spec": {"name": f"vm{index:05d}", "image": "tiny", "cpus": cpus, "memory": memory * GIB},
                "desired_state": "running",
                "observed_state": "running",
                "status_message": "",
                "ready": True,
                "interfaces": [],
                "restart_count": 0,
                "ports": {},
                "stats": {},
                "created_at": now,
                "updated_at": now,
            }
        )
    with store.session() as session:
        session.execute(insert(Host), host_rows)
        session.execute(insert(VM), vm_rows)
    return store


def plan_once(store: Store, solver_time_limit: float) -> dict[str, float]:
    with store.session() as session:
        started = time.perf_counter()
        view, guests = plans.load(session)
        loaded = time.perf_counter() - started
        result = planner.consolidate(view, guests)
        seconds = time.perf_counter() - started
    packing_bound.exact(view, guests, result, True, solver_time_limit)
    return {
        "load": loaded,
        "seconds": seconds,
        "hosts_before": result.hosts_before,
        "hosts_used": result.hosts_used,
        "freed": len(result.freed),
        "moves": len(result.moves),
        "optimum": result.optimum_hosts_used,
        "bound": result.bound_hosts_used,
        "gap": result.gap,
        "solver": result.solver,
        "solver_seconds": result.solver_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small-hosts", type=int, default=20)
    parser.add_argument("--solver-time-limit", type=float, default=10.0)
    args = parser.parse_args()
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="corral-consolidation-") as tmp:
        for hosts, vms in ((args.small_hosts, args.small_hosts * 10), (args.hosts, args.vms)):
            store = build(Path(tmp), hosts, vms, seed=hosts)
            runs = [plan_once(store, args.solver_time_limit) for _ in range(args.runs)]
            store.close()
            last = runs[-1]
            median = statistics.median(run["seconds"] for run in runs)
            reference = last["optimum"] if last["optimum"] is not None else last["bound"]
            rows.append(
                [
                    hosts,
                    vms,
                    f"{statistics.median(r['load'] for r in runs):.2f}",
                    f"{median:.2f}",
                    f"{last['hosts_before']} -> {last['hosts_used']}",
                    last["freed"],
                    last["moves"],
                    f"{last['moves'] / last['freed']:.1f}" if last["freed"] else "-",
                    f"{'optimum' if last['optimum'] is not None else 'bound'} {reference}",
                    "-" if last["gap"] is None else f"{last['gap']:.1%}",
                    f"{last['solver_seconds']:.2f}",
                ]
            )
            summary = {
                "hosts": hosts,
                "vms": vms,
                "seconds": round(median, 3),
                "hosts_used": last["hosts_used"],
                "hosts_freed": last["freed"],
                "moves": last["moves"],
                "gap": last["gap"],
                "moves_per_freed_host": round(last["moves"] / last["freed"], 2) if last["freed"] else None,
            }
            summary["optimum_hosts_used" if last["optimum"] is not None else "bound_hosts_used"] = reference
    print_table(
        "consolidation plan (N+1 kept; CPU overcommit 4, memory 1)",
        ["HOSTS", "VMS", "LOAD S", "PLAN S", "AWAKE", "FREED", "MOVES", "MOVES/FREED", "REFERENCE", "GAP", "SOLVER S"],
        rows,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
