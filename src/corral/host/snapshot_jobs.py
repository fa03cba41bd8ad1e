"""Snapshot jobs on this host: create, revert and delete, live (QMP) or offline (qemu-img)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import snapshots as engine_snapshots
from corral.engine.argv import UEFI_VARS_NODE
from corral.engine.guest_agent import GuestAgent
from corral.errors import CorralError, InsufficientResources, NotFound
from corral.host import storage, vm_lifecycle, vm_plan
from corral.host.firmware import vars_path
from corral.spec.job_params import SnapshotParams
from corral.spec.vm import PowerState
from corral.store.models import VM, Snapshot

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from corral.host.agent import Agent
    from corral.host.job_context import JobContext
    from corral.host.vm_lifecycle import RunningVM


def _disks(agent: Agent, vm: VM, tag: str | None = None) -> tuple[list[str], list[Path]]:
    """QMP node names and files of the disks a snapshot covers: every writable qcow2 disk of the VM, and a UEFI
    VM's firmware variable store (its boot entries go back with its disks; QEMU's -loadvm also refuses a snapshot
    that any writable node lacks). For an existing snapshot (``tag``), the store counts only if it holds that
    snapshot: one taken before the VM's first UEFI start, when the store did not exist yet, has none."""
    nodes, paths = [], []
    for volume in sorted(vm.volumes, key=lambda v: v.device_index):
        if volume.format == "qcow2":
            nodes.append(vm_plan.disk_node(volume.device_index))
            paths.append(storage.volume_path(agent, volume))
    store = vars_path(agent.layout.vm_run_dir(vm.id))
    if store.exists() and (
        tag is None
        or any(s.get("name") == tag for s in engine_snapshots.list_offline(store, agent.settings.qemu_img_binary))
    ):
        nodes.append(UEFI_VARS_NODE)
        paths.append(store)
    return nodes, paths


def _load(ctx: JobContext) -> tuple[VM, Snapshot]:
    with ctx.agent.store.session() as session:
        vm = session.get(VM, ctx.target_id)
        snapshot = session.get(Snapshot, ctx.params_as(SnapshotParams).snapshot_id)
        if vm is None or snapshot is None or snapshot.vm_id != vm.id:
            raise NotFound(f"snapshot of VM {ctx.target_name} not found")
        vm.volumes  # noqa: B018 - load before the session closes
        return vm, snapshot


def _vm_row(session: Session, vm: VM) -> VM:
    """The VM's row again, in a later transaction: NotFound if it went meanwhile."""
    row = session.get(VM, vm.id)
    if row is None:
        raise NotFound(f"VM {vm.name} no longer exists")
    return row


def _running(agent: Agent, vm_id: str) -> RunningVM | None:
    running = agent.vms.get(vm_id)
    return running if running is not None and not running.proc.exited else None


@contextlib.asynccontextmanager
async def frozen_guest(agent: Agent, running: RunningVM) -> AsyncIterator[bool]:
    """Freeze guest filesystems around a disk-only snapshot when the guest agent answers; carry on without."""
    frozen = False
    socket_path = running.proc.record.guest_agent_socket
    if socket_path is not None and running.ready.done() and not running.ready.exception():
        with contextlib.suppress(CorralError, TimeoutError, OSError):
            async with GuestAgent(socket_path) as guest:
                await guest.call("guest-fsfreeze-freeze", timeout=10)
                frozen = True
    try:
        yield frozen
    finally:
        if frozen and socket_path is not None:  # frozen through it
            with contextlib.suppress(CorralError, TimeoutError, OSError):
                async with GuestAgent(socket_path) as guest:
                    await guest.call("guest-fsfreeze-thaw", timeout=10)


def out_of_space(paths: list[Path], margin: int = 16 << 20) -> bool:
    """QEMU reports a full disk as a plain I/O error; the free space tells what really happened."""
    return any(shutil.disk_usage(path.parent).free < margin for path in paths if path.parent.exists())


async def _undo_partial(agent: Agent, running: RunningVM | None, tag: str, nodes: list[str], paths: list[Path]) -> None:
    """After a failed save (a full pool, say): the guest runs again first, then whatever was written of the
    snapshot is dropped, which also gives the space back."""
    if running is not None and not running.proc.exited:
        with contextlib.suppress(Exception):
            if await running.proc.run_state() in ("paused", "io-error", "postmigrate"):
                await running.proc.resume()
        with contextlib.suppress(Exception):
            await engine_snapshots.delete_live(running.proc, tag, nodes)
    else:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(engine_snapshots.delete_offline, paths, tag, agent.settings.qemu_img_binary)


