"""Clones and templates on this host.

- Full clone: every disk copied and flattened (``qemu-img convert``), from the VM's current state or from one of
  its snapshots. A running source is read through a temporary internal snapshot, so the copy is consistent
  without stopping it.
- Linked clone: the source's disks are frozen into read-only bases and both VMs get qcow2 overlays on them:
  instant, and the bases live as long as any volume names them.
- Template: a flattened read-only copy of a VM's disks; VMs made from it are overlays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.engine import snapshots as engine_snapshots
from corral.errors import Conflict, InsufficientResources, NotFound
from corral.host import storage, vm_lifecycle, vm_plan
from corral.host.layout import inside_pool, pool_file
from corral.spec.job_params import TemplateCreateParams, VMCloneParams
from corral.store.models import VM, Snapshot, Template, Volume, new_id

BASE_MODE = 0o400  # frozen bases and template disks: root reads them; a VM's QEMU by a grant at its launch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from sqlalchemy.orm import Session

    from corral.host.agent import Agent
    from corral.host.job_context import JobContext


def _volumes(agent: Agent, vm_id: str) -> list[Volume]:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            raise NotFound("the source VM no longer exists")
        return sorted(vm.volumes, key=lambda v: v.device_index)


@contextlib.asynccontextmanager
async def consistent_source(
    agent: Agent, source_id: str, snapshot_tag: str | None
) -> AsyncIterator[tuple[str | None, bool]]:
    """Yield the snapshot tag to copy from: the one asked for, or a temporary one of a running source."""
    running = agent.vms.get(source_id)
    if snapshot_tag is not None or running is None or running.proc.exited:
        yield snapshot_tag, running is not None
        return
    volumes = _volumes(agent, source_id)
    nodes = [vm_plan.disk_node(v.device_index) for v in volumes if v.format == "qcow2"]
    tag = f"corral-copy-{new_id()[:8]}"
    await engine_snapshots.save_disks_live(running.proc, tag, nodes)
    try:
        yield tag, True
    finally:
        with contextlib.suppress(Exception):
            await engine_snapshots.delete_live(running.proc, tag, nodes)


async def copy_disks(
    ctx: JobContext,
    sources: list[Path],
    targets: list[Path],
    tag: str | None,
    share: bool,
    made: Callable[[int], None] | None = None,
) -> None:
    """Copy each source into its target, which is claimed first (created exclusively: see storage.claim);
    ``made(index)`` is told of each target as soon as it is this job's, so a failure removes only those."""
    binary = ctx.agent.settings.qemu_img_binary
    loop = asyncio.get_running_loop()
    span = 0.8 / len(sources)
    for index, (source, target) in enumerate(zip(sources, targets, strict=True)):
        storage.claim(target)
        if made is not None:
            made(index)
        last = [-1.0]

        def report(fraction: float, index: int = index, name: str = source.name, last: list[float] = last) -> None:
            if fraction - last[0] >= 0.02 or fraction >= 1.0:  # qemu-img reports often; the store needn't hear all
                last[0] = fraction
                loop.call_soon_threadsafe(ctx.note, 0.1 + span * (index + fraction), f"copying {name}")

        await asyncio.to_thread(qemu_img.copy_with_progress, source, target, tag, share, report, binary)
        ctx.check_cancelled()


async def vm_clone(ctx: JobContext) -> dict[str, Any]:
    """Make the new VM's disks from the source's, then optionally start it; on failure nothing remains."""
    from corral.host.vm_lifecycle import discard_vm

    agent, new_id_ = ctx.agent, ctx.vm_id()
    params = ctx.params_as(VMCloneParams)
    source_id, linked = params.source_id, params.linked
    made: set[str] = set()
    try:
        async with agent.vm_locks[source_id]:
            sources = _volumes(agent, source_id)
            targets = _volumes(agent, new_id_)
            if linked:
                await _link(ctx, sources, targets, made)
            else:
                async with consistent_source(agent, source_id, params.snapshot_tag) as (tag, share):
                    await copy_disks(
                        ctx,
                        [storage.volume_path(agent, v) for v in sources],
                        [storage.volume_path(agent, v) for v in targets],
                        tag,
                        share,
                        lambda index: made.add(targets[index].id),
                    )
        with agent.store.session() as session:
            for volume in targets:
                row = session.get(Volume, volume.id)
                if row is None:
                    raise NotFound(f"volume {volume.name} no longer exists")
                row.state = "ready"
        if params.start:
            async with agent.vm_locks[new_id_]:
                await vm_lifecycle.start(agent, new_id_)
    except BaseException as exc:
        from corral.host.snapshot_jobs import out_of_space

        pool_full = out_of_space([storage.volume_path(agent, v) for v in _volumes(agent, new_id_)])
        await discard_vm(ctx, new_id_, made)  # only the files this job made; the pending rows go regardless
        if pool_full and isinstance(exc, Exception):
            raise InsufficientResources(
                f"the storage pool ran out of space while cloning into {ctx.target_name}; the partial copy was removed",
                "free space in the pool",
            ) from exc
        raise
    if params.start and params.wait:
        from corral.host.vm_lifecycle import wait_for_guest

        await wait_for_guest(ctx, new_id_)
    return {"vm": ctx.target_name, "linked": linked}


