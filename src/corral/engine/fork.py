"""Instant clones: a running VM's device state saved without its RAM, and children started from it.

The fast path: the parent runs with its RAM in a shared file (``--forkable``). A fork pauses it, writes only
device and CPU state through the migration stream with ``x-ignore-shared`` (~300 KB, tens of ms), and copies the
RAM file once (page cache to page cache) so children get a file that never changes again. Each child maps that
file privately (copy-on-write) and loads the device state with ``-incoming defer``: it runs a fraction of a second
after its process starts, sharing every page it has not written with its siblings.

Any other running VM (one started without ``--forkable``, or a fork's child, whose RAM is a private mapping
nobody else can open) is forked through a *full* state file: the same migration stream with the RAM in it
(zero pages cost a flag each, so an idle guest writes only what it touched). Children load it into RAM of their
own. Slower than the fast path by the RAM actually written, but it needs nothing at the parent's start, so a
VM costs nothing for being forkable later.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

from corral.engine.process import QemuProcess
from corral.engine.snapshots import UNTHROTTLED
from corral.errors import EngineError

STATE_FD = "corral-state"


async def _ignore_shared(proc: QemuProcess, enabled: bool) -> None:
    await proc.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": enabled}]}
    )


async def _wait_migration(proc: QemuProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        status = (await proc.execute("query-migrate")).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            info = await proc.execute("query-migrate")
            raise EngineError(f"saving the device state failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise EngineError(f"saving the device state took longer than {timeout:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


RAM_BACKEND_ID = "ram0"


def ram_backing(argv: list[str]) -> tuple[str, Path | None]:
    """How a running QEMU holds guest RAM, read from its command line, and the file if any: ``shared`` (a file
    others may map: the fast path), ``private`` (a copy-on-write mapping: a fork's child) or ``anonymous``."""
    for flag, value in itertools.pairwise(argv):
        if flag != "-object" or "memory-backend-file" not in value:
            continue
        options = dict(part.split("=", 1) for part in value.replace(",,", "\0").split(",") if "=" in part)
        if options.get("id") != RAM_BACKEND_ID or options.get("qom-type") != "memory-backend-file":
            continue
        path = options.get("mem-path")
        kind = "shared" if options.get("share") == "on" else "private"
        return kind, Path(path.replace("\0", ",")) if path else None
    return "anonymous", None


async def save_device_state(proc: QemuProcess, state_path: Path, timeout: float = 60, with_ram: bool = False) -> None:
    """Write CPU and device state of a paused VM to ``state_path``; its RAM too with ``with_ram`` (otherwise the
    RAM is in the shared file and skipped)."""
    await _ignore_shared(proc, not with_ram)
    await proc.execute("migrate-set-parameters", {"max-bandwidth": UNTHROTTLED})
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await proc.pass_fd(STATE_FD, fd)
    finally:
        os.close(fd)
    try:
        await proc.execute("migrate", {"uri": f"fd:{STATE_FD}"})
        await _wait_migration(proc, timeout)
    finally:
        await _ignore_shared(proc, False)


async def load_device_state(proc: QemuProcess, state_path: Path, timeout: float = 60, with_ram: bool = False) -> None:
    """In a child started with ``-incoming defer``: take the parent's state (RAM too with ``with_ram``), then run."""
    await _ignore_shared(proc, not with_ram)
    if with_ram:
        await proc.execute("migrate-set-parameters", {"max-bandwidth": UNTHROTTLED})
    fd = os.open(state_path, os.O_RDONLY)
    try:
        await proc.pass_fd(STATE_FD, fd)
    finally:
        os.close(fd)
    await proc.execute("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
    deadline = time.monotonic() + timeout
    while await proc.run_state() == "inmigrate":
        if time.monotonic() > deadline:
            raise EngineError(f"the child did not load its state within {timeout:.0f} s")
        await asyncio.sleep(0.005)
    await proc.resume()


def freeze_copy(source: Path, dest: Path) -> None:
    """Copy a file kernel-side, keeping its holes: a guest's RAM file is mostly pages it never touched."""
    with source.open("rb") as src, dest.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        position = 0
        while position < size:
            try:
                data = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            offset = data
            while offset < hole:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), hole - offset, offset, offset)
                if copied == 0:
                    break
                offset += copied
            position = hole
        os.ftruncate(dst.fileno(), size)
