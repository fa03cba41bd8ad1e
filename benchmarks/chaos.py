"""Kill the daemon (SIGKILL) at random moments of random operations, restart it, and check that everything
converges: one QEMU or none per VM as desired, no QEMU without a VM, no volume without its file, no file without
its volume, no job left running. Prints a table of the rounds by operation and every violation seen.

    python benchmarks/chaos.py [--rounds 100] [--seed N] [--max-delay 2.5]
    python benchmarks/chaos.py --migrate [--rounds 10] [--seed N] [--max-delay 3]

``--migrate``: live migrations between two hosts of a pool (network namespaces, a throw-away PostgreSQL; needs
root), the source's or the destination's agent SIGKILLed at a random moment of each and started again
(tests.chaos_harness.MigrationChaos).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos_harness import Chaos
from tests.conftest import Daemon, new_home


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-delay", type=float, default=None, help="seconds (default 2.5; --migrate: 3, from the move's jobs)"
    )
    parser.add_argument("--migrate", action="store_true", help="live migrations on a two-host pool")
    options = parser.parse_args()
    if options.migrate:
        return migrate(options.rounds, options.seed, 3.0 if options.max_delay is None else options.max_delay)
    options.max_delay = 2.5 if options.max_delay is None else options.max_delay
    daemon = Daemon(new_home("corral-chaos-"))
    rounds = []
    try:
        daemon.start()
        daemon.cli("image", "build", "tiny", timeout=1800)
        chaos = Chaos(daemon, options.seed, options.max_delay)
        for index in range(options.rounds):
            outcome = chaos.run_round(index)
            rounds.append(outcome)
            mark = "ok" if not outcome.violations else "; ".join(outcome.violations)
            print(f"{index:4d} {outcome.operation:<13} {outcome.target:<10} kill at {outcome.delay:4.2f} s  "
                  f"settled in {outcome.settle_seconds:5.1f} s  {mark}", flush=True)  # fmt: skip
    finally:
        daemon.cleanup()
        shutil.rmtree(daemon.home, ignore_errors=True)
    by_operation: dict[str, list] = defaultdict(list)
    for outcome in rounds:
        by_operation[outcome.operation].append(outcome)
    print(f"\n{'operation':<14}{'rounds':>8}{'converged':>11}{'settle p50 (s)':>16}")
    for operation, items in sorted(by_operation.items()):
        converged = sum(1 for item in items if not item.violations)
        settle = statistics.median(item.settle_seconds for item in items)
        print(f"{operation:<14}{len(items):>8}{converged:>11}{settle:>16.1f}")
    bad = sum(1 for item in rounds if item.violations)
    print(f"\n{len(rounds)} rounds, {len(rounds) - bad} converged, {bad} with violations (seed {options.seed})")
    return 1 if bad else 0


def migrate(rounds: int, seed: int, max_delay: float) -> int:
    import uuid

    from tests.chaos_harness import MigrationChaos

    from corral.localpool import LocalPool
    from corral.store.db import Store
    from corral.store.pgserver import PgServer

    server = PgServer()
    server.start()
    name = f"chaos_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={server.root}&port={server.port}"
    images = new_home("cx-img-")
    pool = LocalPool(url, prefix="cx", make_home=lambda host: new_home(f"cx-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    store = Store(url)
    outcomes = []
    try:
        store.migrate()
        pool.network()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", images=images)
        pool.wait_online(["h1", "h2"])
        pool.cli("image", "build", "tiny", timeout=1800)
        chaos = MigrationChaos(pool, store, seed, max_delay=max_delay)
        for index in range(rounds):
            outcome = chaos.run_round(index)
            outcomes.append(outcome)
            mark = "ok" if not outcome.violations else "; ".join(outcome.violations)
            print(f"{index:4d} {outcome.source}->{outcome.dest} kill {outcome.victim} at {outcome.delay:4.2f} s "
                  f"(down {outcome.down:3.1f} s)  move {outcome.job_state} in {outcome.move_seconds or 0:4.1f} s, "
                  f"VM on {outcome.ended_on}  "
                  f"settled in {outcome.settle_seconds:5.1f} s  {mark}", flush=True)  # fmt: skip
    finally:
        pool.close()
        store.close()
        server.stop()
        shutil.rmtree(images, ignore_errors=True)
    print(f"\n{'victim':<14}{'rounds':>8}{'converged':>11}{'moved':>7}{'settle p50 (s)':>16}")
    for role in ("source", "destination"):
        items = [o for o in outcomes if (o.victim == o.source) == (role == "source")]
        if items:
            converged = sum(1 for o in items if not o.violations)
            settle = statistics.median(o.settle_seconds for o in items)
            print(f"{role:<14}{len(items):>8}{converged:>11}{sum(o.moved for o in items):>7}{settle:>16.1f}")
    bad = sum(1 for o in outcomes if o.violations)
    print(f"\n{len(outcomes)} rounds, {len(outcomes) - bad} converged, {bad} with violations (seed {seed})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
