"""OVA appliances on this host: writing one from a VM's flattened disks, and checking a VMDK before any qemu-img
call reads it with an explicit ``-f vmdk``.

The formats live in corral.spec.ovf; this module runs qemu-img. A VMDK is only ever given to qemu-img after
``vmdk_problem`` found it a single self-contained sparse extent, and qemu-img's own facts are checked again
(one extent, the file itself, no backing file) before it is converted.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.errors import InvalidInput, NotFound
from corral.spec.job_params import VMImportParams
from corral.spec.ovf import ExportedDisk, read_ova, verify_members, vmdk_problem, write_envelope, write_manifest
from corral.spec.sources import Source, SourceKind, opened
from corral.store.models import VM

if TYPE_CHECKING:
    from corral.host.job_context import JobContext

HEAD_BYTES = 1 << 16
CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def to_stream_vmdk(source: Path, target: Path, binary: str = qemu_img.QEMU_IMG) -> None:
    """A qcow2 (corral's own, flattened) as a streamOptimized VMDK: compressed, one file, what OVA tools read."""
    qemu_img.run(
        ["convert", "-q", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source), str(target)],
        binary,
        timeout=7200,
    )


def write_ova(
    target: Path,
    name: str,
    cpus: int,
    memory: int,
    macs: list[str | None],
    disks: list[Path],
    staging: Path,
    binary: str = qemu_img.QEMU_IMG,
    image: str | None = None,
) -> int:
    """Convert each qcow2 in ``disks`` to a VMDK in ``staging`` and write ``target`` (new, 0600): the envelope,
    the manifest (SHA-256 of both others) and the disks, in the order OVF 1.x asks. Returns its length."""
    vmdks: list[ExportedDisk] = []
    for index, disk in enumerate(disks):
        vmdk = staging / f"{name}-disk{index}.vmdk"
        to_stream_vmdk(disk, vmdk, binary)
        capacity = int(qemu_img.info(disk, binary, "qcow2")["virtual-size"])
        vmdks.append(ExportedDisk(href=vmdk.name, capacity=capacity, size=vmdk.stat().st_size))
    envelope = write_envelope(name, cpus, memory, vmdks, macs, image).encode()
    digests = {f"{name}.ovf": hashlib.sha256(envelope).hexdigest()}
    digests.update({d.href: _sha256(staging / d.href) for d in vmdks})
    manifest = write_manifest(digests).encode()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in ((f"{name}.ovf", envelope), (f"{name}.mf", manifest)):
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, _Bytes(data))
        for exported in vmdks:
            path = staging / exported.href
            info = tarfile.TarInfo(exported.href)
            info.size, info.mode = path.stat().st_size, 0o644
            with path.open("rb") as handle:
                archive.addfile(info, handle)
    return target.stat().st_size


class _Bytes:
    """A minimal readable for tarfile.addfile (io.BytesIO would do; kept tiny and explicit)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._at + size
        chunk, self._at = self._data[self._at : end], min(end, len(self._data))
        return chunk


def check_vmdk(path: Path, label: str, binary: str = qemu_img.QEMU_IMG) -> dict[str, Any]:
    """A VMDK from a user, checked before qemu-img converts it: the header and embedded descriptor first
    (``vmdk_problem``), then qemu-img's facts with ``-f vmdk`` (one extent, this file, no backing file)."""
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    problem = vmdk_problem(head)
    if problem:
        raise InvalidInput(
            f"{label} cannot be imported: {problem}",
            "give a monolithic or streamOptimized VMDK (`qemu-img convert -O vmdk -o subformat=streamOptimized`)",
        )
    facts = qemu_img.info(path, binary, "vmdk")
    extents = (facts.get("format-specific") or {}).get("data", {}).get("extents") or []
    if facts.get("backing-filename") or len(extents) != 1 or Path(extents[0].get("filename", "")) != path:
        raise InvalidInput(
            f"{label} cannot be imported: it refers to another file", "give a monolithic or streamOptimized VMDK"
        )
    return facts


def _convert(source: Path, target: Path, fmt: str, binary: str) -> None:
    """Into a target the job already claimed (qemu-img truncates it and keeps its mode), the format given."""
    qemu_img.run(["convert", "-q", "-f", fmt, "-O", "qcow2", str(source), str(target)], binary, timeout=7200)


def vmdk_to_qcow2(path: Path, target: Path, label: str, binary: str = qemu_img.QEMU_IMG) -> int:
    """Check, then convert with the format given (never probed); returns the virtual size."""
    facts = check_vmdk(path, label, binary)
    qemu_img.run(["convert", "-q", "-f", "vmdk", "-O", "qcow2", str(path), str(target)], binary, timeout=7200)
    return int(facts["virtual-size"])


def write_vm_ova(target: Path, name: str, spec: dict[str, Any], copies: list[Path], staging: Path, binary: str) -> int:
    """The export job's OVA: the VM's CPUs, memory, MACs and image (corral's own section) with its disks."""
    macs = [nic.get("mac") for nic in spec.get("nics") or []]
    return write_ova(
        target,
        name,
        int(spec.get("cpus") or 1),
        int(spec.get("memory") or 256 << 20),
        macs,
        copies,
        staging,
        binary,
        image=spec.get("image"),
    )


