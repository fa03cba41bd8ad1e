"""Uploads: how a remote caller hands the daemon the bytes of an image, a kernel, an initrd or a VM export.

A remote caller never names a path on the server's host (corral.spec.sources): it streams the file here, gets an
id, and passes that id to ``POST /images/import`` or ``POST /vms/import``. The body is authenticated before a byte
is read (the route's dependencies run first), written as it arrives to a root-only 0600 file under
``CORRAL_HOME/uploads/<project>/`` (never held in memory), limited by ``max_upload_size`` and by what is left of
the project's disk quota, and removed if it ends early. The import that names an upload consumes it; an upload
nobody used expires after ``transfer_expiry`` seconds.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from corral.api.auth import LOCAL, Caller, operator
from corral.api.state import AppState, app_state
from corral.cluster import quotas
from corral.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from corral.spec.sizes import format_size
from corral.spec.sources import TRANSFER_ID, Origin, expire, private_dir, uploads_dir
from corral.store.models import Project

router = APIRouter(tags=["storage"])
CHUNK = 1 << 20
MAX_PENDING = 16  # uploads a project may hold at once, unused or in flight


class TooLarge(InvalidInput):
    """A body over the size a route accepts: 413, though the SDK sees the same InvalidInput."""

    http_status = 413


class UploadView(BaseModel):
    id: str
    size: int
    sha256: str
    expires_in: float


def origin_of(request: Request) -> Origin:
    """Who asks (the unix socket's local root, or a remote caller) and where the server keeps files: decided
    here, in the API layer, from the ASGI scope no client can forge, and passed down to the control plane."""
    settings = app_state(request).settings
    return Origin(home=settings.home, import_dir=settings.import_dir, local=request.scope.get(LOCAL) is True,
                  expiry=settings.transfer_expiry)  # fmt: skip


def _room(state: AppState, project: str) -> int:
    """The most this upload may be: the server's limit, and what the project's disk quota has left once its
    disks, backups and pending uploads are counted."""
    limit = state.settings.max_upload_size
    directory = uploads_dir(state.settings.home, project)
    pending = 0
    if directory.is_dir():
        entries = [entry for entry in os.scandir(directory) if entry.is_file(follow_symlinks=False)]
        if len(entries) >= MAX_PENDING:
            raise Conflict(
                f"project {project!r} already holds {len(entries)} uploads",
                "import or delete them (DELETE /uploads/ID), or wait for them to expire",
            )
        pending = sum(entry.stat(follow_symlinks=False).st_size for entry in entries)
    with state.store.reading() as session:
        row = session.get(Project, project)
        if row is None or row.max_disk is None:
            return limit
        left = row.max_disk - quotas.usage(session, project).disk - pending
    if left <= 0:
        raise QuotaExceeded(f"quota max-disk of project {project!r} is used up", "free some disk space first")
    return min(limit, left)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"the upload is larger than the {format_size(limit)} this project may upload now",
        "the server's max_upload_size and the project's disk quota set this limit",
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that hangs up is an incomplete upload, not a server error."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise InvalidInput("the upload ended early: the client hung up", "upload it again") from None


@router.post("/uploads", status_code=status.HTTP_201_CREATED, response_model=UploadView)
async def upload(request: Request, caller: Caller = Depends(operator)) -> UploadView:
    """Stream the request body to a new upload of the caller's project; answer its id, size and sha256."""
    state = app_state(request)
    settings = state.settings
    limit = await run_in_threadpool(_room, state, caller.project)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("invalid Content-Length", "send the file's length, or use chunked encoding")
        if int(declared) > limit:
            raise _too_large(limit)
    directory = await run_in_threadpool(private_dir, uploads_dir(settings.home, caller.project))
    await run_in_threadpool(expire, directory, settings.transfer_expiry)
    ident = secrets.token_hex(16)
    partial = directory / f"{ident}.part"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray()
    complete = False
    try:
        async for chunk in _body(request):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            digest.update(chunk)
            buffer += chunk
            if len(buffer) >= CHUNK:
                await run_in_threadpool(_write_all, fd, bytes(buffer))
                buffer.clear()
        if buffer:
            await run_in_threadpool(_write_all, fd, bytes(buffer))
        if declared is not None and size != int(declared):
            raise InvalidInput(f"the upload ended after {size} of {declared} bytes", "upload it again")
        os.rename(partial, directory / ident)
        complete = True
    finally:
        os.close(fd)
        if not complete:
            partial.unlink(missing_ok=True)  # an upload that ended early, or too large, leaves nothing
    return UploadView(id=ident, size=size, sha256=digest.hexdigest(), expires_in=settings.transfer_expiry)


@router.delete("/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_upload(upload_id: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)) -> None:
    """Drop an upload the project no longer needs (an import consumes its uploads by itself)."""
    path = uploads_dir(state.settings.home, caller.project) / upload_id
    try:
        if not TRANSFER_ID.match(upload_id):
            raise FileNotFoundError
        os.unlink(path)
    except FileNotFoundError:
        raise NotFound(f"upload {upload_id[:12]} not found", "it was used by an import or expired") from None
