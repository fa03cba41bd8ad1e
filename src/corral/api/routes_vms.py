"""VM routes: each verb validates, writes desired state and a job, and returns the job at once (202)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, status
from sqlalchemy.orm import Session

from corral.api.auth import Caller, admin, operator, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView, VMView
from corral.cluster import vms
from corral.cluster.requests import VMCreate, VMDelete, VMExec, VMRestart, VMStart, VMStop

router = APIRouter(prefix="/vms", tags=["vms"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


def _accepted(session: Session, job, name: str | None = None, project: str = "default") -> Accepted:  # type: ignore[no-untyped-def]
    session.flush()
    vm = vms.get_vm(session, name, project) if name else None
    return Accepted(job=JobView.of(job), vm=VMView.of(vm) if vm else None)


@router.get("", response_model=list[VMView])
def list_vms(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[VMView]:
    return [VMView.of(vm) for vm in vms.list_vms(session, caller.project)]


@router.post("", **ACCEPTED)
def create_vm(request: VMCreate, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        job = vms.create(session, request, caller.project)
        return _accepted(session, job, request.spec.name, caller.project)


@router.get("/{name}", response_model=VMView)
def show_vm(name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> VMView:
    return VMView.of(vms.get_vm(session, name, caller.project))


@router.post("/{name}/start", **ACCEPTED)
def start_vm(
    name: str, request: VMStart | None = None, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return _accepted(session, vms.start(session, name, request or VMStart(), caller.project), name, caller.project)


@router.post("/{name}/stop", **ACCEPTED)
def stop_vm(
    name: str, request: VMStop | None = None, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return _accepted(session, vms.stop(session, name, request or VMStop(), caller.project), name, caller.project)


@router.post("/{name}/restart", **ACCEPTED)
def restart_vm(
    name: str,
    request: VMRestart | None = None,
    caller: Caller = Depends(operator),
    state: AppState = Depends(app_state),
) -> Accepted:
    with state.store.session() as session:
        job = vms.restart(session, name, request or VMRestart(), caller.project)
        return _accepted(session, job, name, caller.project)


@router.post("/{name}/pause", **ACCEPTED)
def pause_vm(name: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return _accepted(session, vms.pause(session, name, caller.project), name, caller.project)


@router.post("/{name}/resume", **ACCEPTED)
def resume_vm(name: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return _accepted(session, vms.resume(session, name, caller.project), name, caller.project)


@router.post("/{name}/exec", **ACCEPTED)
def exec_vm(
    name: str, request: VMExec, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return _accepted(session, vms.exec_(session, name, request, caller.project))


@router.delete("/{name}", **ACCEPTED)
def delete_vm(
    name: str,
    keep_disks: bool = False,
    force: bool = False,
    caller: Caller = Depends(admin),
    state: AppState = Depends(app_state),
) -> Accepted:
    with state.store.session() as session:
        job = vms.delete(session, name, VMDelete(keep_disks=keep_disks, force=force), caller.project)
        return _accepted(session, job)
