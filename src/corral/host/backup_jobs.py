"""Backup and restore jobs on this host (export and import of whole VMs: corral.host.export_jobs).

Backups live in ``<backup directory>/<backup id>/disk<N>.qcow2``, the directory being the ``backup_dir`` setting
(default ``CORRAL_HOME/backups``): a root-only directory outside every storage pool, so no VM (sandboxed QEMUs run
under their own uids) can read or change another's backups, or its own. Each file's SHA-256 is recorded when it is
made, and ``verify`` reads the whole chain back against them.
A running VM writes its backup through file descriptors the agent opens and hands over (``add-fd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import backup as engine_backup
from corral.engine import qemu_img
from corral.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.host import storage, vm_plan
from corral.host.snapshot_jobs import frozen_guest, out_of_space
from corral.spec.job_params import BackupOfVMParams, BackupParams, BackupRestoreParams
from corral.store import events
from corral.store.models import VM, Backup, Snapshot, Volume

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext
    from corral.host.vm_lifecycle import RunningVM

CHUNK = 1 << 20
STORE_ID_FILE = "store-id"  # never a backup's name: those are 32 hex digits
_identities: dict[Path, str] = {}  # backup directory -> its identity, read once


def backup_root(agent: Agent) -> Path:
    """The backup directory (``backup_dir``, else CORRAL_HOME/backups): made root-only on first use, and kept so."""
    root = agent.settings.backup_dir or agent.layout.home / "backups"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_mode & 0o077:
        root.chmod(0o700)
    return root


def store_identity(agent: Agent) -> str | None:
    """A random id kept in the backup directory, made by the first host to use it: hosts that report the same id
    (in their inventory) see the same backups, a shared mount, so any of them can restore or verify one. None
    when the directory cannot be used (the host still serves everything else). Read once per directory: the
    heartbeat asks every few seconds, and a hung mount must not stall it."""
    configured = agent.settings.backup_dir or agent.layout.home / "backups"
    if configured in _identities:
        return _identities[configured]
    try:
        path = backup_root(agent) / STORE_ID_FILE
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(uuid.uuid4().hex)
        text = path.read_text().strip()
    except OSError:
        return None
    if len(text) != 32 or not text.isalnum():
        return None
    _identities[configured] = text
    return text


def backup_file(agent: Agent, relative: str) -> Path:
    """A path stored in a backup row, resolved and kept inside the backup directory."""
    root = backup_root(agent).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or path == root:
        raise InvalidInput(f"backup path {relative!r} escapes the backup directory", "the store row is damaged")
    return path


def vm_volumes(agent: Agent, vm_id: str) -> tuple[VM, list[Volume]]:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            raise NotFound("the VM no longer exists")
        return vm, sorted(vm.volumes, key=lambda v: v.device_index)


def running_vm(agent: Agent, vm_id: str) -> RunningVM | None:
    running = agent.vms.get(vm_id)
    return running if running is not None and not running.proc.exited else None


def qemu_img_version(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
        return out.splitlines()[0] if out else "unknown"
    return "unknown"


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in chunks (disks are large): what a manifest records and verify compares."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- backup create / delete ------------------------------------------------------------------------------------


async def create(ctx: JobContext) -> dict[str, Any]:
    """Copy every disk at one instant (live or offline); an incremental one copies only what changed since its
    parent. On any failure the backup's files and row go, and the VM's change records stay as they were."""
    agent, params = ctx.agent, ctx.params_as(BackupParams)
    backup_id = params.backup_id
    directory = backup_root(agent) / backup_id
    try:
        async with agent.vm_locks[ctx.vm_id()]:
            result = await _create_locked(ctx, params, directory)
    except BaseException as exc:
        pool_full = out_of_space([directory / "x"]) if directory.exists() else False
        shutil.rmtree(directory, ignore_errors=True)
        with agent.store.session() as session:
            row = session.get(Backup, backup_id)
            if row is not None:
                session.delete(row)
        if pool_full and isinstance(exc, Exception):
            raise CorralError(
                f"the backup directory ran out of space; backup {params.name} was removed",
                "free space under CORRAL_HOME/backups (delete old backups)",
            ) from exc
        raise
    return result


async def _create_locked(ctx: JobContext, params: BackupParams, directory: Path) -> dict[str, Any]:
    agent, backup_id = ctx.agent, params.backup_id
    binary = agent.settings.qemu_img_binary
    vm, volumes = vm_volumes(agent, ctx.vm_id())
    with agent.store.session() as session:
        backup = session.get(Backup, backup_id)
        if backup is None:
            raise NotFound(f"backup {params.name} not found")
        parent = session.get(Backup, backup.parent_id) if backup.parent_id else None
    for volume in volumes:
        if volume.format != "qcow2":
            raise Conflict(
                f"disk {volume.name} is {volume.format}; backups need qcow2 disks", "convert the disk to qcow2"
            )
    sources = [storage.volume_path(agent, v) for v in volumes]
    running = running_vm(agent, vm.id)
    directory.mkdir(mode=0o700)
    copies = []
    for index, (source, volume) in enumerate(zip(sources, volumes, strict=True)):
        target = directory / f"disk{index}.qcow2"
        size = int(qemu_img.info(source, binary)["virtual-size"])
        if parent is not None:
            backing = f"../{parent.id}/disk{index}.qcow2"
            await asyncio.to_thread(
                qemu_img.run,
                ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(target), str(size)],
                binary,
            )
        else:
            await asyncio.to_thread(qemu_img.create_blank, target, size, binary)
        # A running VM names its nodes after the device index; the storage daemon after the position.
        node = vm_plan.disk_node(volume.device_index) if running is not None else f"disk{index}"
        copies.append(engine_backup.DiskCopy(node=node, target=target))
    new_bitmap = engine_backup.bitmap_name(backup_id)
    parent_bitmap = engine_backup.bitmap_name(parent.id) if parent else None
    frozen = False
    if running is not None:
        run = engine_backup.BackupRun(running.proc, copies, new_bitmap, parent_bitmap)
        frozen = await _run(ctx, run, running.proc.add_fd, running)
    else:
        socket = agent.layout.home / "run" / f"bk-{backup_id[:12]}.qmp"
        async with engine_backup.StorageDaemon(sources, socket, storage_daemon_binary(agent)) as daemon:
            run = engine_backup.BackupRun(daemon, copies, new_bitmap, parent_bitmap)
            await _run(ctx, run, None, None)
    ctx.progress(0.97, "checking the backup")
    disks: list[dict[str, Any]] = []  # as the row stores them
    for index, copy in enumerate(copies):
        await asyncio.to_thread(qemu_img.check, copy.target, binary)
        os.chmod(copy.target, 0o400)
        disks.append(
            {
                "index": index,
                "file": f"{backup_id}/{copy.target.name}",
                "size": int(qemu_img.info(copy.target, binary)["virtual-size"]),
                "written": engine_backup.allocated_bytes(copy.target),
                "sha256": await asyncio.to_thread(sha256_of, copy.target),
            }
        )
    total = sum(d["written"] for d in disks)
    with agent.store.session() as session:
        row = session.get(Backup, backup_id)
        if row is None:
            raise NotFound(f"backup {params.name} was deleted meanwhile")
        row.state, row.disks, row.size, row.live = "ready", disks, total, running is not None
    return {
        "backup": params.name,
        "kind": "incremental" if parent else "full",
        "live": running is not None,
        "frozen": frozen,
        "bytes": total,
        "disks": len(disks),
    }


def storage_daemon_binary(agent: Agent) -> str:
    """qemu-storage-daemon from the same installation as the configured QEMU."""
    qemu = Path(shutil.which(agent.settings.qemu_binary) or agent.settings.qemu_binary)
    sibling = qemu.parent / "qemu-storage-daemon"
    return str(sibling) if sibling.exists() else "qemu-storage-daemon"


async def _run(
    ctx: JobContext,
    run: engine_backup.BackupRun,
    pass_fd: Callable[[int], Awaitable[int]] | None,
    running: RunningVM | None,
) -> bool:
    """Attach targets, start at one instant (guest filesystems frozen around it when the agent answers), copy,
    then keep only the new change record. Returns whether the guest was frozen."""
    nodes = [d.node for d in run.disks]
    frozen = False
    succeeded = False
    try:
        if run.parent_bitmap is not None:
            await engine_backup.check_parent_bitmap(run.monitor, nodes, run.parent_bitmap)
        await engine_backup.open_targets(run, pass_fd)
        ctx.progress(0.1, "starting the backup")
        if running is not None:
            async with frozen_guest(ctx.agent, running) as frozen:
                await engine_backup.start(run)
        else:
            await engine_backup.start(run)
        await engine_backup.wait(run, lambda f: ctx.note(0.1 + 0.85 * f, "copying"))
        succeeded = True
    finally:
        await engine_backup.close_targets(run)
        with contextlib.suppress(CorralError):
            await engine_backup.settle_bitmaps(run, succeeded)
    return frozen


async def delete(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    with agent.store.session() as session:
        backup = session.get(Backup, ctx.target_id)
        if backup is None:
            raise NotFound(f"backup {ctx.target_name} not found")
        if session.query(Backup).filter(Backup.parent_id == backup.id).count():
            raise Conflict(f"backup {ctx.target_name} has incremental backups on top", "delete those first")
        shutil.rmtree(backup_file(agent, backup.id), ignore_errors=True)
        freed = backup.size
        session.delete(backup)
    return {"backup": ctx.target_name, "freed": freed}


# -- verify ----------------------------------------------------------------------------------------------------


def read_back(
    files: list[tuple[str, Path, str | None]], tops: list[tuple[str, Path, int]], binary: str = "qemu-img"
) -> tuple[list[str], int]:
    """The verify itself, on plain paths (benchmarks/backup.py times it): each ``(label, file, recorded sha256)``
    hashed and compared, then qemu-img check; when all are sound, each ``(label, newest file, virtual size)`` read
    whole through its backing chain into QEMU's null driver. Returns the problems found and the bytes hashed."""
    problems: list[str] = []
    hashed = 0
    for where, path, recorded in files:
        if not path.is_file():
            problems.append(f"{where}: its file is missing")
            continue
        if recorded is not None:
            actual = sha256_of(path)
            hashed += path.stat().st_size
            if actual != recorded:
                problems.append(f"{where}: SHA-256 {actual[:12]}... differs from the recorded {recorded[:12]}...")
        try:  # the format is given: a damaged header must not make the file pass as raw
            qemu_img.run(["check", "-q", "-f", "qcow2", str(path)], binary, timeout=3600)
        except CorralError as exc:
            problems.append(f"{where}: qemu-img check failed: {exc.message.splitlines()[0]}")
    if problems:
        return problems, hashed
    for where, path, size in tops:
        try:
            qemu_img.run(
                ["convert", "-n", "-f", "qcow2", "--target-image-opts", str(path), f"driver=null-co,size={size}"],
                binary,
                timeout=3600,
            )
        except CorralError as exc:
            problems.append(f"{where}: reading it back failed: {exc.message}")
    return problems, hashed


