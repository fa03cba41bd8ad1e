"""Images on this host: the built-in tiny image, imports of users' disks or kernels, and removal."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.errors import InvalidInput, NotFound
from corral.store.models import Image

if TYPE_CHECKING:
    from corral.host.agent import JobContext

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

    recipe = ctx.params.get("recipe", "tiny")
    if recipe not in BUILDERS:
        raise InvalidInput(f"unknown image recipe {recipe!r}", f"choose one of: {', '.join(BUILDERS)}")
    image = _image(ctx)
    directory = ctx.agent.layout.image_dir(image.id)
    loop = asyncio.get_running_loop()

    def progress(fraction: float, message: str) -> None:  # called from the builder's thread
        loop.call_soon_threadsafe(ctx.note, 0.95 * fraction, message)

    details: dict[str, Any] = {"recipe": recipe}
    try:
        if recipe == "debian":
            from corral.images.debian import build_debian_image

            built = await asyncio.to_thread(
                build_debian_image, directory, ctx.agent.settings.cache, ctx.params.get("release", "bookworm"),
                ctx.params.get("packages", []), ctx.params.get("size", 4 << 30), progress,
            )
            details.update(cloud_init=True, ssh=True, default_user="corral", min_memory=512 << 20,
                           release=ctx.params.get("release"), packages=ctx.params.get("packages", []))
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


async def import_image(ctx: JobContext) -> dict[str, Any]:
    """Copy a user's disk image (and optional kernel/initrd) into the store, converted to qcow2."""
    image = _image(ctx)
    directory = ctx.agent.layout.image_dir(image.id)
    binary = ctx.agent.settings.qemu_img_binary
    source = Path(ctx.params["file"])
    kernel = Path(ctx.params["kernel"]) if ctx.params.get("kernel") else None
    initrd = Path(ctx.params["initrd"]) if ctx.params.get("initrd") else None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        ctx.progress(0.05, f"checking {source}")
        facts = await asyncio.to_thread(qemu_img.check_importable, source, binary)
        ctx.progress(0.1, "copying the disk")
        disk = directory / "disk.qcow2"
        await asyncio.to_thread(qemu_img.convert, source, disk, "qcow2", binary, facts.get("format"))
        values: dict[str, Any] = {"kind": "disk", "disk_file": disk.name, "disk_format": "qcow2"}
        details: dict[str, Any] = {}
        if ctx.params.get("cloud_init"):
            details.update(cloud_init=True, ssh=True, default_user="corral")
        if ctx.params.get("firmware"):
            details["firmware"] = ctx.params["firmware"]  # VMs boot through it unless they ask otherwise
        if details:
            values["details"] = details
        if kernel is not None:
            shutil.copyfile(kernel, directory / "vmlinuz")
            values.update(
                kind="kernel",
                kernel_file="vmlinuz",
                cmdline=ctx.params.get("cmdline") or "console=ttyS0 root=/dev/vda rw",
            )
        if initrd is not None:
            shutil.copyfile(initrd, directory / "initrd.img")
            values["initrd_file"] = "initrd.img"
        info = qemu_img.info(disk, binary)
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
    return {"image": image.name}


async def delete(ctx: JobContext) -> dict[str, Any]:
    image = _image(ctx)
    shutil.rmtree(ctx.agent.layout.image_dir(image.id), ignore_errors=True)
    with ctx.agent.store.session() as session:
        row = session.get(Image, image.id)
        if row is not None:
            session.delete(row)
    return {"image": image.name}
