"""Images on this host: the built-in tiny image, imports of users' disks or kernels, and removal."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.errors import EngineError, InvalidInput, NotFound
from corral.spec.job_params import ImageBuildParams, ImageImportParams, SourceParams
from corral.spec.sources import Source, SourceKind, opened
from corral.store.models import Image

if TYPE_CHECKING:
    from corral.host.job_context import JobContext
    from corral.images.debian import DebianImage
    from corral.images.tiny import TinyImage

BUILDERS = ("tiny", "debian")


def _image(ctx: JobContext) -> Image:
    with ctx.agent.store.session() as session:
        image = session.get(Image, ctx.target_id)
        if image is None:
            raise NotFound(f"image {ctx.target_name} not found")
        return image


def _mark_ready(ctx: JobContext, **values: Any) -> None:
    with ctx.agent.store.session() as session:
        image = session.get(Image, ctx.target_id)
        if image is None:
            raise NotFound(f"image {ctx.target_name} was deleted while it was being made")
        for key, value in values.items():
            setattr(image, key, value)
        image.state = "ready"


def _discard(ctx: JobContext, directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    with ctx.agent.store.session() as session:
        image = session.get(Image, ctx.target_id)
        if image is not None:
            session.delete(image)


async def build(ctx: JobContext) -> dict[str, Any]:
    """Build a recipe image (cached under the host's cache dir) and register it."""
    from corral.images.tiny import build_tiny_image

    params = ctx.params_as(ImageBuildParams)
    recipe = params.recipe
    if recipe not in BUILDERS:
        raise InvalidInput(f"unknown image recipe {recipe!r}", f"choose one of: {', '.join(BUILDERS)}")
    image = _image(ctx)
    directory = ctx.agent.layout.image_dir(image.id)
    loop = asyncio.get_running_loop()

    def progress(fraction: float, message: str) -> None:  # called from the builder's thread
        loop.call_soon_threadsafe(ctx.note, 0.95 * fraction, message)

    details: dict[str, Any] = {"recipe": recipe}
    built: TinyImage | DebianImage
    try:
        if recipe == "debian":
            from corral.images.debian import build_debian_image

            built = await asyncio.to_thread(
                build_debian_image,
                directory,
                ctx.agent.settings.cache,
                params.release if params.release is not None else "bookworm",
                params.packages,
                params.size if params.size is not None else 4 << 30,
                progress,
            )
            details.update(
                cloud_init=True,
                ssh=True,
                default_user="corral",
                min_memory=512 << 20,
                release=params.release,
                packages=params.packages,
            )
        else:
            built = await asyncio.to_thread(build_tiny_image, directory, ctx.agent.settings.cache, progress)
        ctx.check_cancelled()
        info = qemu_img.info(built.rootfs, ctx.agent.settings.qemu_img_binary)
        _mark_ready(
            ctx,
            kind="kernel",
            directory=str(directory),
            disk_file=built.rootfs.name,
            disk_format="qcow2",
            kernel_file=built.kernel.name,
            initrd_file=built.initrd.name,
            cmdline=built.cmdline,
            virtual_size=int(info["virtual-size"]),
            size_on_disk=sum(p.stat().st_size for p in directory.iterdir()),
            details={**details, "recipe_hash": built.recipe_hash},
        )
    except BaseException:
        _discard(ctx, directory)
        raise
    return {"image": image.name, "recipe_hash": built.recipe_hash}


MAX_BOOT_FILE = 1 << 30  # a kernel or an initrd larger than this is not one
CHUNK = 1 << 20


def _copy_fd(fd: int, target: Path, mode: int, limit: int | None = None, label: str = "file") -> None:
    """Copy an open file into a new file of ours (O_EXCL, ``mode`` from creation), reading only through ``fd``."""
    os.lseek(fd, 0, os.SEEK_SET)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        copied = 0
        while chunk := os.read(fd, CHUNK):
            copied += len(chunk)
            if limit is not None and copied > limit:
                raise InvalidInput(f"{label} is larger than {limit >> 20} MiB", "give a kernel or an initrd")
            os.write(out, chunk)
    finally:
        os.close(out)


def _source(value: SourceParams | str | None) -> Source | None:
    if value is None:
        return None
    if isinstance(value, str):  # queued before sources had kinds: the local admin's path
        return Source(SourceKind.PATH, Path(value), value)
    return Source.of(value)


def _checked_disk(source: Source, staging: Path) -> Path:
    """The path qemu-img may read for ``source``. A file in the import directory is copied (through the
    descriptor opened without following links) to a private file first: whoever can write that directory could
    otherwise change the file between the check and the copy. Uploads live in a root-only directory."""
    with opened(source) as (fd, _):
        if source.kind is not SourceKind.IMPORT_DIR:
            return source.path
        _copy_fd(fd, staging, 0o600, label=source.label)
    return staging


async def import_image(ctx: JobContext) -> dict[str, Any]:
    """Copy a user's disk image (and optional kernel/initrd) into the store, converted to qcow2.

    The disk is raw or qcow2, with its format given or taken from its magic and passed to every qemu-img call
    (never probed), and it may name no other file (engine.qemu_img.check_importable). The kernel and the initrd
    are copied through the descriptor that opened them, root-owned 0640. Uploads are consumed either way."""
    image = _image(ctx)
    directory = ctx.agent.layout.image_dir(image.id)
    binary = ctx.agent.settings.qemu_img_binary
    params = ctx.params_as(ImageImportParams)
    source = _source(params.source) or _source(params.file)
    assert source is not None
    kernel = _source(params.kernel)
    initrd = _source(params.initrd)
    staging = directory / ".source"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        ctx.progress(0.05, f"checking {source.label}")
        path = await asyncio.to_thread(_checked_disk, source, staging)
        facts = await asyncio.to_thread(qemu_img.check_importable, path, binary, params.format, source.label)
        ctx.progress(0.1, "copying the disk")
        disk = directory / "disk.qcow2"
        try:
            await asyncio.to_thread(qemu_img.convert, path, disk, "qcow2", binary, facts["format"])
        except EngineError as exc:
            if source.kind is SourceKind.PATH:
                raise
            raise EngineError(f"copying {source.label} failed", "check the image with `qemu-img check`") from exc
        staging.unlink(missing_ok=True)
        values: dict[str, Any] = {"kind": "disk", "disk_file": disk.name, "disk_format": "qcow2"}
        details: dict[str, Any] = {}
        if params.cloud_init:
            details.update(cloud_init=True, ssh=True, default_user="corral")
        if params.firmware:
            details["firmware"] = params.firmware  # VMs boot through it unless they ask otherwise
        if details:
            values["details"] = details
        for boot_file, target in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
            if boot_file is None:
                continue
            ctx.progress(0.9, f"copying {boot_file.label}")
            with opened(boot_file) as (fd, _):
                await asyncio.to_thread(_copy_fd, fd, directory / target, 0o640, MAX_BOOT_FILE, boot_file.label)
        if kernel is not None:
            values.update(
                kind="kernel",
                kernel_file="vmlinuz",
                cmdline=params.cmdline or "console=ttyS0 root=/dev/vda rw",
            )
        if initrd is not None:
            values["initrd_file"] = "initrd.img"
        info = qemu_img.info(disk, binary, "qcow2")
        _mark_ready(
            ctx,
            directory=str(directory),
            virtual_size=int(info["virtual-size"]),
            size_on_disk=sum(p.stat().st_size for p in directory.iterdir()),
            **values,
        )
    except BaseException:
        _discard(ctx, directory)
        raise
    finally:
        for used in (source, kernel, initrd):
            if used is not None and used.kind is SourceKind.UPLOAD:
                used.path.unlink(missing_ok=True)
    return {"image": image.name}


async def delete(ctx: JobContext) -> dict[str, Any]:
    image = _image(ctx)
    shutil.rmtree(ctx.agent.layout.image_dir(image.id), ignore_errors=True)
    with ctx.agent.store.session() as session:
        row = session.get(Image, image.id)
        if row is not None:
            session.delete(row)
    return {"image": image.name}
