"""The serial console over a websocket, and the serial log (tail or follow).

QEMU serves the console on a unix socket next to the VM; this route bridges it to a websocket so the CLI
(and later the web console) reach it through the API alone, locally or remotely.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from corral.api.auth import PROJECT_QUERY, Caller, resolve, viewer
from corral.api.state import AppState, app_state
from corral.cluster import vms
from corral.cluster.identity import Role
from corral.errors import Conflict

router = APIRouter(prefix="/vms", tags=["console"])


def _vm_paths(state: AppState, name: str, project: str) -> tuple[str, Path]:
    with state.store.reading() as session:
        vm = vms.get_vm(session, name, project)
        return vm.id, state.layout.vm_run_dir(vm.id)


def _vm_exists(state: AppState, vm_id: str) -> bool:
    from corral.store.models import VM

    with state.store.session() as session:
        return session.get(VM, vm_id) is not None


def _tail(path: Path, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of the log and the offset where following should continue."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b"", 0
    if lines <= 0:
        return b"", len(data)
    parts = data.split(b"\n")
    keep = parts[-(lines + 1) :] if data.endswith(b"\n") else parts[-lines:]
    return b"\n".join(keep), len(data)


@router.get("/{name}/logs")
async def vm_logs(
    name: str,
    lines: int = Query(200, ge=0, le=100000),
    follow: bool = False,
    caller: Caller = Depends(viewer),
    state: AppState = Depends(app_state),
) -> StreamingResponse:
    vm_id, run_dir = await asyncio.to_thread(_vm_paths, state, name, caller.project)
    log_path = run_dir / "serial.log"

    async def stream() -> AsyncIterator[bytes]:
        head, offset = await asyncio.to_thread(_tail, log_path, lines)
        if head:
            yield head
        checks = 0
        while follow:
            await asyncio.sleep(0.2)
            try:
                with log_path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                yield chunk
            checks += 1
            if checks % 25 == 0 and not await asyncio.to_thread(_vm_exists, state, vm_id):
                return

    return StreamingResponse(stream(), media_type="text/plain")


@router.websocket("/{name}/console")
async def vm_console(websocket: WebSocket, name: str, project: str | None = PROJECT_QUERY) -> None:
    """The console is a lifecycle verb: it needs the operator role (checked after accepting, so that the refusal
    reaches the client as a message rather than a bare failed handshake)."""
    state: AppState = websocket.app.state.corral
    await websocket.accept()
    try:
        caller = await asyncio.to_thread(resolve, websocket, project, Role.OPERATOR)
        _, run_dir = await asyncio.to_thread(_vm_paths, state, name, caller.project)
        try:
            reader, writer = await asyncio.open_unix_connection(str(run_dir / "console.sock"))
        except OSError as exc:
            raise Conflict(
                f"VM {name} is not running (its console is closed)", f"start it with `corral vm start {name}`"
            ) from exc
    except Exception as exc:  # report to the client in-band, then close
        await websocket.send_json({"error": str(exc)})
        await websocket.close(code=4404)
        return
    await websocket.send_json({"connected": name})

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
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception, WebSocketDisconnect):
            await websocket.close()
