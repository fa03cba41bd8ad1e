"""The serial console over a websocket, and the serial log (tail or follow).

QEMU serves the console on a unix socket next to the VM; this route bridges it to a websocket so the CLI and the
web console reach it through the API alone, locally or remotely. Every connection (and every log follower, every
two seconds) looks up where the VM runs now, so a client that reconnects after a live migration reaches the VM on
its new host (docs/ui.md, "The console across a live migration").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from corral.api.auth import PROJECT_QUERY, Caller, resolve, viewer
from corral.api.disclosure import tell
from corral.api.limits import HeldStream, slots
from corral.api.state import AppState, app_state
from corral.cluster import vms
from corral.cluster.identity import Role
from corral.errors import Conflict, CorralError, TooManyRequests
from corral.layout import HostLayout

router = APIRouter(prefix="/vms", tags=["console"])
log = logging.getLogger("corral.api")


HOSTS_DIR = "hosts"  # under the daemon's home: one entry per pool host whose home this daemon can reach


def _vm_paths(state: AppState, name: str, project: str) -> tuple[str, Path]:
    """The VM's id and its run directory on the host that runs it *now*, read afresh on every call: a console or
    log follower that opens again after a live migration finds the VM on its new host.

    A daemon that runs the VM itself (one host, or a pool member with its agent) has it under its own home. A
    pool's control plane (`corral serve --no-agent`) runs none: it reaches a host's run directories through
    ``HOME/hosts/<host>``, the host's home as this machine sees it (a link in a pool on one machine,
    corral.localpool; a shared mount elsewhere). The host's name comes from the store, where names are checked."""
    with state.store.reading() as session:
        vm = vms.get_vm(session, name, project)
        vm_id, host = vm.id, vm.host
    return vm_id, _run_dir(state, vm_id, host)


def _run_dir(state: AppState, vm_id: str, host: str | None) -> Path:
    if host:
        remote = state.layout.home / HOSTS_DIR / host
        if remote.is_dir():
            return HostLayout(remote).vm_run_dir(vm_id)
    return state.layout.vm_run_dir(vm_id)


def _run_dir_now(state: AppState, vm_id: str) -> Path | None:
    """Where the VM runs now (a follower re-reads it: the VM may have moved), or None once it is deleted."""
    from corral.store.models import VM

    with state.store.reading() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            return None
        host = vm.host
    return _run_dir(state, vm_id, host)


def _console_closed(state: AppState, name: str, project: str, run_dir: Path) -> CorralError:
    """Why the console socket did not open: the VM is not running, or it runs on a host whose run directory this
    daemon has no way into (no ``HOME/hosts/<host>``: a pool's control plane on another machine than the host)."""
    with state.store.reading() as session:
        vm = vms.get_vm(session, name, project)
        running, host = vm.observed_state in ("running", "paused"), vm.host
    if running and host and not run_dir.exists():
        return Conflict(
            f"VM {name} runs on host {host}, whose consoles this daemon cannot reach",
            f"give the control plane the host's home at CORRAL_HOME/{HOSTS_DIR}/{host} (docs/ui.md), "
            "or open the console on that host",
        )
    return Conflict(f"VM {name} is not running (its console is closed)", f"start it with `corral vm start {name}`")


TAIL_MAX = 1 << 20  # the most `vm logs` reads back at once: the last MiB of the log (both parts together)
FOLLOW_CHUNK = 64 << 10  # the most one pass of --follow reads
REPLAY_MAX = 1000  # the most lines a console replays when it opens


def _open_log(path: Path) -> BinaryIO:
    """The log for reading, never through a link nor anything but a plain file: the run directory belongs to the
    VM's QEMU user, and the daemon reads as root."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(path)
    return os.fdopen(fd, "rb")


def _last_bytes(path: Path, budget: int) -> tuple[bytes, int, bool]:
    """Up to ``budget`` bytes from the end of ``path``, the file's size, and whether that was all of it."""
    try:
        with _open_log(path) as handle:
            size = handle.seek(0, 2)
            start = max(0, size - budget)
            handle.seek(start)
            return handle.read(size - start), size, start == 0
    except OSError:
        return b"", 0, True


