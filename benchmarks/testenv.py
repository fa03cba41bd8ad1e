"""Test environments: a pytest session whose tests each need a fresh VM, with the plugin's forks against a VM
booted per test; and `vm fork` (until the child answers) against `vm run --wait`, both through the CLI.

- session of N tests (default 20): wall time and median per-test setup, forks vs boots (goal <= 0.15)
- CLI: `corral vm fork` then the first `vm exec` in the child, against `corral vm run --wait` (goal <= 0.15)

    python benchmarks/testenv.py [--tests 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BenchDaemon, median, print_table

CONFTEST = '''
import json, os, uuid
import pytest

SETUPS = []

def pytest_runtest_logreport(report):
    if report.when == "setup" and report.passed:
        SETUPS.append(report.duration)

def pytest_sessionfinish(session):
    with open(os.environ["BENCH_OUT"], "w") as out:
        json.dump(SETUPS, out)

@pytest.fixture
def booted_vm(corral_client):
    """The baseline: a VM cold-booted for this test (what a test suite does without forks)."""
    from corral.client.environments import wait_ready
    from corral.testing import VM
    from corral.testing.pytest_plugin import remove

    name = f"boot-{uuid.uuid4().hex[:6]}"
    spec = {"name": name, "image": "tiny", "memory": "128M"}
    corral_client.wait_job(corral_client.create_vm(spec, start=True, wait=True)["job"]["id"], timeout=600)
    wait_ready(corral_client, name)
    try:
        yield VM(corral_client, name)
    finally:
        remove(corral_client, name)
'''

TESTS = """
import pytest

@pytest.mark.parametrize("index", range({count}))
def test_needs_a_vm(index, {fixture}):
    assert {fixture}.exec(["sh", "-c", "echo $0 > /root/mine; cat /root/mine", str(index)]).stdout.strip() == str(index)
"""


def session(daemon: BenchDaemon, fixture: str, count: int) -> tuple[float, list[float]]:
    """Run a pytest session of ``count`` tests on ``fixture``; its wall time and every test's setup time."""
    with tempfile.TemporaryDirectory(prefix="corral-bt-") as directory:
        root = Path(directory)
        (root / "conftest.py").write_text(CONFTEST)
        (root / "test_bench.py").write_text(TESTS.format(count=count, fixture=fixture))
        out = root / "setups.json"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), str(root)],
            env={**daemon.env, "BENCH_OUT": str(out)},
            cwd=root,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"the {fixture} session failed:\n{done.stdout[-3000:]}")
        return wall, json.loads(out.read_text())


def bench_sessions(daemon: BenchDaemon, count: int) -> list[list[object]]:
    fork_wall, fork_setups = session(daemon, "corral_vm", count)
    boot_wall, boot_setups = session(daemon, "booted_vm", count)
    return [
        [f"session of {count} tests, forks (s)", f"{fork_wall:.1f}", ""],
        [f"session of {count} tests, boot per test (s)", f"{boot_wall:.1f}", ""],
        ["ratio (wall)", f"{fork_wall / boot_wall:.3f}", "<= 0.15"],
        ["setup per test, fork (median s)", f"{median(fork_setups):.2f}", "(first one boots the template)"],
        ["setup per test, boot (median s)", f"{median(boot_setups):.2f}", ""],
        ["ratio (VM part: sum of setups)", f"{sum(fork_setups) / sum(boot_setups):.3f}", "<= 0.15"],
    ]


def bench_cli(daemon: BenchDaemon, runs: int) -> list[list[object]]:
    parent = f"tp-{uuid.uuid4().hex[:6]}"
    daemon.cli("vm", "run", parent, "--image", "tiny", "--memory", "128M", "--forkable")
    forks, boots, jobs = [], [], []
    for _ in range(runs):
        child = f"tc-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        forked = json.loads(daemon.cli("vm", "fork", parent, child, "--json").stdout)
        daemon.cli("vm", "exec", child, "--", "true")  # usable: its guest agent answers
        forks.append(time.monotonic() - started)
        jobs.append(forked["job"]["result"])
        daemon.cli("vm", "delete", child, "--force")
        booted = f"tb-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        daemon.cli("vm", "run", booted, "--image", "tiny", "--memory", "128M", "--wait")
        boots.append(time.monotonic() - started)
        daemon.cli("vm", "delete", booted, "--force")
    daemon.cli("vm", "delete", parent, "--force")
    return [
        ["`vm fork` + first exec (median s)", f"{median(forks):.2f}", ""],
        ["`vm run --wait` (median s)", f"{median(boots):.2f}", ""],
        ["ratio", f"{median(forks) / median(boots):.3f}", "<= 0.15"],
        ["  in the fork job: parent paused (median ms)", f"{median([j['parent_pause_ms'] for j in jobs]):.0f}", ""],
        ["  child running after (median ms)", f"{median([j['child_ready_ms'] for j in jobs]):.0f}", ""],
        ["  child usable after (median ms)", f"{median([j.get('usable_ms', 0) for j in jobs]):.0f}", ""],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=20, help="tests in each pytest session")
    parser.add_argument("--runs", type=int, default=3, help="CLI fork/boot pairs")
    parser.add_argument("--only", choices=["sessions", "cli"], help="run one of the two parts")
    args = parser.parse_args()
    with BenchDaemon() as daemon:
        if args.only != "cli":
            rows = bench_sessions(daemon, args.tests)
            print_table("pytest session, a fresh VM per test", ["what", "value", "goal"], rows)
        if args.only != "sessions":
            rows = bench_cli(daemon, args.runs)
            print_table("CLI: fork until usable against boot", ["what", "value", "goal"], rows)


if __name__ == "__main__":
    main()
