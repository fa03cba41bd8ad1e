"""Job handlers: one coroutine per job kind, each a thin step list over the lifecycle and storage modules."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.engine.guest_agent import GuestAgent
from corral.errors import Conflict, NotFound
from corral.host import (
    backup_jobs,
    clone_jobs,
    export_jobs,
    fork_jobs,
    image_jobs,
    move_jobs,
    network_jobs,
    replication_jobs,
    resize_jobs,
    snapshot_jobs,
    storage,
    vm_lifecycle,
)
from corral.host.vm_lifecycle import discard_vm, wait_for_guest
from corral.spec.job import JobKind
from corral.spec.vm import PowerState
from corral.store.models import VM, Image, Snapshot, Volume

if TYPE_CHECKING:
    from corral.host.agent import Handler, JobContext


def _vm_id(ctx: JobContext) -> str:
    if ctx.target_id is None:
        raise NotFound(f"VM {ctx.target_name} not found")
    return ctx.target_id


async def vm_create(ctx: JobContext) -> dict[str, Any]:
    """Make the VM's disks; on any failure remove what was made and the VM itself, so nothing half-made stays."""
    agent, vm_id = ctx.agent, _vm_id(ctx)
    made: list[Volume] = []
    async with agent.vm_locks[vm_id]:
        try:
            with agent.store.session() as session:
                vm = session.get(VM, vm_id)
                if vm is None:
                    raise NotFound(f"VM {ctx.target_name} not found")
                new_volumes = [v for v in vm.volumes if v.state == "pending"]
                images = {v.backing_image: session.get(Image, v.backing_image) for v in new_volumes if v.backing_image}
            vm_lifecycle.check_firmware(agent, vm)
            for index, volume in enumerate(new_volumes):
                ctx.progress(0.1 + 0.3 * index / max(1, len(new_volumes)), f"creating disk {volume.name}")
                image = images.get(volume.backing_image) if volume.backing_image else None
                await storage.materialize(agent, volume, image)
                made.append(volume)
            with agent.store.session() as session:
                for volume in made:
                    row = session.get(Volume, volume.id)
                    if row is not None:
                        row.state = "ready"
            if ctx.params.get("start"):
                ctx.progress(0.4, "starting")
                await vm_lifecycle.start(agent, vm_id)
        except BaseException:
            await discard_vm(ctx, vm_id, {v.id for v in made})
            raise
    # The VM exists from here on: a guest that is slow to answer fails the wait, not the VM.
    if ctx.params.get("start") and ctx.params.get("wait"):
        await wait_for_guest(ctx, vm_id)
    return {"vm": ctx.target_name}


async def vm_start(ctx: JobContext) -> dict[str, Any]:
    vm_id = _vm_id(ctx)
    async with ctx.agent.vm_locks[vm_id]:
        result = await vm_lifecycle.start(ctx.agent, vm_id)
    if ctx.params.get("wait"):
        await wait_for_guest(ctx, vm_id)
    return result


async def vm_stop(ctx: JobContext) -> dict[str, Any]:
    vm_id = _vm_id(ctx)
    async with ctx.agent.vm_locks[vm_id]:
        return await vm_lifecycle.stop(
            ctx.agent,
            vm_id,
            force=bool(ctx.params.get("force")),
            timeout=ctx.params.get("timeout"),
            progress=ctx.note,
        )


async def vm_restart(ctx: JobContext) -> dict[str, Any]:
    vm_id = _vm_id(ctx)
    async with ctx.agent.vm_locks[vm_id]:
        ctx.progress(0.1, "stopping")
        stopped = await vm_lifecycle.stop(
            ctx.agent, vm_id, force=bool(ctx.params.get("force")), timeout=ctx.params.get("timeout")
        )
        ctx.progress(0.4, "starting")
        started = await vm_lifecycle.start(ctx.agent, vm_id)
    if ctx.params.get("wait"):
        await wait_for_guest(ctx, vm_id)
    return {**stopped, **started}


