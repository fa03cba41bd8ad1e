"""The daemon SIGKILLed at random moments of random operations, then restarted: does everything converge?

Used by tests/integration/test_chaos.py (a few dozen kills) and benchmarks/chaos.py (a hundred or more). After each
restart the harness waits for the jobs to settle and checks the invariants a user relies on:

- every VM converges to its desired state, with exactly one QEMU when it should run and none when it should not;
- no QEMU of the installation belongs to no VM;
- every ready volume has its file, and no disk file in the pool belongs to no volume, base or template;
- no job is left queued or running.

:class:`Chaos` drives one daemon on SQLite. :class:`MigrationChaos` drives live migrations on a pool of two hosts
(network namespaces, corral.localpool.LocalPool) on PostgreSQL, the source's or the destination's agent SIGKILLed
at a random moment of each, and checks the same invariants across both hosts: the VM runs exactly once, on the
host the store names, or not at all as desired; its disk files are on that host only.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            known.update(disk["path"] for disk in json.loads(disks or "[]"))
        if pool.is_dir():
            for file in pool.rglob("*.qcow2"):
                relative = str(file.relative_to(pool))
                if relative not in known and not relative.startswith("bases/"):
                    problems.append(f"file {relative} belongs to no volume")
        return problems


# -- live migration on a pool ----------------------------------------------------------------------------------


@dataclass
class MigrationRound:
    index: int
    source: str
    dest: str
    victim: str  # the host whose agent was killed
    delay: float  # seconds after the `vm migrate` command started
    down: float  # seconds the agent stayed dead
    violations: list[str] = field(default_factory=list)
    settle_seconds: float = 0.0
    ended_on: str | None = None  # where the VM is after the round
    job_state: str | None = None  # the move's job, once settled
    move_seconds: float | None = None  # from its jobs' writing to its end

    @property
    def moved(self) -> bool:
        return self.ended_on == self.dest


class MigrationChaos:
    """Live migrations of one VM back and forth between ``hosts`` of ``pool`` (a started corral.localpool.LocalPool
    with its agents, hosts on storage of their own, so every move copies the disks too), each interrupted by a
    SIGKILL of the source's or the destination's agent at a random moment; the agent is started again after a
    random pause. ``store`` (corral.store.db.Store on the pool's database) reads the truth."""

    def __init__(
        self,
        pool: Any,
        store: Any,
        seed: int,
        hosts: tuple[str, str] = ("h1", "h2"),
        name: str = "migrant",
        max_delay: float = 3.0,
        max_down: float = 3.0,
    ) -> None:
        self.pool, self.store, self.hosts, self.name = pool, store, hosts, name
        self.rng = random.Random(seed)
        self.max_delay, self.max_down = max_delay, max_down

    # -- reading the truth ---------------------------------------------------------------------------------

    def _rows(self) -> tuple[dict[str, tuple[str, str | None, str, str]], list[str], list[tuple[Any, ...]]]:
        """VMs (id -> name, host, desired, observed), active jobs, volumes (name, host, pool, path, state, base)."""
        from sqlalchemy import select

        from corral.store.models import VM, Job, Volume

        with self.store.reading() as session:
            vms = {vm.id: (vm.name, vm.host, vm.desired_state, vm.observed_state) for vm in session.scalars(select(VM))}
            active = [
                f"{job.kind} {job.target_name} on {job.host} ({job.state})"
                for job in session.scalars(select(Job).where(Job.state.in_(("queued", "running"))))
            ]
            volumes = [
                (v.name, v.host, v.pool, v.path, v.state, v.backing_path) for v in session.scalars(select(Volume))
            ]
        return vms, active, volumes

    def vm(self) -> tuple[str, str | None, str, str] | None:
        return next((row for row in self._rows()[0].values() if row[0] == self.name), None)

    def processes(self) -> dict[str, dict[int, str]]:
        """host -> {pid: VM uuid} of the QEMUs under each host's home."""
        return {host: qemu_uuids(self.pool.homes[host]) for host in self.hosts}

    def violations(self) -> list[str]:
        vms, active, volumes = self._rows()
        problems = [f"job left {job}" for job in active]
        processes = self.processes()
        for vm_id, (name, host, desired, observed) in vms.items():
            where = {h: sum(1 for u in found.values() if u == vm_id) for h, found in processes.items()}
            where = {h: n for h, n in where.items() if n}
            if desired in ("running", "paused"):
                if where != {host: 1} or observed not in ("running", "paused"):
                    problems.append(f"VM {name} wants {desired} on {host}: QEMU {where or 'none'}, observed {observed}")
            elif where or observed not in ("stopped", "crashed"):
                problems.append(f"VM {name} wants {desired}: QEMU {where or 'none'}, observed {observed}")
        for host, found in processes.items():
            for pid, vm_uuid in found.items():
                if vm_uuid not in vms:
                    problems.append(f"QEMU {pid} on {host} belongs to no VM")
        known: dict[str, set[str]] = {host: set() for host in self.hosts}
        for name, host, pool, path, state, base in volumes:
            if host not in known:
                continue
            known[host].add(f"{pool}/{path}")
            if base:
                known[host].add(f"{pool}/{base}")
            if not (self.pool.homes[host] / "pools" / pool / path).exists():
                problems.append(f"volume {name} ({state}) on {host} has no file {path}")
            elif state != "ready":
                problems.append(f"volume {name} left {state}")
        for host in self.hosts:
            pools = self.pool.homes[host] / "pools"
            for file in pools.rglob("*.qcow2") if pools.is_dir() else []:
                pool, _, relative = str(file.relative_to(pools)).partition("/")
                if f"{pool}/{relative}" not in known[host] and not relative.startswith("bases/"):
                    problems.append(f"file {relative} on {host} belongs to no volume there")
        return problems

    # -- rounds ----------------------------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """The VM exists and runs (a round may leave it stopped as desired: the next one starts it first)."""
        row = self.vm()
        if row is None:
            self.pool.cli("vm", "run", self.name, "--host", self.hosts[0], "--memory", "128M", timeout=600)
        elif row[2] != "running":
            self.pool.cli("vm", "start", self.name, "--wait", timeout=600)

    def run_round(self, index: int) -> MigrationRound:
        from sqlalchemy import select

        from corral.store.models import Job

        self.hosts_online()
        self.ensure_running()
        row = self.vm()
        assert row is not None and row[1] in self.hosts
        source = row[1]
        dest = self.hosts[1] if source == self.hosts[0] else self.hosts[0]
        victim = self.rng.choice((source, dest))
        outcome = MigrationRound(
            index, source, dest, victim, self.rng.uniform(0.0, self.max_delay), self.rng.uniform(0.0, self.max_down)
        )
        control = self.pool.env(self.pool.homes["control"])
        before = self._last_move()
        work = subprocess.Popen([sys.executable, "-m", "corral", "vm", "migrate", self.name, "--to", dest],
                                env=control, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        # The delay counts from the move's jobs being written, not from the CLI's start (a second or more of
        # Python start-up here): so the kills fall over the move itself, from before either agent claimed its half
        # to after the switchover.
        deadline = time.monotonic() + 60
        while self._last_move() == before and work.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(outcome.delay)
        self.pool.agents[victim].stop(signal.SIGKILL)  # the agent only: its QEMUs live on, as after a crash of it
        time.sleep(outcome.down)
        self.pool.agents[victim].start()
        started = time.monotonic()
        outcome.violations = self.settle()
        outcome.settle_seconds = time.monotonic() - started
        try:
            work.wait(30)  # it follows the move's job, which has ended by now
        except subprocess.TimeoutExpired:
            work.kill()
            work.wait()
        if self._last_move() == before:
            outcome.job_state = f"refused ({work.stderr.read().strip() if work.stderr else ''})"
        row = self.vm()
        outcome.ended_on = row[1] if row else None
        with self.store.reading() as session:
            job = session.scalars(
                select(Job).where(Job.kind == "vm.migrate").order_by(Job.created_at.desc()).limit(1)
            ).first()
            if job is not None and job.id != before:
                outcome.job_state = job.state if job.state == "succeeded" else f"{job.state} ({job.error})"
                outcome.move_seconds = (job.finished_at - job.created_at).total_seconds() if job.finished_at else None
        return outcome

    def _last_move(self) -> str | None:
        from sqlalchemy import select

        from corral.store.models import Job

        with self.store.reading() as session:
            return session.scalars(
                select(Job.id).where(Job.kind == "vm.migrate").order_by(Job.created_at.desc()).limit(1)
            ).first()

    def settle(self, timeout: float = 180.0) -> list[str]:
        """Wait for the jobs to end and the VM to converge, its guest answering where it should run (a QEMU left
        paused by a move reads as running in /proc); return what is still wrong then."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.violations() or self._guest_problems()
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.5)

    def _guest_problems(self) -> list[str]:
        row = self.vm()
        if row is None or row[2] != "running":
            return []
        result = self.pool.cli("vm", "exec", self.name, "--", "true", check=False, timeout=60)
        return [] if result.returncode == 0 else [f"VM {self.name}'s guest does not answer: {result.stderr.strip()}"]

    def hosts_online(self, timeout: float = 120.0, fresh: float = 2.0) -> None:
        """Both agents back and heard from within ``fresh`` seconds (a restarted agent settles its VMs between its
        registration and its next heartbeat; placement wants a recent one)."""
        from datetime import UTC, datetime, timedelta

        from sqlalchemy import select

        from corral.store.models import Host

        deadline = time.monotonic() + timeout
        while True:
            with self.store.reading() as session:
                rows = {h.name: (h.state, h.heartbeat_at) for h in session.scalars(select(Host))}
            since = datetime.now(UTC) - timedelta(seconds=fresh)
            if all(rows.get(h, ("", since))[0] == "online" and rows[h][1] > since for h in self.hosts):
                return
            assert time.monotonic() < deadline, f"hosts not online after {timeout:.0f} s: {rows}"
            time.sleep(0.2)
