"""The daemon SIGKILLed at random moments of random operations, then restarted: does everything converge?

Used by tests/integration/test_chaos.py (a few dozen kills) and benchmarks/chaos.py (a hundred or more). After each
restart the harness waits for the jobs to settle and checks the invariants a user relies on:

- every VM converges to its desired state, with exactly one QEMU when it should run and none when it should not;
- no QEMU of the installation belongs to no VM;
- every ready volume has its file, and no disk file in the pool belongs to no volume, base or template;
- no job is left queued or running.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import Daemon, alive

OPERATIONS = ("create-start", "stop", "start", "snapshot", "clone", "backup", "delete")
MAX_VMS = 4


def qemu_uuids(home: Path) -> dict[int, str]:
    """pid -> VM uuid of every live QEMU whose command line names ``home``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv]
        if not words or "qemu-system" not in words[0] or not any(str(home) in word for word in words):
            continue
        if "-uuid" in words and alive(int(entry.name)):
            found[int(entry.name)] = words[words.index("-uuid") + 1].replace("-", "")
    return found


@dataclass
class Round:
    index: int
    operation: str
    target: str
    delay: float
    violations: list[str] = field(default_factory=list)
    settle_seconds: float = 0.0


class Chaos:
    """Random operations on one daemon, each interrupted by a SIGKILL of the daemon after a random delay."""

    def __init__(self, daemon: Daemon, seed: int, max_delay: float = 2.5) -> None:
        self.daemon = daemon
        self.rng = random.Random(seed)
        self.max_delay = max_delay
        self.counter = 0

    # -- reading the truth ---------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.daemon.home / 'corral.db'}?mode=ro", uri=True, timeout=30)

    def vms(self) -> dict[str, tuple[str, str, str]]:
        """id -> (name, desired state, observed state)."""
        with self._db() as db:
            return {row[0]: row[1:] for row in db.execute("SELECT id, name, desired_state, observed_state FROM vms")}

    def _active_jobs(self) -> list[str]:
        with self._db() as db:
            rows = db.execute("SELECT kind, target_name, state FROM jobs WHERE state IN ('queued', 'running')")
            return [f"{kind} {target} ({state})" for kind, target, state in rows]

    # -- one round -------------------------------------------------------------------------------------------

    def _pick(self, wanted: str | None = None) -> str | None:
        names = [name for name, desired, _ in self.vms().values() if wanted is None or desired == wanted]
        return self.rng.choice(sorted(names)) if names else None

    def _command(self) -> tuple[str, str, list[str]]:
        operation = self.rng.choice(OPERATIONS)
        if len(self.vms()) >= MAX_VMS and operation in ("create-start", "clone"):
            operation = "delete"
        self.counter += 1
        fresh = f"chaos{self.counter}"
        running, stopped, anyone = self._pick("running"), self._pick("stopped"), self._pick()
        if operation == "create-start" or anyone is None:
            return "create-start", fresh, ["vm", "create", fresh, "--memory", "128M", "--start", "--wait"]
        if operation == "stop" and running:
            return operation, running, ["vm", "stop", running, "--timeout", "5"]
        if operation == "start" and stopped:
            return operation, stopped, ["vm", "start", stopped, "--wait"]
        if operation == "snapshot":
            return operation, anyone, ["snapshot", "create", anyone, f"s{self.counter}"]
        if operation == "clone" and stopped:
            return operation, fresh, ["vm", "clone", stopped, fresh, "--full"]
        if operation == "backup":
            return operation, anyone, ["backup", "create", anyone, "--name", f"b{self.counter}"]
        if operation == "delete":
            return operation, anyone, ["vm", "delete", anyone, "--force"]
        return (
            "start" if stopped else "stop",
            anyone,
            (["vm", "start", anyone, "--wait"] if stopped else ["vm", "stop", anyone, "--timeout", "5"]),
        )

    def run_round(self, index: int) -> Round:
        operation, target, args = self._command()
        delay = self.rng.uniform(0.0, self.max_delay)
        work = subprocess.Popen([sys.executable, "-m", "corral", *args], env=self.daemon.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        self.daemon.kill()  # SIGKILL, wherever the operation is
        work.wait(60)
        self.daemon.start()
        outcome = Round(index, operation, target, delay)
        started = time.monotonic()
        outcome.violations = self.settle()
        outcome.settle_seconds = time.monotonic() - started
        return outcome

    def settle(self, timeout: float = 90.0) -> list[str]:
        """Wait for the jobs to end and the VMs to converge; return what is still wrong then."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.violations()
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.5)

    def violations(self) -> list[str]:
        problems = [f"job left {job}" for job in self._active_jobs()]
        vms = self.vms()
        processes = qemu_uuids(self.daemon.home)
        for vm_id, (name, desired, observed) in vms.items():
            count = sum(1 for uuid in processes.values() if uuid == vm_id)
            should_run = desired in ("running", "paused")
            if should_run and (count != 1 or observed not in ("running", "paused")):
                problems.append(f"VM {name} wants {desired}: {count} QEMU, observed {observed}")
            if not should_run and (count != 0 or observed not in ("stopped", "crashed")):
                problems.append(f"VM {name} wants {desired}: {count} QEMU, observed {observed}")
        for pid, uuid in processes.items():
            if uuid not in vms:
                problems.append(f"QEMU {pid} belongs to no VM")
        problems += self._disk_problems()
        return problems

    def _disk_problems(self) -> list[str]:
        pool = self.daemon.home / "pools" / "default"
        with self._db() as db:
            volumes = list(db.execute("SELECT name, path, state, backing_path FROM volumes"))
            templates = [row[0] for row in db.execute("SELECT disks FROM templates")]
        problems = []
        known: set[str] = set()
        for name, path, state, backing in volumes:
            known.add(path)
            if backing:
                known.add(backing)
            if not (pool / path).exists():
                problems.append(f"volume {name} ({state}) has no file {path}")
            elif state != "ready":
                problems.append(f"volume {name} left {state}")
        for disks in templates:
            import json

            known.update(disk["path"] for disk in json.loads(disks or "[]"))
        if pool.is_dir():
            for file in pool.rglob("*.qcow2"):
                relative = str(file.relative_to(pool))
                if relative not in known and not relative.startswith("bases/"):
                    problems.append(f"file {relative} belongs to no volume")
        return problems
