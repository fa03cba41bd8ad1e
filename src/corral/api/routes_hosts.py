"""The pool's hosts (show, drain, undrain, remove), its totals, and placement dry runs.

Hosts and the pool's totals are for cluster-wide roles only: a host's memory, addresses, bridges and the names of
every project's VMs on it are facts about the machine and the other tenants, not a tenant's business."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api.auth import Caller, cluster_admin, cluster_viewer, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import HostView
from corral.cluster import hosts, placement
from corral.cluster.requests import VMCreate
from corral.errors import NotFound
from corral.store.models import VM, Host, Image, Template, Volume

router = APIRouter(tags=["host"])


class HostDetail(HostView):
    vm_names: list[str] = []


def host_view(session: Session, host: Host) -> HostView:
    load = placement.load_pool(session, only=[host.name])[host.name]
    return HostView.of(
        host,
        allocated_cpus=load.cpus_alloc,
        allocated_memory=load.memory_alloc,
        allocated_storage=load.storage_alloc,
        vms=load.vms,
    )


@router.get("/hosts/{name}", response_model=HostDetail, dependencies=[Depends(cluster_viewer)])
def show_host(name: str, session: Session = Depends(db_session)) -> HostDetail:
    host = hosts.get_host(session, name)
    names = list(session.scalars(select(VM.name).where(VM.host == name).order_by(VM.name)))
    return HostDetail(**host_view(session, host).model_dump(), vm_names=names)


@router.post("/hosts/{name}/drain", response_model=HostView, dependencies=[Depends(cluster_admin)])
def drain_host(name: str, state: AppState = Depends(app_state)) -> HostView:
    with state.store.session() as session:
        return host_view(session, hosts.set_drained(session, name, True))


@router.post("/hosts/{name}/undrain", response_model=HostView, dependencies=[Depends(cluster_admin)])
def undrain_host(name: str, state: AppState = Depends(app_state)) -> HostView:
    with state.store.session() as session:
        return host_view(session, hosts.set_drained(session, name, False))


@router.delete("/hosts/{name}", dependencies=[Depends(cluster_admin)])
def remove_host(name: str, state: AppState = Depends(app_state)) -> dict[str, str]:
    with state.store.session() as session:
        hosts.remove(session, name)
    return {"removed": name}


@router.get("/pool", response_model=hosts.PoolView, dependencies=[Depends(cluster_viewer)])
def show_pool(session: Session = Depends(db_session)) -> hosts.PoolView:
    return hosts.pool(session)


def _storage_need(session: Session, request: VMCreate, project: str) -> int:
    spec = request.spec
    extra = sum(disk.size for disk in spec.disks if disk.size is not None)
    if request.template is not None:
        template = session.scalars(
            select(Template).where(Template.name == request.template, Template.project == project)
        ).first()
        if template is None:
            raise NotFound(f"template {request.template!r} not found", "list templates with `corral template list`")
        return extra + sum(int(disk.get("size", 0)) for disk in template.disks)
    image = session.scalars(
        select(Image).where(Image.name == spec.image, Image.project.in_([project, "default"]))
    ).first()
    if image is None:
        raise NotFound(
            f"image {spec.image!r} not found", "build the default one with `corral image build tiny`, or import one"
        )
    return extra + image.virtual_size


@router.post("/placement/plan", response_model=placement.PlacementPlan)
def plan_placement(request: VMCreate, caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> Any:
    """What `POST /vms` would choose for this request now, with every host's reason. Changes nothing.

    Project tokens get each host's verdict without the numbers behind it (its memory, what is left, what the
    other projects' VMs take): those are host facts, for cluster-wide roles only (docs/networking.md)."""
    project = caller.project
    names = [*request.volumes, *(disk.volume for disk in request.spec.disks if disk.volume)]
    attached = session.scalars(select(Volume).where(Volume.project == project, Volume.name.in_(names))).all()
    wanted = placement.PlacementRequest.of(
        request.spec,
        storage=_storage_need(session, request, project),
        will_run=request.start,
        host=request.host,
        group=request.group,
        policy=request.policy,
        accel=request.accel,
        project=project,
        **placement.needs(session, request.spec, project, attached),
    )
    plan = placement.plan(session, wanted)
    return plan if caller.principal.cluster else tenant_plan(plan)


def tenant_plan(plan: placement.PlacementPlan) -> placement.PlacementPlan:
    """``plan`` as a tenant may see it: which host would be chosen and which could take the VM, and no more."""
    verdicts = [
        verdict.model_copy(
            update={
                "reason": "chosen" if verdict.chosen else "fits" if verdict.fits else "cannot take this VM now",
                "weight": None,
                "allocation": {},
            }
        )
        for verdict in plan.hosts
    ]
    return plan.model_copy(update={"hosts": verdicts})
