"""Replication: bytes and time per incremental copy against the data the guest changed (docs/ha.md).

A pool of corral.localpool on a PostgreSQL server of its own: a control plane, hosts h1 and h2 with their own
storage pools, one tiny VM on h1 replicated to h2. The first copy is full; then, for each size (``--sizes``, MiB),
the guest writes that much fresh random data through its guest agent (``dd ... conv=fsync``) and one copy is
taken. Measured per copy: the bytes the partner received (the layer's allocated size, qcow2 metadata included),
the time from the copy's instant to the replica having applied it, and the time of the whole `vm replicate`
command (both jobs' hand-offs through the store included).

    sudo python benchmarks/replication.py [--sizes 0,1,4,16,32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table

from corral.localpool import LocalPool
from corral.store.db import Store
from corral.store.pgserver import PgServer

MIB = 1 << 20


def copy(pool: LocalPool) -> dict[str, float]:
    """One copy now; its bytes, its apply time and the command's wall time."""
    started = time.monotonic()
    answer = json.loads(pool.cli("vm", "replicate", "bv", "--to", "h2", "--json", timeout=600).stdout)
    wall = time.monotonic() - started
    replica = answer["replica"]
    return {
        "kind": replica["last_kind"],
        "bytes": replica["last_bytes"],
        "apply_s": replica["last_seconds"],
        "wall_s": wall,
        "frozen": replica["last_consistent"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,1,4,16,32", help="MiB the guest writes before each copy")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        sys.exit("error: the pool's hosts are network namespaces (hint: run it as root)")
    images = Path(tempfile.mkdtemp(prefix="br-img-", dir="/tmp"))
    pool = LocalPool("", prefix="br", settings={"CORRAL_ACCEL": "tcg"})
    server: PgServer | None = None
    full: dict[str, object] = {}
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    try:
        pool.network()
        server = PgServer()
        server.start()
        name = f"br_{uuid.uuid4().hex[:8]}"
        server.create_database(name)
        pool.url = f"postgresql+psycopg://corral@/{name}?host={server.root}&port={server.port}"
        store = Store(pool.url)
        store.migrate()
        store.close()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", images=images)
        pool.wait_online(["h1", "h2"])
        pool.cli("image", "build", "tiny", timeout=1800)
        pool.cli("vm", "run", "bv", "--host", "h1", "--memory", "256M", timeout=400)
        first = json.loads(
            pool.cli("vm", "replicate", "bv", "--to", "h2", "--every", "1d", "--json", timeout=600).stdout
        )["replica"]  # full; a day's period keeps the scheduler out of the measurements
        full = {"kind": first["last_kind"], "bytes": first["last_bytes"], "apply_s": first["last_seconds"]}
        for _ in range(args.repeat):
            for size in sizes:
                if size:
                    script = f"dd if=/dev/urandom of=/root/bench bs=1M count={size} conv=fsync 2>/dev/null; sync"
                    pool.cli("vm", "exec", "bv", "--timeout", "300", "--", "/bin/sh", "-c", script, timeout=400)
                result = copy(pool)
                runs[size].append(result)
                print(f"{size} MiB: {json.dumps(result)}", file=sys.stderr, flush=True)
    finally:
        pool.close()
        if server is not None:
            server.stop()
        shutil.rmtree(images, ignore_errors=True)
    rows = []
    summary = []
    for size, results in runs.items():
        if not results:
            continue
        sent = statistics.median(r["bytes"] for r in results)
        apply_s = statistics.median(r["apply_s"] for r in results)
        wall = statistics.median(r["wall_s"] for r in results)
        rows.append(
            [
                size,
                len(results),
                f"{sent / MIB:.2f}",
                f"{sent / max(size * MIB, 1):.2f}" if size else "-",
                f"{apply_s:.2f}",
                f"{wall:.2f}",
            ]
        )
        summary.append({"changed_mib": size, "n": len(results), "bytes": sent, "apply_s": apply_s, "wall_s": wall})
    print_table(
        "incremental copies (medians): data the guest wrote vs what went to the partner",
        ["CHANGED MiB", "N", "SENT MiB", "SENT/CHANGED", "INSTANT->APPLIED s", "COMMAND s"],
        rows,
    )
    print(f"\nfirst (full) copy: {full}")
    print(json.dumps({"benchmark": "replication", "full_copy": full, "incremental": summary}))


if __name__ == "__main__":
    main()
