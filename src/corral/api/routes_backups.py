"""Backup routes (create, list, show, delete, restore, verify, schedules) and VM export / import, each a job."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from corral.api.auth import Caller, operator, viewer
from corral.api.routes_uploads import origin_of
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView
from corral.cluster import backup_schedules, backups
from corral.errors import NotFound
from corral.spec.sources import TRANSFER_ID, expire, exports_dir
from corral.store.models import Backup, BackupSchedule

router = APIRouter(tags=["backups"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


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
    format: Literal["tar", "ova"] = Field(default="tar", description="tar: corral's own; ova: OVF 1.x with VMDKs")


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
    network: str | None = Field(
        default=None,
        description="the network every NIC goes on (default: as exported, "
        "or user-mode NAT for an OVA or a libvirt domain)",
    )


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
    scheduled: bool = False
    verify_state: str | None = Field(default=None, description="ok or corrupt; None: never verified")
    verified_at: datetime | None = None
    verify_error: str | None = None
    backup_store: str | None = Field(default=None, description="identity of the backup directory it is in")

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
            scheduled=row.schedule_id is not None,
            verify_state=row.verify_state,
            verified_at=row.verified_at,
            verify_error=row.verify_error,
            backup_store=row.backup_store,
        )


class ScheduleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: str = Field(max_length=32, description="interval: 30s, 15m, 1h, 1d, 1w or plain seconds")
    keep_last: int = Field(default=24, ge=0, le=backup_schedules.MAX_KEEP)
    keep_daily: int = Field(default=7, ge=0, le=backup_schedules.MAX_KEEP)
    keep_weekly: int = Field(default=4, ge=0, le=backup_schedules.MAX_KEEP)
    incremental_every: int = Field(
        default=0,
        ge=0,
        le=backup_schedules.MAX_KEEP,
        description="incremental backups after each full one (0: every backup full)",
    )


class ScheduleView(BaseModel):
    vm: str
    every: float
    keep_last: int
    keep_daily: int
    keep_weekly: int
    incremental_every: int
    next_at: datetime
    last_at: datetime | None
    last_error: str | None

    @classmethod
    def of(cls, row: BackupSchedule) -> ScheduleView:
        return cls(
            vm=row.vm_name,
            every=row.every,
            keep_last=row.keep_last,
            keep_daily=row.keep_daily,
            keep_weekly=row.keep_weekly,
            incremental_every=row.incremental_every,
            next_at=row.next_at,
            last_at=row.last_at,
            last_error=row.last_error,
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


@router.post("/vms/{vm_name}/backups/{name}/verify", **ACCEPTED)
def verify_backup(
    vm_name: str, name: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    """Read the backup's chain back against its recorded checksums; the outcome is stored on the backup."""
    with state.store.session() as session:
        return Accepted(job=JobView.of(backup_schedules.verify(session, vm_name, name, caller.project)))


@router.get("/backup-schedules", response_model=list[ScheduleView])
def list_schedules(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[ScheduleView]:
    return [ScheduleView.of(row) for row in backup_schedules.list_schedules(session, caller.project)]


@router.put("/vms/{vm_name}/backup-schedule", response_model=ScheduleView)
def set_schedule(
    vm_name: str, request: ScheduleSet, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> ScheduleView:
    """Make or replace the VM's schedule; its first backup is due one interval from now."""
    with state.store.session() as session:
        row = backup_schedules.set_schedule(
            session,
            vm_name,
            request.every,
            request.keep_last,
            request.keep_daily,
            request.keep_weekly,
            request.incremental_every,
            caller.project,
            state.settings.backup_min_interval,
        )
        return ScheduleView.of(row)


@router.delete("/vms/{vm_name}/backup-schedule", status_code=status.HTTP_204_NO_CONTENT)
def remove_schedule(vm_name: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)) -> None:
    """The schedule goes; the backups it made stay."""
    with state.store.session() as session:
        backup_schedules.remove_schedule(session, vm_name, caller.project)


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
        job = backups.export(
            session, vm_name, request.file, request.compress, caller.project, origin_of(http), request.format
        )
        return Accepted(job=JobView.of(job))


@router.post("/vms/import", **ACCEPTED)
def import_vm(
    request: VMImport, http: Request, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = backups.import_(
            session, request.file, request.name, caller.project, origin_of(http), request.upload, request.network
        )
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
