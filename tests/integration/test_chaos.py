"""The daemon SIGKILLed at random moments of random operations (create/start, stop, start, snapshot, clone,
backup, delete), 20 times: after each restart every VM converges to its desired state with one QEMU or none,
no QEMU belongs to no VM, no volume lacks its file, no disk file lacks its volume, no job is left running.
benchmarks/chaos.py runs the same rounds a hundred times and more."""

from __future__ import annotations

import os

import pytest

from tests.chaos_harness import Chaos

pytestmark = pytest.mark.integration
ROUNDS = int(os.environ.get("CORRAL_CHAOS_ROUNDS", "20"))


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
