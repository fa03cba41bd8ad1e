"""Volumes on this host's directory pool: creating, resizing and removing their qcow2 files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.engine import qemu_img
from corral.errors import NotFound
from corral.host.layout import inside_pool
from corral.store.models import Image, Volume

BASES = "bases"
TEMPLATES = "templates"

if TYPE_CHECKING:
    from corral.host.agent import Agent


def volume_path(agent: Agent, volume: Volume):  # type: ignore[no-untyped-def]
    return inside_pool(agent.layout.pool(volume.pool), volume.path)


async def materialize(agent: Agent, volume: Volume, image: Image | None) -> None:
    """Make the volume's file: an overlay on its image (instant, linked) or a blank qcow2."""
    path = volume_path(agent, volume)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = agent.settings.qemu_img_binary
    if volume.backing_path is not None:
        base = inside_pool(agent.layout.pool(volume.pool), volume.backing_path)
        await asyncio.to_thread(qemu_img.create_overlay, path, base, "qcow2", None, binary)
    elif volume.backing_image is not None:
        if image is None or not image.disk_file:
            raise NotFound("the volume's image is missing", "import or build the image again")
        base = agent.layout.image_dir(image.id) / image.disk_file
        await asyncio.to_thread(qemu_img.check, base, binary)
        size = max(volume.size, image.virtual_size) if volume.size else None
        await asyncio.to_thread(qemu_img.create_overlay, path, base, image.disk_format, size, binary)
    else:
        await asyncio.to_thread(qemu_img.create_blank, path, volume.size, binary)


def remove(agent: Agent, volume: Volume) -> None:
    volume_path(agent, volume).unlink(missing_ok=True)


def collect_bases(agent: Agent, session: Session, pool: str = "default") -> list[str]:
    """Delete frozen bases (made by linked clones) that no volume is an overlay of any more.

    Reference counts come from the store, not from luck: a base stays while any volume row names it."""
    bases = agent.layout.pool(pool) / BASES
    if not bases.is_dir():
        return []
    used = set(session.scalars(select(Volume.backing_path).where(Volume.backing_path.is_not(None))))
    # A base may itself sit on an older base (a source cloned twice): keep whole chains.
    pending = [p for p in used if p.startswith(f"{BASES}/")]
    while pending:
        facts = qemu_img.info(agent.layout.pool(pool) / pending.pop(), agent.settings.qemu_img_binary)
        backing = facts.get("full-backing-filename") or facts.get("backing-filename")
        if backing and Path(backing).parent == bases:
            relative = f"{BASES}/{Path(backing).name}"
            if relative not in used:
                used.add(relative)
                pending.append(relative)
    removed = []
    for path in bases.glob("*.qcow2"):
        if f"{BASES}/{path.name}" not in used:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