async def create(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    async with agent.vm_locks[ctx.vm_id()]:
        vm, snapshot = _load(ctx)
        nodes, paths = _disks(agent, vm)
        running = _running(agent, vm.id)
        binary = agent.settings.qemu_img_binary
        try:
            if running is not None and snapshot.memory:
                ctx.progress(0.2, "saving disks, memory and device state (the guest is paused meanwhile)")
                await engine_snapshots.save_live(running.proc, snapshot.tag, nodes)
            elif running is not None:
                async with frozen_guest(agent, running) as frozen:
                    ctx.progress(0.2, "saving disks" + (" (filesystems frozen)" if frozen else ""))
                    await engine_snapshots.save_disks_live(running.proc, snapshot.tag, nodes)
            else:
                ctx.progress(0.2, "saving disks")
                await asyncio.to_thread(engine_snapshots.save_offline, paths, snapshot.tag, binary)
        except BaseException as exc:
            pool_full = out_of_space(paths)
            await _undo_partial(agent, running, snapshot.tag, nodes, paths)
            with agent.store.session() as session:
                row = session.get(Snapshot, snapshot.id)
                if row is not None:
                    session.delete(row)
            if pool_full and isinstance(exc, Exception):
                raise InsufficientResources(
                    f"the storage pool ran out of space while saving snapshot {snapshot.name}; nothing was kept",
                    "free space in the pool, or take a --disk-only snapshot",
                ) from exc
            raise
        size = await asyncio.to_thread(engine_snapshots.vm_state_size, paths[0], snapshot.tag, binary)
        with agent.store.session() as session:
            row = session.get(Snapshot, snapshot.id)
            if row is None:
                raise NotFound(f"snapshot {snapshot.name} of VM {vm.name} was deleted meanwhile")
            row.state = "ready"
            row.vm_state_size = size
            _vm_row(session, vm).current_snapshot = snapshot.id
    return {"snapshot": snapshot.name, "memory": snapshot.memory, "vm_state_size": size}


async def revert(ctx: JobContext) -> dict[str, Any]:
    """Back to the snapshot. With memory the VM runs on from that instant; disk-only keeps the power state
    (a running VM is restarted on the old disks)."""
    agent = ctx.agent
    async with agent.vm_locks[ctx.vm_id()]:
        vm, snapshot = _load(ctx)
        nodes, paths = _disks(agent, vm, snapshot.tag)
        running = _running(agent, vm.id)
        binary = agent.settings.qemu_img_binary
        if running is not None and snapshot.memory:
            ctx.note(0.2, "loading disks, memory and device state")
            await engine_snapshots.load_live(running.proc, snapshot.tag, nodes)
            vm_lifecycle.update_vm(agent, vm.id, observed_state=PowerState.RUNNING, desired_state=PowerState.RUNNING)
        elif snapshot.memory:
            ctx.note(0.2, "starting from the snapshot")
            await asyncio.to_thread(engine_snapshots.load_offline, paths, snapshot.tag, binary)
            await vm_lifecycle.start(agent, vm.id, loadvm=snapshot.tag)
        else:
            was_running = running is not None
            if was_running:
                ctx.note(0.1, "stopping")
                await vm_lifecycle.stop(agent, vm.id, force=True)
            ctx.note(0.4, "restoring disks")
            await asyncio.to_thread(engine_snapshots.load_offline, paths, snapshot.tag, binary)
            if was_running:
                ctx.note(0.6, "starting")
                await vm_lifecycle.start(agent, vm.id)
        with agent.store.session() as session:
            _vm_row(session, vm).current_snapshot = snapshot.id
    return {"snapshot": snapshot.name, "memory": snapshot.memory}


async def delete(ctx: JobContext) -> dict[str, Any]:
    """Drop one snapshot: its children hang from its parent afterwards, and no other snapshot changes."""
    agent = ctx.agent
    async with agent.vm_locks[ctx.vm_id()]:
        vm, snapshot = _load(ctx)
        nodes, paths = _disks(agent, vm, snapshot.tag)
        running = _running(agent, vm.id)
        if running is not None:
            await engine_snapshots.delete_live(running.proc, snapshot.tag, nodes)
        else:
            await asyncio.to_thread(
                engine_snapshots.delete_offline, paths, snapshot.tag, agent.settings.qemu_img_binary
            )
        with agent.store.session() as session:
            for child in session.query(Snapshot).filter(Snapshot.parent_id == snapshot.id):
                child.parent_id = snapshot.parent_id
            row = _vm_row(session, vm)
            if row.current_snapshot == snapshot.id:
                row.current_snapshot = snapshot.parent_id
            session.delete(session.get(Snapshot, snapshot.id))
    return {"snapshot": snapshot.name}
