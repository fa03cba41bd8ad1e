"""Snapshot routes: a VM's snapshot tree, and create / revert / delete as jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from corral.api.auth import Caller, operator, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView
from corral.cluster import snapshots, vms

router = APIRouter(prefix="/vms/{vm_name}/snapshots", tags=["snapshots"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    memory: bool | None = Field(default=None, description="None: with memory if the VM runs, else disk-only")
    description: str = ""


class SnapshotRevert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait: bool = False


class SnapshotView(BaseModel):
    name: str
    parent: str | None
    children: list[str]
    current: bool
    memory: bool
    state: str
    description: str
    vm_state_size: int
    created_at: datetime


@router.get("", response_model=list[SnapshotView])
def list_snapshots(
    vm_name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)
) -> list[SnapshotView]:
    vm = vms.get_vm(session, vm_name, caller.project)
    rows = snapshots.list_snapshots(session, vm)
    names = {row.id: row.name for row in rows}
    return [
        SnapshotView(
            name=row.name,
            parent=names.get(row.parent_id) if row.parent_id else None,
            children=[child.name for child in rows if child.parent_id == row.id],
            current=row.id == vm.current_snapshot,
            memory=row.memory,
            state=row.state,
            description=row.description,
            vm_state_size=row.vm_state_size,
            created_at=row.created_at,
        )
        for row in rows
    ]


@router.post("", **ACCEPTED)
def create_snapshot(
    vm_name: str, request: SnapshotCreate, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = snapshots.create(session, vm_name, request.name, request.memory, request.description, caller.project)
        return Accepted(job=JobView.of(job))


@router.post("/{name}/revert", **ACCEPTED)
def revert_snapshot(
    vm_name: str,
    name: str,
    request: SnapshotRevert | None = None,
    caller: Caller = Depends(operator),
    state: AppState = Depends(app_state),
) -> Accepted:
    with state.store.session() as session:
        job = snapshots.revert(session, vm_name, name, wait=(request or SnapshotRevert()).wait, project=caller.project)
        return Accepted(job=JobView.of(job))


@router.delete("/{name}", **ACCEPTED)
def delete_snapshot(
    vm_name: str, name: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(snapshots.delete(session, vm_name, name, caller.project)))