async def vm_pause(ctx: JobContext) -> None:
    vm_id = _vm_id(ctx)
    async with ctx.agent.vm_locks[vm_id]:
        await vm_lifecycle.pause(ctx.agent, vm_id)


async def vm_resume(ctx: JobContext) -> None:
    vm_id = _vm_id(ctx)
    async with ctx.agent.vm_locks[vm_id]:
        await vm_lifecycle.resume(ctx.agent, vm_id)


async def vm_delete(ctx: JobContext) -> dict[str, Any]:
    agent, vm_id = ctx.agent, _vm_id(ctx)
    keep = bool(ctx.params.get("keep_disks"))
    async with agent.vm_locks[vm_id]:
        if vm_id in agent.vms:
            ctx.progress(0.2, "stopping")
            await vm_lifecycle.stop(agent, vm_id, force=True)
        kept, removed = [], []
        with agent.store.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None:
                raise NotFound(f"VM {ctx.target_name} not found")
            for volume in list(vm.volumes):
                if keep:
                    volume.vm_id = None
                    kept.append(volume.name)
                    _return_to_root(storage.volume_path(agent, volume))
                else:
                    storage.remove(agent, volume)
                    session.delete(volume)
                    removed.append(volume.name)
            session.query(Snapshot).filter(Snapshot.vm_id == vm.id).delete()
            session.delete(vm)
            session.flush()
            storage.collect_bases(agent, session)
        vm_lifecycle.remove_run_dir(agent, vm_id)
    agent.vm_locks.pop(vm_id, None)
    agent.guest_locks.pop(vm_id, None)
    return {"kept_volumes": kept, "removed_volumes": removed}


def _return_to_root(path: Path) -> None:
    """A kept disk was owned by the deleted VM's uid, which a future VM may get: give it back to root."""
    with contextlib.suppress(OSError):
        os.chown(path, 0, 0)
        os.chmod(path, 0o600)


async def vm_exec(ctx: JobContext) -> dict[str, Any]:
    agent, vm_id = ctx.agent, _vm_id(ctx)
    running = agent.vms.get(vm_id)
    if running is None or running.proc.exited:
        raise Conflict(f"VM {ctx.target_name} is not running", f"start it with `corral vm start {ctx.target_name}`")
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is not None and vm.observed_state == PowerState.PAUSED:
            raise Conflict(f"VM {ctx.target_name} is paused", f"resume it with `corral vm resume {ctx.target_name}`")
    socket_path = running.proc.record.guest_agent_socket
    if socket_path is None:
        raise Conflict(f"VM {ctx.target_name} has no guest agent channel")
    timeout = float(ctx.params.get("timeout", 60))
    ctx.progress(0.1, "waiting for the guest agent")
    await vm_lifecycle.wait_ready(running, timeout)
    async with agent.guest_locks[vm_id], GuestAgent(socket_path) as guest:
        ctx.progress(0.3, f"running {ctx.params['argv'][0]}")
        stdin = ctx.params.get("stdin")
        result = await guest.exec(
            list(ctx.params["argv"]), timeout=timeout, stdin=stdin.encode() if isinstance(stdin, str) else None
        )
    return result.model_dump()


