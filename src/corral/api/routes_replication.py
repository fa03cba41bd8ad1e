"""Replication routes: a VM's replica on a partner host (make, list, show, remove) and failover onto it.

Making, removing and failing over name hosts of the pool, like `vm migrate`: they need the admin role of the
project. Nothing here names a path: the replica's files are named by the store's ids on the partner.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from corral.api.auth import Caller, admin, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView
from corral.cluster import replication

router = APIRouter(tags=["replication"])


class ReplicateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(description="the partner host that keeps the replica")
    every: str | None = Field(default=None, description="interval between copies: 60s, 5m, 1h (default 60s)")


class FailoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(default=None, description="the replica's host (the only one that can take it)")


class ReplicaAnswer(BaseModel):
    replica: dict[str, Any]
    job: JobView | None = None


@router.get("/replicas", response_model=list[dict[str, Any]])
def list_replicas(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[dict[str, Any]]:
    return [replication.describe(row) for row in replication.list_replicas(session, caller.project)]


@router.get("/vms/{vm_name}/replica", response_model=dict[str, Any])
def show_replica(
    vm_name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)
) -> dict[str, Any]:
    return replication.describe(replication.get_replica(session, vm_name, caller.project))


@router.put("/vms/{vm_name}/replica", response_model=ReplicaAnswer, status_code=status.HTTP_202_ACCEPTED)
def replicate(
    vm_name: str, request: ReplicateRequest, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> ReplicaAnswer:
    """Make (or re-time) the replica and copy now when the VM runs; the job is that copy."""
    with state.store.session() as session:
        row, job = replication.replicate(session, vm_name, request.to, request.every, caller.project)
        return ReplicaAnswer(replica=replication.describe(row), job=JobView.of(job) if job is not None else None)


@router.delete("/vms/{vm_name}/replica", response_model=ReplicaAnswer, status_code=status.HTTP_202_ACCEPTED)
def remove_replica(
    vm_name: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> ReplicaAnswer:
    """The replica's row goes now; the job removes its files on the partner."""
    with state.store.session() as session:
        row = replication.get_replica(session, vm_name, caller.project)
        described = replication.describe(row)
        job = replication.remove(session, vm_name, caller.project)
        return ReplicaAnswer(replica=described, job=JobView.of(job) if job is not None else None)


@router.post("/vms/{vm_name}/failover", response_model=Accepted, status_code=status.HTTP_202_ACCEPTED)
def failover(
    vm_name: str,
    request: FailoverRequest | None = None,
    caller: Caller = Depends(admin),
    state: AppState = Depends(app_state),
) -> Accepted:
    """Start the VM from its newest replica; refused while it may still run on its own host."""
    with state.store.session() as session:
        to = (request or FailoverRequest()).to
        return Accepted(job=JobView.of(replication.failover(session, vm_name, to, caller.project)))
