"""Job handlers of a VM's life: create, start, stop, restart, pause, resume, delete, and a command in its guest.

Each is a thin step list over corral.host.vm_lifecycle, under the VM's lock; waiting for the guest agent happens
outside the lock, so a `vm stop` can end a boot that hangs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.engine.guest_agent import GuestAgent
from corral.errors import Conflict, NotFound
from corral.host import storage, vm_lifecycle, vm_plan
from corral.host.vm_lifecycle import discard_vm, wait_for_guest
from corral.spec.job_params import (
    VMCreateParams,
    VMDeleteParams,
    VMExecParams,
    VMRestartParams,
    VMStartParams,
    VMStopParams,
)
from corral.spec.vm import PowerState
from corral.store.models import VM, Image, Snapshot, Volume

if TYPE_CHECKING:
    from corral.host.job_context import JobContext


async def vm_create(ctx: JobContext) -> dict[str, Any]:
    """Make the VM's disks; on any failure remove what was made and the VM itself, so nothing half-made stays."""
    agent, vm_id, params = ctx.agent, ctx.vm_id(), ctx.params_as(VMCreateParams)
    made: list[Volume] = []
    async with agent.vm_locks[vm_id]:
        try:
            with agent.store.session() as session:
                vm = session.get(VM, vm_id)
                if vm is None:
                    raise NotFound(f"VM {ctx.target_name} not found")
                new_volumes = [v for v in vm.volumes if v.state == "pending"]
                images = {v.backing_image: session.get(Image, v.backing_image) for v in new_volumes if v.backing_image}
            vm_plan.check_firmware(agent, vm)
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
            if params.start:
                ctx.progress(0.4, "starting")
                await vm_lifecycle.start(agent, vm_id)
        except BaseException:
            await discard_vm(ctx, vm_id, {v.id for v in made})
            raise
    # The VM exists from here on: a guest that is slow to answer fails the wait, not the VM.
    if params.start and params.wait:
        await wait_for_guest(ctx, vm_id, params.ready_timeout)
    return {"vm": ctx.target_name}


async def vm_start(ctx: JobContext) -> dict[str, Any]:
    vm_id, params = ctx.vm_id(), ctx.params_as(VMStartParams)
    async with ctx.agent.vm_locks[vm_id]:
        result = await vm_lifecycle.start(ctx.agent, vm_id)
    if params.wait:
        await wait_for_guest(ctx, vm_id, params.ready_timeout)
    return result


async def vm_stop(ctx: JobContext) -> dict[str, Any]:
    vm_id, params = ctx.vm_id(), ctx.params_as(VMStopParams)
    async with ctx.agent.vm_locks[vm_id]:
        return await vm_lifecycle.stop(ctx.agent, vm_id, force=params.force, timeout=params.timeout, progress=ctx.note)


async def vm_restart(ctx: JobContext) -> dict[str, Any]:
    vm_id, params = ctx.vm_id(), ctx.params_as(VMRestartParams)
    async with ctx.agent.vm_locks[vm_id]:
        ctx.progress(0.1, "stopping")
        stopped = await vm_lifecycle.stop(ctx.agent, vm_id, force=params.force, timeout=params.timeout)
        ctx.progress(0.4, "starting")
        started = await vm_lifecycle.start(ctx.agent, vm_id)
    if params.wait:
        await wait_for_guest(ctx, vm_id)
    return {**stopped, **started}


async def vm_pause(ctx: JobContext) -> None:
    vm_id = ctx.vm_id()
    async with ctx.agent.vm_locks[vm_id]:
        await vm_lifecycle.pause(ctx.agent, vm_id)


async def vm_resume(ctx: JobContext) -> None:
    vm_id = ctx.vm_id()
    async with ctx.agent.vm_locks[vm_id]:
        await vm_lifecycle.resume(ctx.agent, vm_id)


async def vm_delete(ctx: JobContext) -> dict[str, Any]:
    agent, vm_id = ctx.agent, ctx.vm_id()
    keep = ctx.params_as(VMDeleteParams).keep_disks
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
                    storage.return_to_root(storage.volume_path(agent, volume))
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


async def vm_exec(ctx: JobContext) -> dict[str, Any]:
    agent, vm_id, params = ctx.agent, ctx.vm_id(), ctx.params_as(VMExecParams)
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
    timeout = params.timeout
    ctx.progress(0.1, "waiting for the guest agent")
    await vm_lifecycle.wait_ready(running, timeout)
    async with agent.guest_locks[vm_id], GuestAgent(socket_path) as guest:
        ctx.progress(0.3, f"running {params.argv[0]}")
        stdin = params.stdin.encode() if params.stdin is not None else None
        result = await guest.exec(list(params.argv), timeout=timeout, stdin=stdin)
    return result.model_dump()
