"""Clone, fork and template routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel
from sqlalchemy.orm import Session

from corral.api.auth import Caller, admin, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView, VMView
from corral.cluster import clones, forks, vms
from corral.cluster.requests import TemplateCreate, VMClone, VMFork

router = APIRouter(tags=["clones"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


class TemplateView(BaseModel):
    name: str
    state: str
    source_vm: str
    image: str
    cpus: int
    memory: int
    disks: list[dict[str, Any]]
    used_by: list[str]
    created_at: datetime


@router.post("/vms/{name}/clone", **ACCEPTED)
def clone_vm(
    name: str, request: VMClone, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = clones.clone(
            session,
            name,
            request.name,
            request.linked,
            request.from_snapshot,
            request.start,
            request.wait,
            caller.project,
        )
        session.flush()
        return Accepted(job=JobView.of(job), vm=VMView.of(vms.get_vm(session, request.name, caller.project)))


@router.post("/vms/{name}/fork", **ACCEPTED)
def fork_vm(
    name: str, request: VMFork, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = forks.fork(
            session,
            name,
            request.name,
            request.count,
            caller.project,
            request.wait,
            networks=request.networks,
            keep_macs=request.keep_macs,
        )
        return Accepted(job=JobView.of(job))


@router.get("/templates", response_model=list[TemplateView])
def list_templates(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[TemplateView]:
    return [
        TemplateView(
            name=t.name,
            state=t.state,
            source_vm=t.source_vm,
            image=t.spec["image"],
            cpus=t.spec["cpus"],
            memory=t.spec["memory"],
            disks=t.disks,
            used_by=clones.template_users(session, t),
            created_at=t.created_at,
        )
        for t in clones.list_templates(session, caller.project)
    ]


@router.post("/templates", **ACCEPTED)
def create_template(
    request: TemplateCreate, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(clones.create_template(session, request.name, request.source, caller.project)))


@router.delete("/templates/{name}", **ACCEPTED)
def delete_template(name: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(clones.delete_template(session, name, caller.project)))
