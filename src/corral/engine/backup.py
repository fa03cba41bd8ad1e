"""Full and incremental disk backups through QEMU's block layer, from a running VM or from stopped disks.

Why this mechanism: ``blockdev-backup`` copies a disk at one instant while the guest keeps writing (writes to
blocks not yet copied first push the old data to the target: copy-before-write), and a persistent dirty bitmap
in the VM's own qcow2 remembers which blocks changed since that instant. An incremental backup copies only those
blocks into a qcow2 whose backing file is the previous backup, so the chain reads as a whole disk. Starting the
copy and the next bitmap in one QMP ``transaction`` makes both happen at the same point in time: no write falls
between the backup and the bitmap that tracks what comes after it.

A stopped VM's disks go through the same code in a ``qemu-storage-daemon`` (the block layer of QEMU without a
machine): the bitmaps and the copy behave exactly as in a running VM, and ``quit`` writes the bitmaps back into
the qcow2 files.

Bitmaps are named after the backup whose instant they start at (``corral-<backup id>``): an incremental backup
needs its parent's bitmap on every disk, which makes a missing or stale bitmap (a restored disk, a crash that
left the bitmap inconsistent) an error to report instead of a silently wrong backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import QMPClient, QMPError

from corral.engine.qmp_client import QuietQMPClient
from corral.errors import EngineError

BITMAP_PREFIX = "corral-"


def bitmap_name(backup_id: str) -> str:
    return f"{BITMAP_PREFIX}{backup_id[:24]}"


class Monitor(Protocol):
    """What the backup needs of a QEMU or a storage daemon: QMP commands."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


@dataclass
class DiskCopy:
    """One disk of a backup: the source's QMP node and the qcow2 file to write."""

    node: str
    target: Path
    target_node: str = ""
    fdset: int | None = None
    job_id: str = ""


@dataclass
class BackupRun:
    """The state of one backup in one QEMU, so a failure can undo exactly what was made."""

    monitor: Monitor
    disks: list[DiskCopy]
    new_bitmap: str
    parent_bitmap: str | None = None
    started: bool = False
    added: list[str] = field(default_factory=list)


async def bitmaps(monitor: Monitor) -> dict[str, dict[str, dict[str, Any]]]:
    """Dirty bitmaps per node name: ``{node: {bitmap name: facts}}``."""
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    return {n["node-name"]: {b["name"]: b for b in n.get("dirty-bitmaps", [])} for n in nodes if n.get("node-name")}


async def check_parent_bitmap(monitor: Monitor, nodes: list[str], name: str) -> None:
    """An incremental backup is only right if every disk tracked changes since the parent, uninterrupted."""
    present = await bitmaps(monitor)
    for node in nodes:
        facts = present.get(node, {}).get(name)
        if facts is None:
            raise EngineError(
                f"disk {node} has no record of the changes since the last backup (bitmap {name})",
                "take a full backup: the disk was replaced or restored since",
            )
        if facts.get("inconsistent"):
            raise EngineError(
                f"the change record of disk {node} is inconsistent (QEMU did not close cleanly)", "take a full backup"
            )


async def open_targets(run: BackupRun, pass_fd: Callable[[int], Any] | None) -> None:
    """Attach each target qcow2 as a block node. With ``pass_fd`` the file is opened here and handed over
    (``add-fd``), so a sandboxed QEMU writes a file it could not open itself; ``backing: null`` keeps it from
    opening the previous backup (the job writes only the changed blocks; the chain is for readers)."""
    for index, disk in enumerate(run.disks):
        disk.target_node = f"backup-{run.new_bitmap[-8:]}-{index}"
        filename = str(disk.target)
        if pass_fd is not None:
            fd = os.open(disk.target, os.O_RDWR | os.O_CLOEXEC)
            try:
                disk.fdset = int(await pass_fd(fd))
            finally:
                os.close(fd)
            filename = f"/dev/fdset/{disk.fdset}"
        await run.monitor.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": disk.target_node,
                "backing": None,
                "file": {"driver": "file", "filename": filename},
            },
        )
        run.added.append(disk.target_node)


async def start(run: BackupRun) -> None:
    """The point in time: one transaction starts every disk's copy and the bitmap that follows on from it."""
    actions: list[dict[str, Any]] = []
    for index, disk in enumerate(run.disks):
        disk.job_id = f"{run.new_bitmap}-{index}"
        actions.append(
            {"type": "block-dirty-bitmap-add", "data": {"node": disk.node, "name": run.new_bitmap, "persistent": True}}
        )
        backup: dict[str, Any] = {
            "device": disk.node,
            "target": disk.target_node,
            "job-id": disk.job_id,
            "sync": "full",
            "auto-dismiss": False,
        }
        if run.parent_bitmap is not None:
            backup.update({"sync": "incremental", "bitmap": run.parent_bitmap})
        actions.append({"type": "blockdev-backup", "data": backup})
    # Not "grouped" completion: QEMU refuses it with bitmap actions; a failed disk fails the backup in ``wait``.
    await run.monitor.execute("transaction", {"actions": actions})
    run.started = True


