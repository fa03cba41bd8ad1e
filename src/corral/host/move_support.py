"""The two halves of a live migration as a host agent runs them: ``prepare_incoming`` on the destination host and
``migrate_out`` on the source host. The cluster's orchestrator pairs them through the store (not wired here).

The sequence an orchestrator drives (docs/migration.md):

1. destination agent: ``incoming = await prepare_incoming(agent, vm_id, listen_host=..., shared_storage=...)``;
   it builds the plan from the VM's row, makes blank disks when the storage is not shared, starts QEMU with
   ``-incoming defer``, exports the disks over NBD and listens for RAM. It publishes
   ``incoming.endpoint.model_dump()`` (address, ports, export names, postcopy availability) for the source.
2. source agent: ``result = await migrate_out(ctx, endpoint, confirm=...)`` mirrors the disks, sends RAM,
   asks ``confirm()`` whether the destination runs the VM, and then stops its own QEMU (no guest shutdown,
   no store write about power state: the VM did not stop, it moved). Progress goes through ``ctx.progress``,
   so a cancelled job rolls the move back with the source running.
3. destination agent, concurrently with 2: ``await incoming.complete()`` waits for the stream to end, removes
   the NBD exports and starts watching the VM like any VM it launched. The orchestrator then sets the VM
   row's host to the destination. On any failure: ``await incoming.abort()`` (kills the destination QEMU,
   removes the disks it made). Exactly one copy runs at the end because the source only quits after
   ``confirm()`` and the destination is only kept after ``complete()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.engine.live_migration import (
    IncomingEndpoint,
    IncomingMigration,
    MigrationProgress,
    MigrationTuning,
    OutgoingMigration,
)
from corral.engine.plan import LaunchPlan
from corral.engine.process import QemuProcess
from corral.errors import Conflict
from corral.host import vm_lifecycle, vm_nics, vm_plan

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext

log = logging.getLogger("corral.agent")
PROGRESS_EVERY = 0.5  # seconds between progress rows written to the store


@dataclass
class IncomingVM:
    """The destination's half of one move, from ``prepare_incoming`` until ``complete`` or ``abort``."""

    agent: Agent
    vm_id: str
    plan: LaunchPlan
    proc: QemuProcess
    migration: IncomingMigration
    made_disks: list[Path] = field(default_factory=list)  # blank disks this side created (removed on abort)
    endpoint: IncomingEndpoint | None = None  # what to hand to the source (``model_dump()`` for the store)

    async def complete(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the VM runs here, drop the NBD exports, and watch the process like any local VM.

        Returns ``{"pid", "resumed_at"}`` (``resumed_at``: wall-clock time of the RESUME event, for the
        orchestrator's downtime figure with the source's ``stopped_at``). Writes nothing to the VM row; on
        failure the destination is torn down and the error propagates (the source still has the VM)."""
        try:
            resumed_at = await self.migration.wait(timeout)
            await self.migration.finish()
        except BaseException:
            await self.abort()
            raise
        vm_lifecycle.track(self.agent, self.vm_id, self.proc)
        return {"pid": self.proc.pid, "resumed_at": resumed_at}

    async def abort(self) -> None:
        """Kill the destination QEMU and remove what this side made; safe to call more than once."""
        await self.migration.abort()
        self.plan.runtime_record.unlink(missing_ok=True)
        await asyncio.to_thread(self.agent.isolation.release, self.vm_id)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(vm_nics.unplug_taps, self.agent, self.vm_id)
        for disk in self.made_disks:
            disk.unlink(missing_ok=True)
        if self.plan.ram_file is not None and self.plan.ram_shared:
            self.plan.ram_file.unlink(missing_ok=True)


async def prepare_incoming(
    agent: Agent,
    vm_id: str,
    *,
    listen_host: str,
    port: int = 0,
    nbd_port: int | None = None,
    shared_storage: bool = True,
    tuning: MigrationTuning | None = None,
) -> IncomingVM:
    """Destination side: start this host's QEMU for ``vm_id`` waiting for the migration stream.

    ``listen_host``: this host's address as the source can reach it (also where NBD listens). ``port`` 0 lets
    QEMU choose the RAM port; ``nbd_port`` is required without shared storage (open it in the firewall).
    ``shared_storage``: the VM's pool path holds the very same files on both hosts (NFS, a cluster
    filesystem); otherwise every writable disk is created here blank, with the source's virtual size, owned by
    the VM's sandbox uid, and exported over NBD. The VM's image (kernel, initrd) must exist on this host.
    """
    tuning = tuning or MigrationTuning()
    if vm_id in agent.vms and not agent.vms[vm_id].proc.exited:
        raise Conflict("this VM already runs on this host", "a VM cannot migrate onto its own host")
    vm = vm_lifecycle.load_vm(agent, vm_id)
    plan = vm_plan.build_plan(agent, vm).model_copy(update={"incoming": True})
    if plan.ram_file is not None and plan.ram_file.exists():
        # Two "hosts" on one machine share /dev/shm: never map the source's RAM file.
        plan = plan.model_copy(update={"ram_file": plan.ram_file.with_suffix(".incoming.ram")})
    made: list[Path] = []
    writable = [disk for disk in plan.disks if not disk.read_only]
    try:
        if not shared_storage:
            # build_plan names each disk's node after its device index; the sizes come from the same rows.
            sizes = {vm_plan.disk_node(volume.device_index): volume.size for volume in vm.volumes}
            for disk in writable:
                if disk.path.exists():
                    raise Conflict(
                        f"{disk.path} already exists on this host",
                        "remove the stale copy, or migrate with shared storage",
                    )
                size = sizes.get(disk.node)
                if size is None:
                    raise Conflict(f"no volume row for {disk.path.name}")
                disk.path.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(qemu_img.create_blank, disk.path, size, agent.settings.qemu_img_binary)
                made.append(disk.path)
        box = await asyncio.to_thread(agent.isolation.prepare, vm_id, plan)  # chowns disks to the VM's uid
        await asyncio.to_thread(vm_nics.plug_taps, agent, vm_id, plan)
        if box.extra_args:
            plan = plan.model_copy(update={"extra_args": (*plan.extra_args, *box.extra_args)})
        proc = await QemuProcess.launch(plan, on_event=vm_lifecycle.event_handler(agent, vm_id), preexec=box.preexec)
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        await asyncio.to_thread(agent.isolation.release, vm_id)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(vm_nics.unplug_taps, agent, vm_id)
        raise
    migration = IncomingMigration(proc, tuning)
    incoming = IncomingVM(agent, vm_id, plan, proc, migration, made)
    try:
        nodes = [] if shared_storage else [disk.node for disk in writable]
        incoming.endpoint = await migration.prepare(listen_host, port, nbd_port, nodes)
    except BaseException:
        await incoming.abort()
        raise
    return incoming


async def migrate_out(
    ctx: JobContext,
    endpoint: IncomingEndpoint | dict[str, Any],
    *,
    tuning: MigrationTuning | None = None,
    confirm: Callable[[], Awaitable[bool]] | None = None,
) -> dict[str, Any]:
    """Source side: move the running VM ``ctx.target_id`` to the destination that published ``endpoint``.

    Progress (fraction and a line such as "ram: 120 MiB sent, 30 MiB left, pass 2, ...") goes to
    ``ctx.progress`` at most every 0.5 s; a cancel request raises there and rolls the move back (the source
    keeps running, the destination sees its stream fail and exits). ``confirm()`` is awaited once the stream
    has completed: it must return True only once the destination agent's ``complete()`` has seen the VM run;
    False or an exception resumes the VM here. Without ``confirm`` the source trusts QEMU's "completed".
    On success the local QEMU is quit and forgotten (its run record, RAM file and cgroup go; disks stay, to
    be removed by the orchestrator once the VM's row points at the destination). Returns the measurements:
    total_s, disk_s, ram_s, downtime_ms, stopped_at, postcopy, ram_transferred, passes.
    """
    agent = ctx.agent
    vm_id = ctx.target_id
    if vm_id is None:
        raise Conflict(f"VM {ctx.target_name} not found")
    endpoint = endpoint if isinstance(endpoint, IncomingEndpoint) else IncomingEndpoint.model_validate(endpoint)
    async with agent.vm_locks[vm_id]:
        running = agent.vms.get(vm_id)
        if running is None or running.proc.exited:
            raise Conflict(f"VM {ctx.target_name} is not running", "only a running VM migrates live")
        last = 0.0

        def report(sample: MigrationProgress) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY or sample.phase == "finishing":
                last = now
                ctx.progress(0.05 + 0.9 * sample.fraction, sample.describe())

        ctx.progress(0.02, f"migrating to {endpoint.host}")
        outgoing = OutgoingMigration(running.proc, endpoint, tuning, report)
        result = await outgoing.run(confirm)
        # The VM runs on the destination: stop the local copy without a guest shutdown, and without the exit
        # watcher treating it as a crash (no restart policy, no store write).
        running.expected_exit = True
        for task in running.tasks:
            task.cancel()
        await running.proc.quit()
        await vm_lifecycle.untrack(agent, running)
    ctx.note(1.0, f"moved in {result.total_s:.1f} s, downtime {result.downtime_ms} ms")
    return result.model_dump(
        include={
            "total_s",
            "disk_s",
            "ram_s",
            "downtime_ms",
            "stopped_at",
            "postcopy",
            "ram_transferred",
            "passes",
            "attempts",
        }
    )