def tail_log(path: Path, lines: int, budget: int = TAIL_MAX) -> tuple[bytes, int]:
    """The last ``lines`` lines of the serial log (within ``budget`` bytes, reaching into the previous part the
    agent kept at its last rotation when the current one is short) and the offset where following continues.
    The guest decides what the log holds, so nothing here reads more than ``budget`` whatever its size."""
    data, size, whole = _last_bytes(path, budget)
    if lines <= 0:
        return b"", size
    if whole and data.count(b"\n") < lines and len(data) < budget:
        older, _, older_whole = _last_bytes(path.with_name(path.name + ".1"), budget - len(data))
        data, whole = older + data, older_whole
    if not whole:  # the first line was cut by the budget
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    parts = data.split(b"\n")
    keep = parts[-(lines + 1) :] if data.endswith(b"\n") else parts[-lines:]
    return b"\n".join(keep), size


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """What was appended since ``offset`` (at most FOLLOW_CHUNK), and the new offset. A file shorter than the
    offset was rotated (truncated) by the agent: follow it from its start."""
    try:
        with _open_log(path) as handle:
            size = handle.seek(0, 2)
            if size < offset:
                offset = 0
            handle.seek(offset)
            chunk = handle.read(FOLLOW_CHUNK)
    except OSError:
        return b"", offset
    return chunk, offset + len(chunk)


@router.get("/{name}/logs")
async def vm_logs(
    request: Request,
    name: str,
    lines: int = Query(200, ge=0, le=100000),
    follow: bool = False,
    caller: Caller = Depends(viewer),
    state: AppState = Depends(app_state),
) -> StreamingResponse:
    """The serial log's last ``lines`` lines (at most its last MiB), then with ``follow`` what the guest prints
    next, streamed in bounded chunks. A follower holds one of its token's capped slots."""
    vm_id, run_dir = await asyncio.to_thread(_vm_paths, state, name, caller.project)
    log_path = run_dir / "serial.log"

    async def stream() -> AsyncIterator[bytes]:
        path = log_path
        head, offset = await asyncio.to_thread(tail_log, path, lines)
        if head:
            yield head
        checks = 0
        while follow:
            chunk, offset = await asyncio.to_thread(_read_from, path, offset)
            if chunk:
                yield chunk
                if len(chunk) == FOLLOW_CHUNK:
                    continue  # more is waiting
            else:
                await asyncio.sleep(0.2)
            checks += 1
            if checks % 10 == 0:  # every 10 reads (2 s when idle): is the VM still there, on the same host?
                now = await asyncio.to_thread(_run_dir_now, state, vm_id)
                if now is None:
                    return
                if now / "serial.log" != path:  # it moved: the new host's log begins with the new QEMU
                    path, offset = now / "serial.log", 0

    release = slots(request).take(request, "log follow") if follow else (lambda: None)
    return HeldStream(stream(), media_type="text/plain", release=release)


@router.websocket("/{name}/console")
async def vm_console(websocket: WebSocket, name: str, project: str | None = PROJECT_QUERY, replay: int = 0) -> None:
    """The console is a lifecycle verb: it needs the operator role (checked after accepting, so that the refusal
    reaches the client as a message rather than a bare failed handshake).

    ``replay`` (lines, at most REPLAY_MAX): the serial log's last lines, sent first, read once the console socket
    is open, so that nothing the guest prints between the two is lost (the web console replays on open; a
    separate log request before connecting missed what came in between, a boot's shell banner, say)."""
    state: AppState = websocket.app.state.corral
    await websocket.accept()
    release: Callable[[], None] = lambda: None  # noqa: E731
    try:
        caller = await asyncio.to_thread(resolve, websocket, project, Role.OPERATOR)
        _, run_dir = await asyncio.to_thread(_vm_paths, state, name, caller.project)
        # A console holds a connection and a QEMU socket for as long as it stays: one of the caller's capped slots.
        release = slots(websocket).take(websocket, "console")
        try:
            reader, writer = await asyncio.open_unix_connection(str(run_dir / "console.sock"))
        except OSError as exc:
            raise await asyncio.to_thread(_console_closed, state, name, caller.project, run_dir) from exc
        recent = b""
        if replay > 0:
            recent, _ = await asyncio.to_thread(tail_log, run_dir / "serial.log", min(replay, REPLAY_MAX), TAIL_MAX)
    except Exception as exc:  # report to the client in-band, then close
        release()
        if not isinstance(exc, CorralError):
            log.error("console of VM %s failed", name, exc_info=exc)
        await websocket.send_json({"error": tell(websocket, exc)})
        await websocket.close(code=4429 if isinstance(exc, TooManyRequests) else 4404)
        return
    await websocket.send_json({"connected": name})
    if recent:  # as a terminal shows it: every line ends with CR LF, as the guest's tty sends them live
        await websocket.send_bytes(recent.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    async def vm_to_client() -> None:
        while data := await reader.read(4096):
            await websocket.send_bytes(data)

    async def client_to_vm() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(vm_to_client()), asyncio.create_task(client_to_vm())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        release()
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception, WebSocketDisconnect):
            await websocket.close()