def _verify_chain(agent: Agent, links: list[Backup]) -> tuple[list[str], int]:
    """Every file of the chain (the full backup first), then each disk of the newest read through the chain."""
    files: list[tuple[str, Path, str | None]] = []
    problems: list[str] = []
    for link in links:
        for disk in sorted(link.disks, key=lambda d: d["index"]):
            where = f"backup {link.name} disk{disk['index']}"
            try:
                files.append((where, backup_file(agent, disk["file"]), disk.get("sha256")))
            except InvalidInput as exc:
                problems.append(f"{where}: {exc.message}")
    if problems:
        return problems, 0
    tops = [
        (f"backup {links[-1].name} disk{d['index']}", backup_file(agent, d["file"]), int(d["size"]))
        for d in links[-1].disks
    ]
    return read_back(files, tops, agent.settings.qemu_img_binary)


async def verify(ctx: JobContext) -> dict[str, Any]:
    """Read a backup's whole chain back and compare it with what was recorded when it was made. The outcome is
    stored on the backup (shown by `backup list/show`); a corrupt backup also fails the job, so scripts see it."""
    agent = ctx.agent
    with agent.store.session() as session:
        backup = session.get(Backup, ctx.target_id)
        if backup is None or backup.state != "ready":
            raise NotFound(f"backup {ctx.target_name} not found")
        links = [backup]
        while links[-1].parent_id is not None and (parent := session.get(Backup, links[-1].parent_id)) is not None:
            links.append(parent)
        links.reverse()  # the full one first
        session.expunge_all()
    unrecorded = [link.name for link in links if any("sha256" not in d for d in link.disks)]
    ctx.progress(0.05, f"reading {len(links)} backup(s) back")
    problems, hashed = await asyncio.to_thread(_verify_chain, agent, links)
    with agent.store.session() as session:
        row = session.get(Backup, ctx.target_id)
        if row is not None:
            row.verify_state = "corrupt" if problems else "ok"
            row.verified_at = datetime.now(UTC)
            row.verify_error = "; ".join(problems) if problems else None
            session.add(
                events.make(
                    session,
                    row,
                    "backup",
                    "backup.verified",
                    {"vm": row.vm_name, "state": row.verify_state, "error": row.verify_error},
                )
            )
    if problems:
        raise CorralError(
            f"backup {ctx.target_name} of {ctx.params_as(BackupOfVMParams).vm} is corrupt: {problems[0]}",
            "restore from another backup, and take a new full one",
        )
    return {
        "backup": ctx.target_name,
        "state": "ok",
        "chain": [link.name for link in links],
        "bytes": hashed,
        "unrecorded": unrecorded,
    }


