"""The daemon SIGKILLed at random moments of random operations (create/start, stop, start, snapshot, clone,
backup, delete), 20 times: after each restart every VM converges to its desired state with one QEMU or none,
no QEMU belongs to no VM, no volume lacks its file, no disk file lacks its volume, no job is left running.
Then live migrations on a pool of two hosts (network namespaces, PostgreSQL), the source's or the destination's
agent SIGKILLed at a random moment of each: the same invariants across both hosts.
benchmarks/chaos.py runs the same rounds a hundred times and more."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.chaos_harness import Chaos, MigrationChaos
from tests.conftest import new_home, require

pytestmark = pytest.mark.integration
ROUNDS = int(os.environ.get("CORRAL_CHAOS_ROUNDS", "20"))
MIGRATION_ROUNDS = int(os.environ.get("CORRAL_MIGRATION_CHAOS_ROUNDS", "4"))


def test_the_daemon_killed_at_random_points_always_converges(fresh_daemon):
    corral = fresh_daemon()
    corral.start()
    corral.cli("image", "build", "tiny", timeout=1800)
    chaos = Chaos(corral, seed=int(os.environ.get("CORRAL_CHAOS_SEED", "7")))
    failures = []
    for index in range(ROUNDS):
        outcome = chaos.run_round(index)
        if outcome.violations:
            failures.append(f"round {index} ({outcome.operation} {outcome.target}, killed after "
                            f"{outcome.delay:.2f} s): {'; '.join(outcome.violations)}")  # fmt: skip
    assert not failures, "\n".join(failures)


def test_an_agent_killed_during_a_live_migration_always_converges(postgres, qemu_available):
    from corral.localpool import LocalPool
    from corral.store.db import Store

    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"chaos_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={postgres.root}&port={postgres.port}"
    images = Path(new_home("cx-img-"))
    pool = LocalPool(url, prefix="cx", make_home=lambda host: new_home(f"cx-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    store = Store(url)
    try:
        store.migrate()
        pool.network()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", images=images)  # storage of its own: every move copies the disk too
        pool.wait_online(["h1", "h2"])
        pool.cli("image", "build", "tiny", timeout=1800)
        chaos = MigrationChaos(pool, store, seed=int(os.environ.get("CORRAL_CHAOS_SEED", "7")))
        failures, seen = [], []
        for index in range(MIGRATION_ROUNDS):
            outcome = chaos.run_round(index)
            seen.append(f"{outcome.victim} killed at {outcome.delay:.1f} s: {outcome.job_state}, on {outcome.ended_on}")
            if outcome.violations:
                failures.append(f"round {index} ({outcome.source} -> {outcome.dest}, agent of {outcome.victim} "
                                f"killed after {outcome.delay:.2f} s): {'; '.join(outcome.violations)}")  # fmt: skip
        print("\nmigration chaos: " + "; ".join(seen))
        assert not failures, "\n".join(failures)
    finally:
        pool.close()
        store.close()
        shutil.rmtree(images, ignore_errors=True)
