"""Volumes on this host's directory pool: creating, resizing and removing their qcow2 files.

A volume's file is created exclusively (``claim``): never through a link, never over a file that is already
there, root's and 0600 from its first byte. A job removes only files it made itself: whoever finds a file where
a new volume should go refuses, and the file stays as it was (issue 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.engine import qemu_img
from corral.errors import Conflict, NotFound
from corral.host.layout import inside_pool, pool_file
from corral.store.models import Image, Volume

BASES = "bases"
TEMPLATES = "templates"
FILE_MODE = 0o600  # a disk is root's until a launch gives it to its VM's uid
DIR_MODE = 0o711  # pools, bases, templates: sandboxed QEMUs pass through, nobody lists them

if TYPE_CHECKING:
    from corral.host.agent import Agent


def volume_path(agent: Agent, volume: Volume) -> Path:
    """The volume's entry in its pool (its last component unresolved: see ``layout.pool_file``)."""
    return pool_file(agent.layout.pool(volume.pool), volume.path)


def claim(path: Path, what: str | None = None) -> Path:
    """Create ``path`` empty, 0600, exclusively: ``O_CREAT | O_EXCL`` fails on anything already there, a symbolic
    link included (it is never followed), so a job never writes into, or later deletes, a file it did not make.
    qemu-img then writes into the claimed file (it truncates and keeps the mode). The caller owns the file from
    here on and removes it if its job fails."""
    make_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        raise Conflict(
            f"a file is already where {what or 'a new disk'} would be created ({path.name} in its pool); "
            "it was left untouched",
            "corral never overwrites or deletes a file it did not make: an administrator must move it away",
        ) from None
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask was
    finally:
        os.close(fd)
    return path


def make_dir(path: Path) -> None:
    """A pool directory (pool, bases, templates): root's, searchable by sandboxed QEMUs, listable by nobody."""
    if not path.is_dir():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)


async def materialize(agent: Agent, volume: Volume, image: Image | None) -> None:
    """Make the volume's file: an overlay on its image (instant, linked) or a blank qcow2. It is claimed first
    (see ``claim``); if qemu-img fails, the claimed file is removed, and only that file."""
    path = claim(volume_path(agent, volume), f"volume {volume.name}")
    binary = agent.settings.qemu_img_binary
    try:
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
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove(agent: Agent, volume: Volume) -> None:
    """Delete the volume's file (a link there is removed, not its target). Callers remove only volumes whose
    file is theirs: a ready volume being deleted, or one their own job claimed."""
    volume_path(agent, volume).unlink(missing_ok=True)


def collect_bases(agent: Agent, session: Session, pool: str = "default") -> list[str]:
    """Delete frozen bases (made by linked clones) that no volume is an overlay of any more.

    Reference counts come from the store, not from luck: a base stays while any volume row names it."""
    bases = agent.layout.pool(pool) / BASES
    if not bases.is_dir():
        return []
    used = {p for p in session.scalars(select(Volume.backing_path).where(Volume.backing_path.is_not(None))) if p}
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


def return_to_root(path: Path) -> None:
    """A kept disk was owned by the deleted VM's uid, which a future VM may get: give it back to root."""
    with contextlib.suppress(OSError):
        os.chown(path, 0, 0)
        os.chmod(path, 0o600)