def _copy_boot_file(source: Path, target: Path, limit: int) -> None:
    """A kernel or initrd copied into the boot image's directory (root's, 0640), never more than ``limit``."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    copied = 0
    with os.fdopen(fd, "wb") as out, source.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            copied += len(chunk)
            if copied > limit:
                raise InvalidInput(f"{source} is larger than {limit >> 20} MiB", "give a kernel and an initrd")
            out.write(chunk)


def _extract_member(archive_path: Path, member: str, target: Path) -> None:
    """One OVA member streamed to a path corral chose (never its own name), 0600."""
    with tarfile.open(archive_path, "r:") as archive:
        source = archive.extractfile(member)
        if source is None:
            raise InvalidInput(f"{member} is not a file", "the appliance was tampered with")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)


async def import_foreign(ctx: JobContext) -> dict[str, Any]:
    """Make the VM's disks (and its boot image) from an OVA or a libvirt domain. Everything is checked before the
    first disk is written: the OVA's checksums against its manifest, each disk's format (a raw or qcow2 file that
    names no other file; a single-extent VMDK). Any failure removes the VM, its files and its boot image."""
    import asyncio
    import shutil

    from corral.host import storage
    from corral.host.vm_lifecycle import discard_vm
    from corral.store.models import Image, Volume

    agent, vm_id = ctx.agent, ctx.target_id
    params = ctx.params_as(VMImportParams)
    binary = agent.settings.qemu_img_binary
    if params.source is None:
        raise InvalidInput("the import job names no source", "import it again")
    source = Source.of(params.source)
    image_id = params.image_id
    image_dir = agent.layout.image_dir(image_id) if image_id else None
    staging = agent.layout.home / "staging" / f"import-{ctx.job_id[:12]}"
    made: set[str] = set()
    try:
        if vm_id is None:
            raise InvalidInput("the VM being imported was deleted")
        async with agent.vm_locks[vm_id]:
            with agent.store.session() as session:
                vm = session.get(VM, vm_id)
                if vm is None:
                    raise InvalidInput("the VM being imported was deleted")
                volumes = sorted(vm.volumes, key=lambda v: v.device_index)
                session.expunge_all()
            disks = params.disks
            staging.mkdir(mode=0o700, parents=True)
            with opened(source) as (_fd, readable):
                if params.foreign == "ova":
                    inputs = await _ova_inputs(ctx, readable, source.label, staging)
                else:
                    inputs = [(Path(d["path"]), d["format"], d["target"]) for d in disks]
                    ctx.progress(0.05, "checking the disks")
                    for path, fmt, label in inputs:
                        await asyncio.to_thread(qemu_img.check_importable, path, binary, fmt, f"disk {label}")
                for index, ((path, fmt, label), disk, volume) in enumerate(zip(inputs, disks, volumes, strict=True)):
                    ctx.progress(0.3 + 0.6 * index / len(volumes), f"copying disk {label}")
                    if fmt == "vmdk":
                        facts = await asyncio.to_thread(check_vmdk, path, label, binary)
                    else:
                        facts = await asyncio.to_thread(qemu_img.check_importable, path, binary, fmt, label)
                    if int(facts["virtual-size"]) != int(disk["size"]):
                        raise InvalidInput(
                            f"disk {label} is {facts['virtual-size']} bytes, not the {disk['size']} "
                            "it was described as",
                            "the input changed since it was checked",
                        )
                    target = storage.claim(storage.volume_path(agent, volume), f"volume {volume.name}")
                    made.add(volume.id)
                    await asyncio.to_thread(_convert, path, target, fmt, binary)
                    if path.is_relative_to(staging):
                        path.unlink()
            if image_dir is not None:
                ctx.progress(0.95, "making the boot image")
                image_dir.mkdir(parents=True, exist_ok=True)
                values: dict[str, Any] = {"directory": str(image_dir)}
                boot_files = (("kernel", params.kernel, "vmlinuz"), ("initrd", params.initrd, "initrd.img"))
                for key, boot_file, file in boot_files:
                    if boot_file:
                        await asyncio.to_thread(_copy_boot_file, Path(boot_file), image_dir / file, 512 << 20)
                        values[f"{key}_file"] = file
                if params.kernel:
                    values["cmdline"] = params.cmdline or "console=ttyS0 root=/dev/vda rw"
                with agent.store.session() as session:
                    image = session.get(Image, image_id)
                    if image is None:
                        raise NotFound(f"the boot image of VM {ctx.target_name} was deleted meanwhile")
                    for key, value in values.items():
                        setattr(image, key, value)
                    image.state = "ready"
            with agent.store.session() as session:
                for volume in volumes:
                    row = session.get(Volume, volume.id)
                    if row is None:
                        raise NotFound(f"volume {volume.name} no longer exists")
                    row.state = "ready"
    except BaseException:
        if vm_id is not None:
            await discard_vm(ctx, vm_id, made)
        if image_dir is not None:
            shutil.rmtree(image_dir, ignore_errors=True)
            with agent.store.session() as session:
                image = session.get(Image, image_id)
                if image is not None:
                    session.delete(image)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if source.kind is SourceKind.UPLOAD:
            source.path.unlink(missing_ok=True)
    return {
        "vm": ctx.target_name,
        "file": source.label,
        "disks": len(params.disks),
        "format": params.foreign,
        "warnings": params.warnings,
    }


async def _ova_inputs(ctx: JobContext, readable: Path, label: str, staging: Path) -> list[tuple[Path, str, str]]:
    """Check the OVA again, verify every checksum, then stream each disk to staging (by a name corral chose)."""
    import asyncio

    ova = await asyncio.to_thread(read_ova, readable, label)
    expected = [(d["href"], int(d["size"])) for d in ctx.params_as(VMImportParams).disks]
    if [(d.href, d.capacity) for d in ova.appliance.disks] != expected:
        raise InvalidInput(f"{label} changed since it was checked", "import it again")
    ctx.progress(0.05, "verifying checksums")
    await asyncio.to_thread(verify_members, readable, ova, label)
    inputs = []
    for index, (href, _size) in enumerate(expected):
        path = staging / f"disk{index}.vmdk"
        await asyncio.to_thread(_extract_member, readable, href, path)
        inputs.append((path, "vmdk", href))
    return inputs
