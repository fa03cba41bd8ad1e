"""Scheduler: place 10,000 VMs on 1,000 simulated hosts through the real scheduler and store, on SQLite and on
PostgreSQL. No QEMU and no agent: hosts are rows as agents would register them (mixed sizes, fresh heartbeats).

Two paths are measured:
- **batch**: ``placement.place_many`` reads the pool once (three aggregate queries), places every VM through the
  filters and the weight heap, and the VM rows are written in the same transaction. Goal: <= 2 s per database.
- **one by one**: the API's own path (``cluster.vms.create``: validation, placement with the pool read and, on
  PostgreSQL, the host row lock, then the VM, volume and job rows), one transaction per VM, on the full pool.

Balance quality after the batch: the spread of host allocation (the largest of CPU, memory and storage fractions
in use) as its standard deviation, min and max; with ``spread`` they should sit close to the mean.

    python benchmarks/scheduler.py [--hosts 1000] [--vms 10000] [--single 200] [--strategy spread|pack]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table
from sqlalchemy import insert

from corral.cluster import placement, vms
from corral.cluster.requests import VMCreate
from corral.spec.vm import VMSpec
from corral.store.db import Store
from corral.store.models import VM, Host, Image, new_id, utcnow
from corral.store.pgserver import PgServer

GIB = 1 << 30


def make_hosts(store: Store, count: int, rng: random.Random) -> None:
    rows = []
    now = utcnow()
    for index in range(count):
        cpus = rng.choice([8, 16, 32, 64])
        rows.append(
            {
                "id": new_id(),
                "name": f"h{index:04d}",
                "state": "online",
                "cpus": cpus,
                "memory": rng.choice([16, 32, 64, 128]) * GIB,
                "storage_total": rng.choice([500, 1000, 2000]) * GIB,
                "storage_free": 400 * GIB,
                "accel": "tcg",
                "qemu_version": "7.2.22",
                "cpu_overcommit": 4.0,
                "memory_overcommit": 1.0,
                "storage_overcommit": 4.0,
                "reserved_memory": GIB,
                "drained": False,
                "usage": {},
                "heartbeat_at": now,
                "created_at": now,
            }
        )
    with store.session() as session:
        session.execute(insert(Host), rows)
        session.add(Image(name="tiny", state="ready", kind="kernel", virtual_size=GIB))


def vm_specs(count: int, rng: random.Random) -> list[VMSpec]:
    return [
        VMSpec(
            name=f"vm{index:05d}",
            image="tiny",
            cpus=rng.choice([1, 1, 2, 4]),
            memory=rng.choice([512 << 20, GIB, 2 * GIB, 4 * GIB]),
        )
        for index in range(count)
    ]


def place_batch(store: Store, specs: list[VMSpec], strategy: str) -> tuple[float, float, int]:
    """(seconds placing, seconds writing, VMs that found no host)."""
    requests = [placement.PlacementRequest.of(spec, storage=GIB) for spec in specs]
    with store.session() as session:
        started = time.perf_counter()
        chosen = placement.place_many(session, requests, strategy=strategy)
        placed = time.perf_counter()
        now = utcnow()
        rows = [
            {
                "id": new_id(),
                "name": spec.name,
                "project": "default",
                "spec": spec.model_dump(mode="json"),
                "host": host,
                "desired_state": "running",
                "observed_state": "stopped",
                "status_message": "",
                "ready": False,
                "interfaces": [],
                "restart_count": 0,
                "created_at": now,
                "updated_at": now,
                "ports": {},
                "stats": {},
            }
            for spec, host in zip(specs, chosen, strict=True)
            if host is not None
        ]
        session.execute(insert(VM), rows)
        session.flush()
    written = time.perf_counter()
    return placed - started, written - placed, chosen.count(None)


def balance(store: Store) -> dict[str, float]:
    with store.reading() as session:
        view = placement.load_pool(session)
    ratios = [load.utilisation() for load in view.values()]
    return {
        "mean": statistics.fmean(ratios),
        "stddev": statistics.pstdev(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "hosts_used": sum(1 for load in view.values() if load.vms),
    }


def one_by_one(store: Store, count: int, rng: random.Random, pool_dir: Path) -> float:
    """Seconds per create through the API's path, on the already full pool."""
    specs = vm_specs(count, rng)
    started = time.perf_counter()
    for spec in specs:
        spec = spec.model_copy(update={"name": "s" + spec.name})
        with store.session() as session:
            vms.create(session, VMCreate(spec=spec, start=True), pool_dir)
    return (time.perf_counter() - started) / count


def run(backend: str, url: str, args: argparse.Namespace, pool_dir: Path) -> list[Any]:
    rng = random.Random(42)
    store = Store(url)
    store.migrate()
    try:
        make_hosts(store, args.hosts, rng)
        specs = vm_specs(args.vms, rng)
        place_s, write_s, unplaced = place_batch(store, specs, args.strategy)
        quality = balance(store)
        per_create = one_by_one(store, args.single, rng, pool_dir) if args.single else float("nan")
    finally:
        store.close()
    total = place_s + write_s
    return [
        backend,
        args.hosts,
        args.vms,
        f"{place_s:.2f}",
        f"{write_s:.2f}",
        f"{total:.2f}",
        "yes" if total <= 2.0 else "NO",
        unplaced,
        f"{quality['mean']:.3f}",
        f"{quality['stddev']:.4f}",
        f"{quality['min']:.3f}-{quality['max']:.3f}",
        quality["hosts_used"],
        f"{per_create * 1000:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--single", type=int, default=200, help="VMs created one by one afterwards (0: skip)")
    parser.add_argument("--strategy", choices=["spread", "pack"], default="spread")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        pool_dir = Path(tmp) / "pool"
        pool_dir.mkdir()
        rows.append(run("sqlite", f"sqlite:///{tmp}/bench.db", args, pool_dir))
        with PgServer() as pg:
            rows.append(run("postgresql", pg.create_database("bench"), args, pool_dir))
    print_table(
        f"Placement of {args.vms} VMs on {args.hosts} hosts ({args.strategy}); goal: batch total <= 2 s",
        [
            "STORE",
            "HOSTS",
            "VMS",
            "PLACE S",
            "WRITE S",
            "TOTAL S",
            "GOAL",
            "UNPLACED",
            "ALLOC MEAN",
            "STDDEV",
            "MIN-MAX",
            "HOSTS USED",
            "MS/CREATE (1 BY 1)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