async def _link(ctx: JobContext, sources: list[Volume], targets: list[Volume], made: set[str]) -> None:
    """Freeze each source disk into a read-only base (same data, new name) and put overlays on it for both VMs.
    The source keeps its volume path, so nothing else about it changes. The base is a new name of the source's
    inode (a hard link, which fails rather than replace a file already there); the target's overlay is claimed
    like any new disk and added to ``made`` once it is this job's."""
    agent = ctx.agent
    binary = agent.settings.qemu_img_binary
    for source, target in zip(sources, targets, strict=True):
        pool = agent.layout.pool(source.pool)
        base_rel = f"{storage.BASES}/{source.id}-{new_id()[:8]}.qcow2"
        base = pool_file(pool, base_rel)
        storage.make_dir(base.parent)
        source_path = storage.volume_path(agent, source)
        target_path = storage.claim(storage.volume_path(agent, target), f"volume {target.name}")
        made.add(target.id)
        os.link(source_path, base, follow_symlinks=False)
        os.unlink(source_path)
        try:
            os.chown(base, 0, 0)  # the source VM's uid owned it: a base is root's, read through per-VM grants
            os.chmod(base, BASE_MODE)
            storage.claim(source_path)
            # Both overlays at once: each is a qemu-img process (~15 ms), most of a linked clone's time. Both end
            # before a failure is raised, so the rollback never races a qemu-img still writing the source's.
            outcomes = await asyncio.gather(
                asyncio.to_thread(qemu_img.create_overlay, source_path, base, "qcow2", None, binary),
                asyncio.to_thread(qemu_img.create_overlay, target_path, base, "qcow2", None, binary),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            source_path.unlink(missing_ok=True)
            os.rename(base, source_path)
            raise
        with agent.store.session() as session:
            for volume in (source, target):
                row = session.get(Volume, volume.id)
                if row is None:
                    raise NotFound(f"volume {volume.name} no longer exists")
                row.backing_path = base_rel


async def template_create(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    with agent.store.session() as session:
        template = session.get(Template, ctx.target_id)
        if template is None:
            raise NotFound(f"template {ctx.target_name} not found")
        source_id = ctx.params_as(TemplateCreateParams).source_id
    directory_rel = f"{storage.TEMPLATES}/{template.id}"
    pool = agent.layout.pool()
    directory = pool_file(pool, directory_rel)
    made_dir = False
    try:
        storage.make_dir(directory.parent)
        try:
            directory.mkdir(mode=storage.DIR_MODE)  # the template's own: one that is already there is not ours
        except FileExistsError:
            raise Conflict(
                f"a directory is already where template {ctx.target_name} would be made",
                "an administrator must move it away",
            ) from None
        made_dir = True
        async with agent.vm_locks[source_id]:
            sources = _volumes(agent, source_id)
            targets = [pool_file(pool, f"{directory_rel}/disk{i}.qcow2") for i in range(len(sources))]
            async with consistent_source(agent, source_id, None) as (tag, share):
                await copy_disks(ctx, [storage.volume_path(agent, v) for v in sources], targets, tag, share)
        for target in targets:
            os.chmod(target, BASE_MODE)
        with agent.store.session() as session:
            row = session.get(Template, template.id)
            if row is None:
                raise NotFound(f"template {ctx.target_name} was deleted meanwhile")
            row.disks = [{"path": f"{directory_rel}/disk{i}.qcow2", "size": v.size} for i, v in enumerate(sources)]
            row.state = "ready"
    except BaseException:
        if made_dir:
            shutil.rmtree(directory, ignore_errors=True)
        with agent.store.session() as session:
            row = session.get(Template, template.id)
            if row is not None:
                session.delete(row)
        raise
    return {"template": ctx.target_name}


async def template_delete(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    with agent.store.session() as session:
        template = session.get(Template, ctx.target_id)
        if template is None:
            raise NotFound(f"template {ctx.target_name} not found")
        prefix = f"{storage.TEMPLATES}/{template.id}/"
        users = session.query(Volume).filter(Volume.backing_path.startswith(prefix)).count()
        if users:
            raise Conflict(f"template {ctx.target_name} still has linked clones")
        shutil.rmtree(inside_pool(agent.layout.pool(), prefix.rstrip("/")), ignore_errors=True)
        session.delete(template)
    return {"template": ctx.target_name}


def snapshot_tag(session: Session, vm_id: str, name: str) -> str:
    snapshot = session.query(Snapshot).filter(Snapshot.vm_id == vm_id, Snapshot.name == name).first()
    if snapshot is None:
        raise NotFound(f"snapshot {name} not found")
    return snapshot.tag
