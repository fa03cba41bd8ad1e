"""The fencer: a self-fence that outlives the agent (docs/ha.md, "The fencer").

The agent's watchdog (corral.host.lease) is a thread of the agent: an agent killed alone (SIGKILL, the OOM killer)
takes it along while its QEMUs, each in a session of its own, keep running. The control plane would then restart
the HA VMs elsewhere after the lease's expiry plus a margin: two copies writing one disk. So on a PostgreSQL pool
the agent also starts this small process, in its own session like QEMU, which needs neither the agent nor the
store to act:

- the agent rewrites ``run/fencer.json`` after each successful renewal with a **CLOCK_MONOTONIC deadline**,
  ``lease_time x 0.9`` after the *start* of that renewal (the database's expiry is at least ``lease_time`` after
  that instant, the takeover ``0.5 x lease_time`` later still), and the VMs known not to be HA;
- every 100 ms the fencer reads it. Past the deadline, whatever the reason (the agent dead, stuck, cut off), it
  SIGKILLs every QEMU under this home's run directory that is not a known non-HA VM, and again on every tick
  while the deadline stays past. A stale file cannot delay it: the deadline is an absolute instant of a clock
  that never goes back, so an old file only holds an earlier one; a file from before a reboot (another boot id)
  counts as past.
- A QEMU is killed through a pidfd, opened first and checked second (its command line still names this home's
  run directory), so a pid recycled by another process is never signalled.

The agent's own watchdog fences at ``0.8 x lease_time``, before this one: while the agent lives, the fencer finds
nothing left to kill. It ends when the agent gives the lease up cleanly (``released``: no takeover follows, the
VMs keep running), when another fencer took its place (``run/fencer.pid`` names another process), when the home
is gone, or when its agent is dead, the deadline past and no QEMU is left to guard. An agent that starts finds a
running fencer by that pidfile (pid and start time) and keeps it; it rewrites the file, which is all the fencer
knows.

Run as ``python -m corral.host.fencer HOME``; it logs to ``HOME/logs/fencer.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from corral.engine.runtime import process_start_ticks, qemu_processes_under

log = logging.getLogger("corral.fencer")

FENCER_FRACTION = 0.9  # of the lease time after the start of the last good renewal; the watchdog's is 0.8
TICK = 0.1  # seconds between two looks at the deadline


def state_path(home: Path) -> Path:
    return home / "run" / "fencer.json"


def pid_path(home: Path) -> Path:
    return home / "run" / "fencer.pid"


def killed_path(home: Path) -> Path:
    """One JSON line per QEMU the fencer killed; the agent turns them into a ``host.fenced`` event (by
    ``fencer``) once it holds the lease again, and removes the file."""
    return home / "run" / "fencer.killed"


def take_killed(home: Path) -> list[dict[str, Any]]:
    """The fencer's kills not yet reported, and forget them (called by the agent)."""
    path = killed_path(home)
    taken = path.with_name(f"fencer.killed.{os.getpid()}")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return []
    try:
        entries = []
        for line in taken.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries
    finally:
        taken.unlink(missing_ok=True)


def boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def fencer_deadline(renewal_started: float, lease_time: float) -> float:
    """The monotonic instant past which the fencer kills this host's HA VMs."""
    return renewal_started + lease_time * FENCER_FRACTION


