"""Moving VMs between hosts: `POST /vms/{name}/migrate` (project admins) and `POST /hosts/{name}/evacuate`
(cluster admins: drain the host and move everything off it). Both answer 202 with the job to follow."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, status

from corral.api.auth import Caller, admin, cluster_admin
from corral.api.state import AppState, app_state
from corral.api.views import Accepted, JobView, VMView
from corral.cluster import moves

router = APIRouter(tags=["migration"])


@router.post("/vms/{name}/migrate", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted)
def migrate_vm(
    name: str,
    request: moves.MigrateRequest | None = None,
    caller: Caller = Depends(admin),
    state: AppState = Depends(app_state),
) -> Accepted:
    """Live (or, stopped on shared storage, offline) move of a VM to another host; ``to`` None lets the scheduler
    choose. The job is the source host's half; its result holds total_s, downtime_ms and paused_ms."""
    with state.store.session() as session:
        job, vm = moves.migrate(session, name, request or moves.MigrateRequest(), caller.project)
        session.flush()
        return Accepted(job=JobView.of(job) if job else None, vm=VMView.of(vm))


@router.post("/hosts/{name}/evacuate", status_code=status.HTTP_202_ACCEPTED, dependencies=[Depends(cluster_admin)])
def evacuate_host(name: str, state: AppState = Depends(app_state)) -> dict[str, Any]:
    """Drain the host and move every VM off it (``host drain``): ``job`` follows the moves (None when nothing
    had to move live); ``plan`` says where each VM goes and which cannot move."""
    with state.store.session() as session:
        job, plan = moves.drain(session, name)
        session.flush()
        return {"job": JobView.of(job).model_dump(mode="json") if job else None, "plan": plan}
