"""Export and import jobs on this host: a VM's disks and spec as one tar (``vm export``), and such a tar, an OVA or a
libvirt domain made into a new VM (``vm import``; the last two by corral.host.appliance_jobs).

Every disk of an export is a standalone copy with its SHA-256 in the manifest; an import checks each one (checksum,
then qemu-img as for any user's image) before the VM is marked ready (docs/backups.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import __version__
from corral.engine import qemu_img
from corral.errors import Conflict, InvalidInput
from corral.host import storage
from corral.host.backup_jobs import CHUNK, backup_root, qemu_img_version, sha256_of, vm_volumes
from corral.spec.backup import EXPORT_FORMAT, EXPORT_VERSION, MANIFEST, ExportManifest, read_export_manifest
from corral.spec.job_params import VMExportParams, VMImportParams
from corral.spec.sources import Source, SourceKind, opened, private_dir
from corral.store.models import Volume

if TYPE_CHECKING:
    from corral.host.job_context import JobContext


async def export(ctx: JobContext) -> dict[str, Any]:
    """Flattened copies of the disks (consistent for a running VM), their checksums and the spec, in one tar
    written beside the target name and renamed into place only when complete."""
    from corral.host.clone_jobs import consistent_source, copy_disks

    agent, params = ctx.agent, ctx.params_as(VMExportParams)
    target = Path(params.file)
    download = params.download  # a remote caller's export: kept root-only until downloaded or expired
    if download:
        private_dir(target.parent)
    vm_id = ctx.target_id or ""  # an export job always names its VM; "" is found nowhere (NotFound)
    staging = backup_root(agent) / f".export-{ctx.job_id[:12]}"
    partial = target.with_name(f".{target.name}.partial")
    try:
        staging.mkdir(mode=0o700)
        async with agent.vm_locks[vm_id]:
            vm, volumes = vm_volumes(agent, vm_id)
            copies = [staging / f"disk{i}.qcow2" for i in range(len(volumes))]
            async with consistent_source(agent, vm.id, None) as (tag, share):
                await copy_disks(ctx, [storage.volume_path(agent, v) for v in volumes], copies, tag, share)
        binary = agent.settings.qemu_img_binary
        disks = []
        for index, copy in enumerate(copies):
            ctx.note(0.9, f"checksumming disk{index}")
            disks.append(
                {
                    "file": f"disks/{copy.name}",
                    "size": int(qemu_img.info(copy, binary)["virtual-size"]),
                    "bytes": copy.stat().st_size,
                    "sha256": await asyncio.to_thread(sha256_of, copy),
                }
            )
        manifest = ExportManifest.model_validate(
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "corral_version": __version__,
                "qemu_img_version": qemu_img_version(binary),
                "created_at": datetime.now(UTC).isoformat(),
                "vm": {"name": vm.name, "spec": vm.spec},
                "disks": disks,
            }
        )
        ctx.note(0.93, "writing the archive")
        if params.format == "ova":
            from corral.host.appliance_jobs import write_vm_ova

            await asyncio.to_thread(write_vm_ova, partial, vm.name, vm.spec, copies, staging, binary)
        else:
            await asyncio.to_thread(_write_tar, partial, manifest, copies, params.compress)
        if target.exists():
            shown = target.name if download else target
            raise Conflict(f"{shown} appeared during the export", "choose a new file name")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    if download:  # no host path in the answer: the caller fetches it with GET /exports/{id}
        return {"vm": ctx.target_name, "export": download, "bytes": target.stat().st_size, "disks": len(disks)}
    return {"vm": ctx.target_name, "file": str(target), "bytes": target.stat().st_size, "disks": len(disks)}


def _write_tar(path: Path, manifest: ExportManifest, copies: list[Path], compress: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with (
        os.fdopen(fd, "wb") as raw,
        (
            tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) if compress else tarfile.open(fileobj=raw, mode="w")
        ) as archive,
    ):
        data = json.dumps(manifest.model_dump(mode="json"), indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(data), 0o600
        archive.addfile(info, io.BytesIO(data))
        for copy in copies:
            info = tarfile.TarInfo(f"disks/{copy.name}")
            info.size, info.mode = copy.stat().st_size, 0o600
            with copy.open("rb") as handle:
                archive.addfile(info, handle)


def _extract_checked(archive_path: Path, member: str, target: Path, expected: str, label: str | None = None) -> None:
    """Stream one member to a path of our choosing, hashing as it goes; a wrong checksum removes it. ``label``
    names the archive in messages (``archive_path`` may be ``/proc/self/fd/N``)."""
    digest = hashlib.sha256()
    label = label or archive_path.name
    with tarfile.open(archive_path, "r:*") as archive:
        source = archive.extractfile(member)
        if source is None:
            raise InvalidInput(f"{member} in {label} is not a file", "export again")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != expected:
        target.unlink(missing_ok=True)
        raise InvalidInput(
            f"{member} in {label} does not match its checksum",
            "the archive is damaged or was tampered with; export again",
        )


async def import_(ctx: JobContext) -> dict[str, Any]:
    """Every disk is checked (checksum, then qemu-img as for any user's image: no backing or data file, sound
    metadata, the size the manifest says) before the VM is marked ready; any failure removes the VM."""
    from corral.host.vm_lifecycle import discard_vm

    params = ctx.params_as(VMImportParams)
    if params.foreign:  # an OVA or a libvirt domain (corral.cluster.appliances)
        from corral.host.appliance_jobs import import_foreign

        return await import_foreign(ctx)
    agent = ctx.agent
    source = (
        Source.of(params.source)
        if params.source is not None
        else Source(SourceKind.PATH, Path(params.file or ""), params.file or "")
    )
    label = source.label
    expected = ExportManifest.model_validate(params.manifest)
    made: set[str] = set()
    vm_id = ctx.target_id or ""  # an import job always names its new VM
    try:
        # Opened once, without following links for uploads and the import directory; read only through the fd.
        async with agent.vm_locks[vm_id], _opened_archive(source) as path:
            if read_export_manifest(path, label) != expected:
                raise InvalidInput(f"{label} changed since it was checked", "import it again")
            _, volumes = vm_volumes(agent, vm_id)
            binary = agent.settings.qemu_img_binary
            for index, (disk, volume) in enumerate(zip(expected.disks, volumes, strict=True)):
                ctx.progress(0.05 + 0.9 * index / len(volumes), f"importing {disk.file}")
                target = storage.volume_path(agent, volume)
                target.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(_extract_checked, path, disk.file, target, disk.sha256, label)
                made.add(volume.id)  # after its O_EXCL create: a file found at the target is not ours to remove
                facts = await asyncio.to_thread(qemu_img.check_importable, target, binary, "qcow2", disk.file)
                if facts.get("format") != "qcow2" or int(facts.get("virtual-size", 0)) != disk.size:
                    raise InvalidInput(
                        f"{disk.file} in {label} is not the qcow2 disk of {disk.size} bytes its manifest describes",
                        "export again",
                    )
            with agent.store.session() as session:
                for volume in volumes:
                    row = session.get(Volume, volume.id)
                    if row is not None:
                        row.state = "ready"
    except BaseException:
        await discard_vm(ctx, vm_id, made)  # the files this job made; the pending rows go regardless
        raise
    finally:
        if source.kind is SourceKind.UPLOAD:
            source.path.unlink(missing_ok=True)  # an upload is consumed by the import that names it
    return {"vm": ctx.target_name, "file": label, "disks": len(expected.disks)}


@contextlib.asynccontextmanager
async def _opened_archive(source: Source) -> AsyncIterator[Path]:
    with opened(source) as (_fd, path):
        yield path
