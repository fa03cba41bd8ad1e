"""Resizing routes: `vm set` (memory, CPUs, CPU limits) and disk hot-plug, live on a running VM."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, status

from corral.api.auth import Caller, admin
from corral.api.state import AppState, app_state
from corral.api.views import Accepted, JobView, VMView
from corral.cluster import resize
from corral.cluster.resize import DiskAdd, VMResize
from corral.cluster.vm_rows import get_vm

router = APIRouter(prefix="/vms", tags=["vms"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


@router.post("/{name}/resize", **ACCEPTED)
def resize_vm(
    name: str, request: VMResize, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    """Change memory, CPUs or CPU limits; admin, since growth draws on the project's quotas like a create."""
    with state.store.session() as session:
        job = resize.resize(session, name, request, caller.project)
        return Accepted(
            job=JobView.of(job) if job is not None else None, vm=VMView.of(get_vm(session, name, caller.project))
        )


@router.post("/{name}/disks", **ACCEPTED)
def add_disk(
    name: str, request: DiskAdd, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = resize.disk_add(session, name, request, caller.project)
        return Accepted(job=JobView.of(job), vm=VMView.of(get_vm(session, name, caller.project)))


@router.delete("/{name}/disks/{volume}", **ACCEPTED)
def remove_disk(
    name: str, volume: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = resize.disk_remove(session, name, volume, caller.project)
        return Accepted(job=JobView.of(job), vm=VMView.of(get_vm(session, name, caller.project)))
