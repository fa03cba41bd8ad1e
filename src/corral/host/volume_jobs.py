"""Job handlers of free-standing volumes: create, grow (live through QMP when a running VM has it) and delete."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.errors import Conflict, NotFound
from corral.host import storage
from corral.spec.job_params import VolumeResizeParams
from corral.store.models import Volume

if TYPE_CHECKING:
    from corral.host.job_context import JobContext


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
    size = ctx.params_as(VolumeResizeParams).size
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