async def wait(run: BackupRun, progress: Callable[[float], None] | None = None, timeout: float = 3600) -> None:
    """Poll the jobs until all concluded; any job's error fails the whole backup."""
    ids = {disk.job_id for disk in run.disks}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        jobs = [j for j in await run.monitor.execute("query-jobs") if j["id"] in ids]
        done = sum(int(j.get("current-progress", 0)) for j in jobs)
        total = sum(int(j.get("total-progress", 0)) for j in jobs)
        if progress is not None and total:
            progress(min(1.0, done / total))
        if all(j["status"] in ("concluded", "null") for j in jobs):
            break
        if loop.time() > deadline:
            raise EngineError(f"the backup did not finish within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    errors = [f"{j['id']}: {j['error']}" for j in jobs if j.get("error")]
    for job in jobs:
        with contextlib.suppress(EngineError):
            await run.monitor.execute("job-dismiss", {"id": job["id"]})
    if errors:
        raise EngineError(f"the backup job failed: {errors[0]}")


async def close_targets(run: BackupRun) -> None:
    for disk in run.disks:
        if disk.target_node in run.added:
            with contextlib.suppress(EngineError):
                await run.monitor.execute("blockdev-del", {"node-name": disk.target_node})
        if disk.fdset is not None:
            with contextlib.suppress(EngineError):
                await run.monitor.execute("remove-fd", {"fdset-id": disk.fdset})
    run.added.clear()


async def settle_bitmaps(run: BackupRun, succeeded: bool) -> None:
    """After success only the new bitmap stays on each disk (older ones track instants no backup needs); after a
    failure the new bitmap goes and the parent's stays (QEMU merges a failed incremental's bits back into it)."""
    if not run.started:
        return
    present = await bitmaps(run.monitor)
    for disk in run.disks:
        for name in present.get(disk.node, {}):
            if not name.startswith(BITMAP_PREFIX):
                continue
            stale = (name != run.new_bitmap) if succeeded else (name == run.new_bitmap)
            if stale:
                with contextlib.suppress(EngineError):
                    await run.monitor.execute("block-dirty-bitmap-remove", {"node": disk.node, "name": name})


async def drop_bitmaps(monitor: Monitor, nodes: list[str], keep: str | None = None) -> None:
    """Remove corral's bitmaps from these disks (all, or all but ``keep``): they cost a write-tracking per disk."""
    present = await bitmaps(monitor)
    for node in nodes:
        for name in present.get(node, {}):
            if name.startswith(BITMAP_PREFIX) and name != keep:
                with contextlib.suppress(EngineError):
                    await monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


class StorageDaemon:
    """A ``qemu-storage-daemon`` with a stopped VM's disks as nodes ``disk0``... and a QMP monitor."""

    def __init__(self, disks: list[Path], socket: Path, binary: str = "qemu-storage-daemon") -> None:
        self.disks = disks
        self.socket = socket
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None

    async def __aenter__(self) -> StorageDaemon:
        argv = [self.binary]
        for index, path in enumerate(self.disks):
            if "," in str(path):
                raise EngineError(f"disk path {path} contains a comma", "rename the pool directory")
            argv += [
                "--blockdev",
                f"driver=file,filename={path},node-name=file{index}",
                "--blockdev",
                f"driver=qcow2,file=file{index},node-name=disk{index}",
            ]
        self.socket.unlink(missing_ok=True)
        argv += ["--chardev", f"socket,id=qmp,path={self.socket},server=on,wait=off", "--monitor", "chardev=qmp"]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise EngineError(f"{self.binary} not found", "install qemu-system-common (qemu-storage-daemon)") from exc
        try:
            await self._connect()
        except BaseException:
            await self._stop()
            raise
        return self

    async def _connect(self, timeout: float = 15) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace").strip()
                raise EngineError(f"qemu-storage-daemon failed: {err.splitlines()[-1] if err else 'it exited'}")
            if self.socket.exists():
                client = QuietQMPClient("backup")
                try:
                    await client.connect(str(self.socket))
                except (QMPError, OSError):
                    pass
                else:
                    self._qmp = client
                    return
            await asyncio.sleep(0.01)
        raise EngineError("qemu-storage-daemon's monitor did not answer")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._qmp is None:
            raise EngineError(f"cannot run {command}: the storage daemon is not running")
        try:
            return await self._qmp.execute(command, arguments)
        except QMPError as exc:
            raise EngineError(f"QMP {command} failed: {exc}") from exc

    async def _stop(self) -> None:
        """SIGTERM: the daemon closes its images cleanly, which writes persistent bitmaps into them."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self._proc.wait, 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self.socket.unlink(missing_ok=True)

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()


def allocated_bytes(path: Path) -> int:
    """What a file really takes on disk (a sparse qcow2 is smaller than its length)."""
    return path.stat().st_blocks * 512
