"""Kill the daemon (SIGKILL) at random moments of random operations, restart it, and check that everything
converges: one QEMU or none per VM as desired, no QEMU without a VM, no volume without its file, no file without
its volume, no job left running. Prints a table of the rounds by operation and every violation seen.

    python benchmarks/chaos.py [--rounds 100] [--seed N] [--max-delay 2.5]
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
    parser.add_argument("--max-delay", type=float, default=2.5)
    options = parser.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
