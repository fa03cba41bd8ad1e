"""Replication on the agents: the copy (``vm.replicate``, the VM's host), its reception (``vm.replica-receive``,
the partner), failover (``vm.failover``) and removal (``vm.replica-remove``). corral.cluster.replication writes
the first two together; they meet through their jobs' parameters, as the halves of a migration do:

1. partner: finish any copy a crash left half applied, then publish ``have`` (the replica's disk sizes);
2. source: decide ``mode``: incremental when every disk still carries the bitmap of the last applied copy and
   the partner has every disk at the same size, else full; publish it;
3. partner: make the targets: a blank ``disk<N>.full.qcow2`` (full) or ``disk<N>.incoming.qcow2``, an overlay on
   the replica (incremental); export them over NBD on this host's pool address; publish ``endpoint``;
4. source: attach the exports, then in one QMP transaction (guest filesystems frozen when the guest agent
   answers) start the copy and a new bitmap that tracks what changes after it; publish ``copied``;
5. partner: only now fold the layer in: a full copy replaces the replica (a rename), an incremental one is
   renamed ``.applying`` and committed into it (``qemu-img commit``; redone after a crash, which is why the
   rename comes first); record the copy on the replica's row; publish ``applied``;
6. source: keep only the new bitmap. If the partner failed after the copy, every replication bitmap goes: the
   copy cleared the old one, so only a full copy is right next time.

The replica is ``<pool>/.replicas/<replica id>/disk<N>.qcow2`` on the partner: a standalone qcow2 (no backing
file) holding the disk as it was at the last applied copy. The names come from the store's ids, never from a
caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import backup as engine_backup
from corral.engine import qemu_img
from corral.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.host import storage, vm_lifecycle, vm_plan
from corral.host.backup_jobs import running_vm, storage_daemon_binary
from corral.host.layout import pool_file
from corral.host.move_jobs import free_port_on, host_alive, load_job, publish_job
from corral.host.snapshot_jobs import frozen_guest
from corral.spec.job import JobState
from corral.spec.job_params import (
    FailoverParams,
    JobParams,
    ReplicaReceiveParams,
    ReplicaRemoveParams,
    ReplicateParams,
    parse,
)
from corral.store.models import VM, Replica, Volume

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext

BITMAP_PREFIX = "rpl-"  # never "corral-": backups keep only their own bitmaps, and these must survive them
REPLICA_DIR = ".replicas"
POLL = 0.1
STEP_TIMEOUT = 600.0  # seconds the other half may take to reach its next step
_ID = re.compile(r"^[0-9a-f]{32}$")


def replica_dir(agent: Agent, pool: str, replica_id: str) -> Path:
    if not _ID.match(replica_id):
        raise InvalidInput(f"replica id {replica_id!r} is malformed", "the store row is damaged")
    return agent.layout.pool(pool) / REPLICA_DIR / replica_id


def _files(directory: Path, index: int) -> dict[str, Path]:
    return {
        kind: directory / f"disk{index}{suffix}.qcow2"
        for kind, suffix in (("base", ""), ("full", ".full"), ("incoming", ".incoming"), ("applying", ".applying"))
    }


def recover(directory: Path, index: int, binary: str) -> None:
    """Finish what a crash interrupted: a layer being committed is committed again (it holds the whole copy, so
    doing it twice writes the same blocks); a layer being received, or a full copy, is dropped."""
    files = _files(directory, index)
    if files["applying"].exists():
        qemu_img.run(["commit", "-q", "-d", "-f", "qcow2", str(files["applying"])], binary, timeout=3600)
        files["applying"].unlink()
    files["incoming"].unlink(missing_ok=True)
    files["full"].unlink(missing_ok=True)


async def _await_param(
    ctx: JobContext,
    job_id: str,
    model: type[JobParams],
    key: str,
    what: str,
    timeout: float = STEP_TIMEOUT,
    host: str | None = None,
) -> Any:
    """Wait until the other half publishes ``key`` (a field of its kind's ``model`` that is None until then); its
    job ending without it ends this one, and so does its ``host`` going silent (a dead host's job never ends by
    itself)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        job = load_job(ctx.agent, job_id)
        value = getattr(parse(model, job.params), key)
        if value is not None:
            return value
        if JobState(job.state).finished:
            raise Conflict(
                f"the other half of the copy ended ({job.state}: {job.message or job.error or ''}) before {what}"
            )
        if loop.time() > deadline:
            raise Conflict(f"the other half of the copy did not reach {what} within {timeout:.0f} s")
        if host is not None and not host_alive(ctx.agent, host):
            raise Conflict(f"host {host} stopped answering before {what}")
        ctx.check_cancelled()
        await asyncio.sleep(POLL)


# -- the partner ------------------------------------------------------------------------------------------------


async def receive(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    binary = agent.settings.qemu_img_binary
    params = ctx.params_as(ReplicaReceiveParams)
    replica_id, source_job, disks = params.replica_id, params.source_job, params.disks
    if source_job is None:  # written with the job, in the same transaction: never missing but in a broken row
        raise NotFound(f"the replication of VM {ctx.target_name} has no source job")
    if not agent.address:
        raise Conflict(
            f"host {agent.host_name} has no address other hosts can reach", "restart its agent with --address ADDRESS"
        )
    dirs = [replica_dir(agent, d["pool"], replica_id) for d in disks]
    have: dict[str, int | None] = {}
    for d, directory in zip(disks, dirs, strict=True):
        storage.make_dir(directory.parent)
        storage.make_dir(directory)
        await asyncio.to_thread(recover, directory, d["index"], binary)
        base = _files(directory, d["index"])["base"]
        have[str(d["index"])] = int(qemu_img.info(base, binary)["virtual-size"]) if base.exists() else None
    publish_job(agent, ctx.job_id, have=have)
    ctx.progress(0.05, "waiting for the source")
    mode = await _await_param(
        ctx, source_job, ReplicateParams, "mode", "choosing full or incremental", host=params.source
    )
    targets: list[Path] = []
    try:
        for d, directory in zip(disks, dirs, strict=True):
            files = _files(directory, d["index"])
            target = storage.claim(files["full" if mode == "full" else "incoming"], "a replica layer")
            targets.append(target)
            if mode == "full":
                await asyncio.to_thread(qemu_img.create_blank, target, int(d["size"]), binary)
            else:
                await asyncio.to_thread(
                    qemu_img.run,
                    [
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        files["base"].name,
                        "-F",
                        "qcow2",
                        str(target),
                        str(int(d["size"])),
                    ],
                    binary,
                )
        port = free_port_on(agent.address)
        socket = agent.layout.home / "run" / f"rpl-{ctx.job_id[:12]}.qmp"
        socket.parent.mkdir(parents=True, exist_ok=True)
        exports = {str(d["index"]): f"rpl-{replica_id[:12]}-{d['index']}" for d in disks}
        async with engine_backup.StorageDaemon(targets, socket, storage_daemon_binary(agent)) as daemon:
            await daemon.execute(
                "nbd-server-start", {"addr": {"type": "inet", "data": {"host": agent.address, "port": str(port)}}}
            )
            for position, d in enumerate(disks):
                name = exports[str(d["index"])]
                await daemon.execute(
                    "block-export-add",
                    {"type": "nbd", "id": name, "node-name": f"disk{position}", "name": name, "writable": True},
                )
            publish_job(agent, ctx.job_id, endpoint={"host": agent.address, "port": port, "exports": exports})
            ctx.progress(0.1, f"receiving a {mode} copy")
            copied = await _await_param(
                ctx, source_job, ReplicateParams, "copied", "the end of the copy", timeout=3600, host=params.source
            )
            for name in exports.values():
                with contextlib.suppress(CorralError):
                    await daemon.execute("block-export-del", {"id": name, "mode": "hard"})
            with contextlib.suppress(CorralError):
                await daemon.execute("nbd-server-stop")
        received = sum(engine_backup.allocated_bytes(t) for t in targets)
        ctx.progress(0.9, "applying the copy")
        for d, directory, target in zip(disks, dirs, targets, strict=True):
            files = _files(directory, d["index"])
            if mode == "full":
                os.replace(target, files["base"])
            else:
                os.replace(target, files["applying"])
        targets.clear()  # from here a crash is finished by ``recover``, not undone
        for d, directory in zip(disks, dirs, strict=True):
            await asyncio.to_thread(recover, directory, d["index"], binary)
    except BaseException as exc:
        for target in targets:
            target.unlink(missing_ok=True)
        _record_failure(agent, replica_id, exc)
        raise
    started = datetime.fromisoformat(copied["at"])
    seconds = round((datetime.now(UTC) - started).total_seconds(), 2)
    with agent.store.session() as session:
        row = session.get(Replica, replica_id)
        if row is None:  # removed meanwhile: its files go with it
            for directory in dirs:
                shutil.rmtree(directory, ignore_errors=True)
            raise NotFound(f"the replica of VM {ctx.target_name} was removed during the copy")
        row.state, row.copies, row.last_at = "ready", row.copies + 1, started
        row.last_kind, row.last_consistent, row.last_bytes = mode, bool(copied["frozen"]), received
        row.last_seconds, row.bitmap, row.disks, row.last_error = seconds, copied["bitmap"], disks, None
    publish_job(agent, ctx.job_id, applied=True)
    return {"vm": ctx.target_name, "kind": mode, "bytes": received, "seconds": seconds, "frozen": copied["frozen"]}


def _record_failure(agent: Agent, replica_id: str, exc: BaseException) -> None:
    with contextlib.suppress(Exception), agent.store.session() as session:
        row = session.get(Replica, replica_id)
        if row is not None:
            row.last_error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            if row.last_at is None:
                row.state = "failed"


# -- the VM's host ----------------------------------------------------------------------------------------------


async def replicate(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    vm_id = ctx.target_id
    params = ctx.params_as(ReplicateParams)
    receive_job, disks, partner = params.receive_job, params.disks, params.partner
    if vm_id is None:
        raise NotFound(f"VM {ctx.target_name} not found")
    ctx.progress(0.02, f"waiting for {partner}")
    have = await _await_param(ctx, receive_job, ReplicaReceiveParams, "have", "looking at its replica", host=partner)
    async with agent.vm_locks[vm_id]:
        running = running_vm(agent, vm_id)
        if running is None:
            raise Conflict(f"VM {ctx.target_name} is not running", "only a running VM is replicated")
        monitor = running.proc
        nodes = [vm_plan.disk_node(int(d["device_index"])) for d in disks]
        parent = params.bitmap
        present = await engine_backup.bitmaps(monitor)
        incremental = (
            parent is not None
            and all(parent in present.get(n, {}) and not present[n][parent].get("inconsistent") for n in nodes)
            and all(have.get(str(d["index"])) == int(d["size"]) for d in disks)
        )
        mode = "incremental" if incremental else "full"
        publish_job(agent, ctx.job_id, mode=mode)
        endpoint = await _await_param(
            ctx, receive_job, ReplicaReceiveParams, "endpoint", "exporting the replica", host=partner
        )
        new_bitmap = f"{BITMAP_PREFIX}{ctx.job_id[:20]}"
        copies = [engine_backup.DiskCopy(node=n, target=Path(), target_node=f"rpl-t-{i}") for i, n in enumerate(nodes)]
        run = engine_backup.BackupRun(monitor, copies, new_bitmap, parent if incremental else None)
        started = time.monotonic()
        at = datetime.now(UTC)
        copied = frozen = False
        try:
            for d, disk in zip(disks, copies, strict=True):
                await monitor.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": disk.target_node,
                        "export": endpoint["exports"][str(d["index"])],
                        "server": {"type": "inet", "host": endpoint["host"], "port": str(endpoint["port"])},
                    },
                )
                run.added.append(disk.target_node)
            ctx.progress(0.1, f"{mode} copy to {partner}")
            async with frozen_guest(agent, running) as frozen:
                at = datetime.now(UTC)
                await engine_backup.start(run)
            await engine_backup.wait(run, _progress(ctx))
            copied = True
        finally:
            await engine_backup.close_targets(run)
            if not copied:  # QEMU merged a failed copy's bits back into the parent: keep it, drop the new one
                await _keep_only(monitor, nodes, parent if incremental else None, drop=new_bitmap)
        publish_job(agent, ctx.job_id, copied={"at": at.isoformat(), "frozen": frozen, "bitmap": new_bitmap})
    try:
        await _await_param(ctx, receive_job, ReplicaReceiveParams, "applied", "applying the copy", host=partner)
    except BaseException:
        # The copy cleared the old bitmap's bits: only a full copy can be right next time.
        await _keep_only(monitor, nodes, None)
        raise
    await _keep_only(monitor, nodes, new_bitmap)
    return {
        "vm": ctx.target_name,
        "partner": partner,
        "kind": mode,
        "frozen": frozen,
        "seconds": round(time.monotonic() - started, 2),
    }


def _progress(ctx: JobContext) -> Callable[[float], None]:
    return lambda fraction: ctx.note(0.1 + 0.8 * fraction, "copying")


async def _keep_only(monitor: Any, nodes: list[str], keep: str | None, drop: str | None = None) -> None:
    """Remove replication bitmaps from these disks: all but ``keep`` (and ``drop`` whatever ``keep`` is)."""
    with contextlib.suppress(CorralError):
        present = await engine_backup.bitmaps(monitor)
        for node in nodes:
            for name in present.get(node, {}):
                if name.startswith(BITMAP_PREFIX) and (name != keep or name == drop):
                    with contextlib.suppress(CorralError):
                        await monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


# -- failover and removal on the partner ------------------------------------------------------------------------


async def failover(ctx: JobContext) -> dict[str, Any]:
    """Put the replica's files where the VM's disks belong on this host, then start the VM. Every check comes
    before the first file moves; the replica's row goes once the files are the VM's."""
    agent = ctx.agent
    vm_id = ctx.target_id
    if vm_id is None:
        raise NotFound(f"VM {ctx.target_name} not found")
    params = ctx.params_as(FailoverParams)
    replica_id, disks = params.replica_id, params.disks
    binary = agent.settings.qemu_img_binary
    async with agent.vm_locks[vm_id]:
        with agent.store.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None:
                raise NotFound(f"VM {ctx.target_name} not found")
            volumes = sorted(vm.volumes, key=lambda v: v.device_index)
            session.expunge_all()
        by_volume = {d["volume_id"]: d for d in disks}
        moves: list[tuple[Path, Path]] = []
        for volume in volumes:
            d = by_volume.get(volume.id)
            if d is None:
                raise Conflict(
                    f"disk {volume.name} of VM {ctx.target_name} has no replica (added after the last copy)",
                    "detach it, or restore it from a backup",
                )
            directory = replica_dir(agent, d["pool"], replica_id)
            await asyncio.to_thread(recover, directory, d["index"], binary)
            source = _files(directory, d["index"])["base"]
            target = storage.volume_path(agent, volume)
            if not source.is_file():
                raise NotFound(f"the replica of disk {volume.name} is missing on {agent.host_name}")
            if target.exists():
                raise Conflict(
                    f"a file is already where disk {volume.name} belongs on {agent.host_name} ({target.name})",
                    "an administrator must move it away",
                )
            moves.append((source, target))
        ctx.progress(0.1, "taking the replica's disks")
        moved: list[tuple[Path, Path]] = []
        try:
            for source, target in moves:
                storage.make_dir(target.parent)
                os.replace(source, target)
                moved.append((source, target))
            with agent.store.session() as session:
                for volume in volumes:
                    row = session.get(Volume, volume.id)
                    if row is not None:
                        row.state, row.backing_path = "ready", None
                replica = session.get(Replica, replica_id)
                copy_at = replica.last_at.isoformat() if replica is not None and replica.last_at else None
                if replica is not None:
                    session.delete(replica)
        except BaseException:
            # The replica stays whole for another try: the control plane puts the VM back where it was
            # (corral.cluster.replication.settle_failovers) once this job has failed.
            for source, target in reversed(moved):
                with contextlib.suppress(OSError):
                    os.replace(target, source)
            raise
        for pool in {d["pool"] for d in disks}:
            shutil.rmtree(replica_dir(agent, pool, replica_id), ignore_errors=True)
        ctx.progress(0.3, "starting")
        result = await vm_lifecycle.start(agent, vm_id)
    return {"vm": ctx.target_name, "host": agent.host_name, "copy_at": copy_at, **result}


async def remove(ctx: JobContext) -> dict[str, Any]:
    """A replica's files (``replica_id``), or the disk files a VM left on this host when it failed over to its
    replica (``stale_volumes``): each removed only while the store puts that volume on another host."""
    agent = ctx.agent
    freed = 0
    params = ctx.params_as(ReplicaRemoveParams)
    if params.stale_volumes is not None:
        return {"vm": ctx.target_name, "freed": _remove_stale(agent, params.stale_volumes)}
    replica_id = params.replica_id
    if replica_id is None:
        raise NotFound(f"the job names no replica of VM {ctx.target_name} to remove")
    for pool in params.pools or ["default"]:
        directory = replica_dir(agent, pool, replica_id)
        if directory.is_dir():
            freed += sum(engine_backup.allocated_bytes(p) for p in directory.iterdir() if p.is_file())
            shutil.rmtree(directory, ignore_errors=True)
    return {"vm": ctx.target_name, "freed": freed}


def _remove_stale(agent: Agent, stale: list[dict[str, Any]]) -> int:
    freed = 0
    with agent.store.reading() as session:
        for entry in stale:
            volume = session.get(Volume, entry["id"])
            if volume is None or volume.host == agent.host_name:
                continue  # deleted since (its file went with it), or back here: the file is in use
            path = pool_file(agent.layout.pool(entry["pool"]), entry["path"])
            if path.is_file() and not path.is_symlink():
                freed += engine_backup.allocated_bytes(path)
                path.unlink()
    return freed