# -- restore ---------------------------------------------------------------------------------------------------


async def _copy(ctx: JobContext, source: Path, target: Path, start: float, span: float, what: str) -> None:
    """A flattened, standalone copy (qemu-img convert reads through the backing chain), then qemu-img check."""
    binary = ctx.agent.settings.qemu_img_binary
    loop = asyncio.get_running_loop()
    last = [-1.0]

    def report(fraction: float) -> None:
        if fraction - last[0] >= 0.02 or fraction >= 1.0:
            last[0] = fraction
            loop.call_soon_threadsafe(ctx.note, start + span * fraction, what)

    target.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(qemu_img.copy_with_progress, source, target, None, False, report, binary)
    await asyncio.to_thread(qemu_img.check, target, binary)


async def restore(ctx: JobContext) -> dict[str, Any]:
    from corral.host.vm_lifecycle import discard_vm

    agent, params = ctx.agent, ctx.params_as(BackupRestoreParams)
    with agent.store.session() as session:
        backup = session.get(Backup, params.backup_id)
        if backup is None or backup.state != "ready":
            raise NotFound(f"backup {params.name} not found")
        files = [backup_file(agent, d["file"]) for d in sorted(backup.disks, key=lambda d: d["index"])]
    for path in files:
        if not path.is_file():
            raise NotFound(
                f"the data of backup {params.name} is missing ({path.name})",
                "the backup directory was changed outside corral",
            )
    if params.mode == "over":
        return await _restore_over(ctx, files)
    vm_id = ctx.vm_id()
    made: set[str] = set()
    try:
        async with agent.vm_locks[vm_id]:
            _, volumes = vm_volumes(agent, vm_id)
            span = 0.9 / len(files)
            for index, (source, volume) in enumerate(zip(files, volumes, strict=True)):
                target = storage.claim(storage.volume_path(agent, volume), f"volume {volume.name}")
                made.add(volume.id)
                await _copy(ctx, source, target, 0.05 + span * index, span, f"restoring {volume.name}")
                ctx.check_cancelled()
            with agent.store.session() as session:
                for volume in volumes:
                    row = session.get(Volume, volume.id)
                    if row is None:
                        raise NotFound(f"volume {volume.name} no longer exists")
                    row.state = "ready"
    except BaseException:
        await discard_vm(ctx, vm_id, made)  # the files this job made; a file it found stays
        raise
    return {"vm": ctx.target_name, "backup": params.name, "disks": len(files), "new": True}


