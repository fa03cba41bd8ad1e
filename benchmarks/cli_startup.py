"""CLI start-up as the user sees it: wall time of `corral --help` and of `corral vm list` against a running daemon,
with `python -c pass` (the interpreter alone) as the floor.

Runs are interleaved (one of each per round, in a shuffled order) so the three see the same machine load, and
the table gives the median and p90 of each plus the median above the floor. Goal (issue 17): `corral --help` and
`corral vm list` <= 0.12 s. The last line is the same figures as JSON, for scripts.

    python benchmarks/cli_startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table

GOAL = 0.12


def corral_binary() -> str:
    """The `corral` console script a user runs (next to this interpreter), not `python -m corral`: the entry
    script's own imports count."""
    beside = Path(sys.executable).parent / "corral"
    return str(beside) if beside.exists() else shutil.which("corral") or "corral"


class Daemon:
    """`corral serve` on a throw-away home: `vm list` needs a daemon to answer, not an image or a VM."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="corral-cli-", dir="/tmp"))
        self.env = {**os.environ, "CORRAL_HOME": str(self.home), "CORRAL_DEFAULT_NETWORK": "0"}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        log = (self.home / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve"], env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while subprocess.run([corral_binary(), "vm", "list"], env=self.env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the daemon did not start: see {self.home / 'daemon.log'}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        shutil.rmtree(self.home, ignore_errors=True)


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode().strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="rounds (one run of each command per round)")
    args = parser.parse_args()
    corral = corral_binary()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "corral --help": [corral, "--help"],
        "corral vm list": [corral, "vm", "list"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    with Daemon() as daemon:
        for argv in commands.values():
            timed(argv, daemon.env)  # warm the page cache and the .pyc files
        for _ in range(args.runs):
            order = list(commands)
            random.shuffle(order)
            for name in order:
                times[name].append(timed(commands[name], daemon.env))
    floor = statistics.median(times["python -c pass"])
    figures = {}
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else median
        figures[name] = {"median": round(median, 4), "p90": round(p90, 4), "over_floor": round(median - floor, 4)}
        goal = "" if name.startswith("python") else ("yes" if median <= GOAL else "no")
        rows.append([name, f"{median:.3f}", f"{p90:.3f}", f"{median - floor:+.3f}", goal])
    print_table(
        f"CLI start-up, {args.runs} interleaved rounds (seconds; goal <= {GOAL})",
        ["command", "median", "p90", "over python", f"<= {GOAL}"],
        rows,
    )
    print(json.dumps({"benchmark": "cli_startup", "runs": args.runs, "goal": GOAL, "figures": figures}))


if __name__ == "__main__":
    main()
