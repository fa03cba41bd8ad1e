"""QEMUs of this installation that no runtime record names: adopted or ended, as the store's desired state says.

A runtime record is written as soon as QEMU is started, but an agent can still die between the fork and that
write, or a VM's row can be deleted while its QEMU runs unwatched. Such a process would hold its disks' locks for
good and count twice with a new start. At start-up, before adopting, the agent finds every QEMU whose QMP socket
lies under its run directory: one its VM wants running (and that no recorded process already serves) gets its
record rebuilt from its command line and is adopted; any other is killed. So each VM ends with one QEMU or none.

The same goes for ``qemu-storage-daemon`` processes: a replication receive (corral.host.replication_jobs) or a
backup of a stopped VM runs one for the length of its job, with its monitor socket under the run directory. At
start-up no job of this agent runs any more (the store marked them failed), so every such daemon found is one a
killed agent left behind, holding a replica layer or a disk open and an NBD port: it is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from corral.engine.runtime import RuntimeRecord, is_same_process, qemu_processes_under, record_of_process
from corral.store.models import VM

if TYPE_CHECKING:
    from corral.host.agent import Agent

log = logging.getLogger("corral.agent")
WANTS_A_PROCESS = ("running", "paused")


async def settle_unrecorded(agent: Agent) -> dict[str, list[str]]:
    """Adopt or end every unrecorded QEMU of this installation; returns the VM names (or pids) of each."""
    daemons = await asyncio.to_thread(end_storage_daemons, agent.layout.home / "run")
    found = await asyncio.to_thread(qemu_processes_under, agent.layout.home / "run")
    outcome: dict[str, list[str]] = {"adopted": [], "ended": [], "storage_daemons": [str(pid) for pid in daemons]}
    if not found:
        return outcome
    with agent.store.reading() as session:
        vms = {vm.id: (vm.name, vm.host, vm.desired_state) for vm in session.scalars(select(VM))}
    for pid, run_dir in sorted(found.items()):
        record_path = run_dir / "runtime.json"
        recorded = RuntimeRecord.load(record_path)
        if recorded is not None and recorded.pid == pid:
            continue  # the usual adoption takes it
        rebuilt = record_of_process(pid, run_dir)
        vm_id = rebuilt.uuid.replace("-", "") if rebuilt is not None else None
        known = vms.get(vm_id) if vm_id else None
        wanted = (
            rebuilt is not None
            and known is not None
            and known[1] == agent.host_name
            and known[2] in WANTS_A_PROCESS
            and run_dir == agent.layout.vm_run_dir(vm_id or "")
            and (recorded is None or not is_same_process(recorded))  # no other live QEMU serves this VM
        )
        if wanted and rebuilt is not None and known is not None:
            rebuilt.save(record_path)
            log.warning("VM %s: found its QEMU (pid %d) running without a record; adopting it", known[0], pid)
            outcome["adopted"].append(known[0])
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        what = f"VM {known[0]}" if known else f"a VM no longer in the store ({run_dir.name})"
        log.warning("ended an unrecorded QEMU (pid %d) of %s: nothing wants it running here", pid, what)
        outcome["ended"].append(known[0] if known else str(pid))
    return outcome


def storage_daemons_under(run_root: Path) -> dict[int, Path]:
    """Live ``qemu-storage-daemon`` processes whose monitor socket lies under ``run_root``: pid -> socket."""
    found: dict[int, Path] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if zombie or not argv or Path(argv[0]).name != "qemu-storage-daemon":
            continue
        for arg in argv:
            path = dict(part.partition("=")[::2] for part in arg.split(",")).get("path", "")
            if path and Path(path).is_relative_to(run_root):
                found[int(entry.name)] = Path(path)
                break
    return found


def end_storage_daemons(run_root: Path) -> list[int]:
    """SIGKILL every storage daemon of this installation (called at start-up only, when no job runs)."""
    ended = []
    for pid, socket in sorted(storage_daemons_under(run_root).items()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
        socket.unlink(missing_ok=True)
        log.warning("ended a qemu-storage-daemon (pid %d, %s) that a job of a killed agent left running", pid, socket)
    return ended