async def _restore_over(ctx: JobContext, files: list[Path]) -> dict[str, Any]:
    """Copy each disk beside the VM's own, then swap them in; a failure before the swaps leaves the VM as it
    was. The VM's internal snapshots lived in the old files, so their rows go too."""
    agent, vm_id = ctx.agent, ctx.vm_id()
    async with agent.vm_locks[vm_id]:
        if running_vm(agent, vm_id) is not None:
            raise Conflict(f"VM {ctx.target_name} is running", f"stop it first: `corral vm stop {ctx.target_name}`")
        _, volumes = vm_volumes(agent, vm_id)
        staged: list[Path] = []
        try:
            span = 0.85 / len(files)
            for index, (source, volume) in enumerate(zip(files, volumes, strict=True)):
                temp = storage.claim(
                    storage.volume_path(agent, volume).with_suffix(".restoring"), f"the restored copy of {volume.name}"
                )
                staged.append(temp)  # claimed, so ours to remove
                await _copy(ctx, source, temp, 0.05 + span * index, span, f"restoring {volume.name}")
        except BaseException:
            for temp in staged:
                temp.unlink(missing_ok=True)
            raise
        binary = agent.settings.qemu_img_binary
        with agent.store.session() as session:
            for temp, volume in zip(staged, volumes, strict=True):
                os.replace(temp, storage.volume_path(agent, volume))
                row = session.get(Volume, volume.id)
                if row is None:
                    raise NotFound(f"volume {volume.name} no longer exists")
                row.backing_path = None
                row.size = max(row.size, int(qemu_img.info(storage.volume_path(agent, volume), binary)["virtual-size"]))
            dropped = session.query(Snapshot).filter(Snapshot.vm_id == vm_id).delete()
            vm_row = session.get(VM, vm_id)
            if vm_row is None:
                raise NotFound(f"VM {ctx.target_name} no longer exists")
            vm_row.current_snapshot = None
            session.flush()
            storage.collect_bases(agent, session)
    return {
        "vm": ctx.target_name,
        "backup": ctx.params_as(BackupRestoreParams).name,
        "disks": len(files),
        "new": False,
        "snapshots_dropped": dropped,
    }