def write_state(home: Path, *, deadline: float, non_ha: set[str], released: bool = False) -> None:
    """Called by the agent after each good renewal (and at its start and clean stop). Atomic: the fencer reads
    either the old file or the new one."""
    state = {
        "deadline": deadline,
        "boot_id": boot_id(),
        "non_ha": sorted(vm_id[:12] for vm_id in non_ha),  # run directories are named by the id's first 12
        "released": released,
        "agent_pid": os.getpid(),
        "agent_start_ticks": process_start_ticks(os.getpid()),
    }
    path = state_path(home)
    tmp = path.with_name(f"fencer.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(home).read_text())
    except (OSError, ValueError):
        return None


def fence_due(state: dict[str, Any], now: float | None = None) -> bool:
    """Is the deadline past? A file of another boot counts as past: its monotonic instants mean nothing now."""
    if state.get("released"):
        return False
    if state.get("boot_id") != boot_id():
        return True
    return (time.monotonic() if now is None else now) >= float(state.get("deadline", 0.0))


def _same_process(pid: int, ticks: Any) -> bool:
    return ticks is not None and process_start_ticks(pid) == ticks


def kill_ha_qemus(home: Path, non_ha: set[str]) -> list[tuple[int, str]]:
    """SIGKILL every live QEMU under ``home``'s run directory whose VM is not a known non-HA one; returns
    (pid, run directory name) of each killed."""
    run_root = home / "run"
    killed = []
    for pid, run_dir in sorted(qemu_processes_under(run_root).items()):
        if run_dir.name in non_ha:
            continue
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            continue
        try:
            # The fd pins the process: if it still names our run directory, it is the QEMU we found.
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"unix:{run_dir}/".encode() not in cmdline:
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed.append((pid, run_dir.name))
        finally:
            os.close(fd)
    return killed


def _write_pidfile(home: Path, pid: int) -> None:
    pid_file = pid_path(home)
    tmp = pid_file.with_name(f"fencer.pid.{os.getpid()}.tmp")  # per writer: agent and fencer both write it
    tmp.write_text(json.dumps({"pid": pid, "start_ticks": process_start_ticks(pid)}))
    os.replace(tmp, pid_file)


def run(home: Path) -> int:
    """The fencer's loop (see the module's docstring for when it ends)."""
    me = os.getpid()
    pid_file = pid_path(home)
    _write_pidfile(home, me)
    log.warning("fencer %d watching %s", me, home)
    fencing = False
    while True:
        if not (home / "run").is_dir():
            log.warning("home %s is gone: fencer ends", home)
            return 0
        with contextlib.suppress(OSError, ValueError):
            if json.loads(pid_file.read_text()).get("pid") != me:
                log.warning("another fencer took over: fencer %d ends", me)
                return 0
        state = read_state(home)
        if state is None:
            state = {"deadline": 0.0, "boot_id": boot_id()}  # no deadline at all: fence (an agent writes it first)
        if state.get("released"):
            log.warning("the agent gave its lease up cleanly: fencer %d ends, VMs left running", me)
            return 0
        if fence_due(state):
            if not fencing:
                agent_alive = _same_process(int(state.get("agent_pid", 0) or 0), state.get("agent_start_ticks"))
                log.error(
                    "lease deadline passed (agent %s %s): fencing, killing the QEMU of every HA VM",
                    state.get("agent_pid"),
                    "alive but not renewing" if agent_alive else "dead",
                )
                fencing = True
            for pid, vm in kill_ha_qemus(home, set(state.get("non_ha", []))):
                log.error("fenced: killed QEMU %d (run/%s)", pid, vm)
                with contextlib.suppress(OSError), killed_path(home).open("a") as out:
                    out.write(json.dumps({"pid": pid, "vm": vm, "at": time.time()}) + "\n")
            agent_alive = _same_process(int(state.get("agent_pid", 0) or 0), state.get("agent_start_ticks"))
            if not agent_alive and not qemu_processes_under(home / "run"):
                log.warning("agent dead and no QEMU left to guard: fencer %d ends", me)
                return 0
        elif fencing:
            log.warning("lease renewed again: fence lifted")
            fencing = False
        time.sleep(TICK)


def running_fencer(home: Path) -> int | None:
    """The pid of this home's live fencer (by its pidfile, pid and start time), or None."""
    try:
        info = json.loads(pid_path(home).read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _same_process(pid, info.get("start_ticks")):
        return None
    with contextlib.suppress(OSError):
        if b"corral.host.fencer" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def ensure_running(home: Path) -> int | None:
    """Keep the running fencer (a restarted agent takes it over) or start one in a session of its own, so that it
    outlives this agent; returns the new process's pid, None when one was running already."""
    if running_fencer(home) is not None:
        return None
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with open(home / "logs" / "fencer.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.host.fencer", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _write_pidfile(home, proc.pid)  # at once: an agent that looks again finds it before it wrote it itself
    # Popen returns once the exec began, but the kernel fills /proc/PID/cmdline a moment later (the close-on-exec
    # pipe Popen waits on closes before the new image's arguments are in place): wait for them, so that a second
    # look (running_fencer) never takes the new fencer for another process and starts a second one.
    deadline = time.monotonic() + 2.0
    while running_fencer(home) != proc.pid and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc.pid


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m corral.host.fencer HOME", file=sys.stderr)
        return 2
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return run(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
