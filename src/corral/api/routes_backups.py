"""Backup routes (create, list, show, delete, restore) and VM export / import, each a job."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from corral.api.auth import Caller, operator, viewer
from corral.api.routes_uploads import origin_of
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView
from corral.cluster import backups
from corral.errors import NotFound
from corral.spec.sources import TRANSFER_ID, expire, exports_dir
from corral.store.models import Backup

router = APIRouter(tags=["backups"])
ACCEPTED = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


class BackupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, description="None: kind and time, e.g. full-20250101-120000")
    incremental: bool = False


class BackupRestore(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_name: str | None = Field(default=None, description="a new VM; None: over the stopped VM, or anew if gone")


class VMExport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "the local admin only: absolute path of the new archive on the server host; None: kept for the caller "
            "to download from GET /exports/{id} (the id is in the job's result)"
        ),
    )
    compress: bool = False


class VMImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "the archive on the server: a host path (the local admin only) or a plain name in the import directory"
        ),
    )
    upload: str | None = Field(default=None, description="the id of an upload (POST /uploads) of the archive")
    name: str | None = None


class BackupView(BaseModel):
    name: str
    vm: str
    kind: str
    parent: str | None
    chain: list[str]
    state: str
    live: bool
    size: int
    disks: list[dict[str, Any]]
    created_at: datetime
    spec: dict[str, Any] | None = None

    @classmethod
    def of(cls, session: Session, row: Backup, detail: bool = False) -> BackupView:
        links = backups.chain(session, row)
        return cls(
            name=row.name,
            vm=row.vm_name,
            kind=row.kind,
            parent=links[-2].name if len(links) > 1 else None,
            chain=[b.name for b in links],
            state=row.state,
            live=row.live,
            size=row.size,
            disks=row.disks,
            created_at=row.created_at,
            spec=row.spec if detail else None,
        )


@router.get("/backups", response_model=list[BackupView])
def list_backups(
    vm: str | None = None, caller: Caller = Depends(viewer), session: Session = Depends(db_session)
) -> list[BackupView]:
    return [BackupView.of(session, row) for row in backups.list_backups(session, caller.project, vm)]


@router.get("/vms/{vm_name}/backups/{name}", response_model=BackupView)
def show_backup(
    vm_name: str, name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)
) -> BackupView:
    return BackupView.of(session, backups.get_backup(session, vm_name, name, caller.project), detail=True)


@router.post("/vms/{vm_name}/backups", **ACCEPTED)
def create_backup(
    vm_name: str, request: BackupCreate, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = backups.create(session, vm_name, request.name, request.incremental, caller.project)
        return Accepted(job=JobView.of(job))


@router.delete("/vms/{vm_name}/backups/{name}", **ACCEPTED)
def delete_backup(
    vm_name: str, name: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(backups.delete(session, vm_name, name, caller.project)))


@router.post("/vms/{vm_name}/backups/{name}/restore", **ACCEPTED)
def restore_backup(
    vm_name: str,
    name: str,
    request: BackupRestore | None = None,
    caller: Caller = Depends(operator),
    state: AppState = Depends(app_state),
) -> Accepted:
    with state.store.session() as session:
        as_name = (request or BackupRestore()).as_name
        return Accepted(job=JobView.of(backups.restore(session, vm_name, name, as_name, caller.project)))


@router.post("/vms/{vm_name}/export", **ACCEPTED)
def export_vm(
    vm_name: str,
    request: VMExport,
    http: Request,
    caller: Caller = Depends(operator),
    state: AppState = Depends(app_state),
) -> Accepted:
    """To a host path (the local admin only), or kept for download: the job's result names the export's id."""
    with state.store.session() as session:
        job = backups.export(session, vm_name, request.file, request.compress, caller.project, origin_of(http))
        return Accepted(job=JobView.of(job))


@router.post("/vms/import", **ACCEPTED)
def import_vm(
    request: VMImport, http: Request, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = backups.import_(session, request.file, request.name, caller.project, origin_of(http), request.upload)
        return Accepted(job=JobView.of(job))


def _export_file(state: AppState, project: str, export_id: str) -> Path:
    directory = exports_dir(state.settings.home, project)
    expire(directory, state.settings.transfer_expiry)
    path = directory / f"{export_id}.tar"
    if not TRANSFER_ID.match(export_id) or not path.is_file() or path.is_symlink():
        raise NotFound(
            f"export {export_id[:12]} not found",
            "it was downloaded and deleted, expired, or is not finished: follow its job first",
        )
    return path


@router.get("/exports/{export_id}", response_class=FileResponse)
def download_export(
    export_id: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> FileResponse:
    """Stream an export made for download; the caller deletes it once saved (or it expires)."""
    path = _export_file(state, caller.project, export_id)
    return FileResponse(path, media_type="application/x-tar", filename=f"export-{export_id[:12]}.tar")


@router.delete("/exports/{export_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_export(export_id: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)) -> None:
    _export_file(state, caller.project, export_id).unlink(missing_ok=True)