async def volume_create(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    with agent.store.session() as session:
        volume = session.get(Volume, ctx.target_id)
        if volume is None:
            raise NotFound(f"volume {ctx.target_name} not found")
    try:
        await storage.materialize(agent, volume, None)
    except BaseException:
        with agent.store.session() as session:
            row = session.get(Volume, volume.id)
            if row is not None:
                session.delete(row)
        raise
    with agent.store.session() as session:
        row = session.get(Volume, volume.id)
        if row is not None:
            row.state = "ready"
    return {"volume": volume.name, "size": volume.size}


async def volume_resize(ctx: JobContext) -> dict[str, Any]:
    """Grow a volume; on a running VM through QMP block_resize so the guest sees the new size at once."""
    agent = ctx.agent
    size = int(ctx.params["size"])
    with agent.store.session() as session:
        volume = session.get(Volume, ctx.target_id)
        if volume is None:
            raise NotFound(f"volume {ctx.target_name} not found")
        vm_id, index = volume.vm_id, volume.device_index
    running = agent.vms.get(vm_id) if vm_id else None
    if running is not None and not running.proc.exited:
        await running.proc.execute("block_resize", {"node-name": f"disk{index}", "size": size})
    else:
        path = storage.volume_path(agent, volume)
        await asyncio.to_thread(qemu_img.resize, path, size, agent.settings.qemu_img_binary)
    with agent.store.session() as session:
        row = session.get(Volume, volume.id)
        if row is not None:
            row.size = size
    return {"volume": volume.name, "size": size}


async def volume_delete(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    with agent.store.session() as session:
        volume = session.get(Volume, ctx.target_id)
        if volume is None:
            raise NotFound(f"volume {ctx.target_name} not found")
        if volume.vm_id is not None:
            raise Conflict(f"volume {volume.name} is attached to a VM", "delete or detach the VM first")
        storage.remove(agent, volume)
        session.delete(volume)
        session.flush()
        storage.collect_bases(agent, session)
    return {"volume": ctx.target_name}


def build_handlers() -> dict[str, Handler]:
    return {
        JobKind.VM_CREATE: vm_create,
        JobKind.VM_START: vm_start,
        JobKind.VM_STOP: vm_stop,
        JobKind.VM_RESTART: vm_restart,
        JobKind.VM_PAUSE: vm_pause,
        JobKind.VM_RESUME: vm_resume,
        JobKind.VM_DELETE: vm_delete,
        JobKind.VM_EXEC: vm_exec,
        JobKind.VOLUME_CREATE: volume_create,
        JobKind.VOLUME_RESIZE: volume_resize,
        JobKind.VOLUME_DELETE: volume_delete,
        JobKind.IMAGE_BUILD: image_jobs.build,
        JobKind.IMAGE_IMPORT: image_jobs.import_image,
        JobKind.IMAGE_DELETE: image_jobs.delete,
        JobKind.VM_CLONE: clone_jobs.vm_clone,
        JobKind.VM_FORK: fork_jobs.fork,
        JobKind.TEMPLATE_CREATE: clone_jobs.template_create,
        JobKind.TEMPLATE_DELETE: clone_jobs.template_delete,
        JobKind.SNAPSHOT_CREATE: snapshot_jobs.create,
        JobKind.SNAPSHOT_REVERT: snapshot_jobs.revert,
        JobKind.SNAPSHOT_DELETE: snapshot_jobs.delete,
        JobKind.NETWORK_CREATE: network_jobs.network_create,
        JobKind.NETWORK_DELETE: network_jobs.network_delete,
        JobKind.VM_NIC_ADD: network_jobs.vm_nic_add,
        JobKind.VM_NIC_REMOVE: network_jobs.vm_nic_remove,
        JobKind.VM_PORT_FORWARD: network_jobs.vm_port_forward,
        JobKind.VM_RESIZE: resize_jobs.vm_resize,
        JobKind.VM_DISK_ADD: resize_jobs.vm_disk_add,
        JobKind.VM_DISK_REMOVE: resize_jobs.vm_disk_remove,
        JobKind.VM_MIGRATE: move_jobs.vm_migrate,
        JobKind.VM_MIGRATE_IN: move_jobs.vm_migrate_in,
        JobKind.HOST_DRAIN: move_jobs.host_drain,
        JobKind.BACKUP_CREATE: backup_jobs.create,
        JobKind.BACKUP_DELETE: backup_jobs.delete,
        JobKind.BACKUP_RESTORE: backup_jobs.restore,
        JobKind.BACKUP_VERIFY: backup_jobs.verify,
        JobKind.VM_EXPORT: export_jobs.export,
        JobKind.VM_IMPORT: export_jobs.import_,
        JobKind.VM_REPLICATE: replication_jobs.replicate,
        JobKind.VM_REPLICA_RECEIVE: replication_jobs.receive,
        JobKind.VM_REPLICA_REMOVE: replication_jobs.remove,
        JobKind.VM_FAILOVER: replication_jobs.failover,
    }
