"""Usage history (`vm stats`, `host stats`), balancing and consolidation plans, standby and wake of hosts.

A VM's history is its project's to read; a host's, the plans and the power states are cluster business (they name
every project's VMs and the hosts' sizes). Making a plan stores it, so it takes a cluster admin, like running it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from corral.api.auth import Caller, cluster_admin, cluster_viewer, viewer
from corral.api.state import AppState, app_state, db_session
from corral.cluster import hosts, plans, usage
from corral.cluster.vm_rows import get_vm

router = APIRouter(tags=["pool"])
SINCE = Query(None, description="How far back: 30m, 1h, 1d (default 1h; at most 31d).")


@router.get("/vms/{name}/stats", response_model=usage.History)
def vm_stats(
    name: str, since: str | None = SINCE, caller: Caller = Depends(viewer), session: Session = Depends(db_session)
) -> usage.History:
    """CPU, memory, balloon, disk and network I/O over the window, with averages and peaks."""
    span = usage.parse_since(since)
    vm = get_vm(session, name, caller.project)
    return usage.history(session, "vm", vm.id, vm.name, span)


@router.get("/hosts/{name}/stats", response_model=usage.History, dependencies=[Depends(cluster_viewer)])
def host_stats(name: str, since: str | None = SINCE, session: Session = Depends(db_session)) -> usage.History:
    span = usage.parse_since(since)
    host = hosts.get_host(session, name)
    return usage.history(session, "host", host.name, host.name, span)


def _maybe_run(state: AppState, plan: plans.PlanView) -> plans.PlanView:
    if plan.state == "running":
        plans.start_driving(state.store, plan.id)
    return plan


@router.post("/pool/balance", response_model=plans.PlanView, dependencies=[Depends(cluster_admin)])
def balance(request: plans.BalanceRequest | None = None, state: AppState = Depends(app_state)) -> plans.PlanView:
    """Recommend moves that even the hosts' load out (a stored plan); ``apply`` approves and runs it at once."""
    request = request or plans.BalanceRequest()
    with state.store.session() as session:
        plan = plans.recommend_balance(session, request)
        if request.apply and plan.state == "recommended":
            plans.approve(session, plan.id)
        view = plans.PlanView.of(plan)
    return _maybe_run(state, view)


@router.post("/pool/consolidate", response_model=plans.PlanView, dependencies=[Depends(cluster_admin)])
def consolidate(
    request: plans.ConsolidateRequest | None = None, state: AppState = Depends(app_state)
) -> plans.PlanView:
    """Recommend moves that empty the most hosts (kept N+1), checked against HiGHS; ``apply`` runs them and puts
    the emptied hosts in standby."""
    request = request or plans.ConsolidateRequest()
    with state.store.session() as session:
        plan = plans.recommend_consolidation(session, request)
        if request.apply and plan.state == "recommended":
            plans.approve(session, plan.id)
        view = plans.PlanView.of(plan)
    return _maybe_run(state, view)


@router.get("/pool/status", response_model=plans.PoolStatus, dependencies=[Depends(cluster_viewer)])
def pool_status(state: AppState = Depends(app_state), session: Session = Depends(db_session)) -> plans.PoolStatus:
    """The automatic modes (balancing, consolidation, ballooning): on or off, their settings and last rounds."""
    return plans.status(session, state.settings)


@router.get("/pool/plans", response_model=list[plans.PlanView], dependencies=[Depends(cluster_viewer)])
def list_plans(limit: int = Query(50, ge=1, le=500), session: Session = Depends(db_session)) -> list[plans.PlanView]:
    return [plans.PlanView.of(plan) for plan in plans.list_plans(session, limit)]


@router.get("/pool/plans/{plan_id}", response_model=plans.PlanView, dependencies=[Depends(cluster_viewer)])
def show_plan(plan_id: str, state: AppState = Depends(app_state)) -> plans.PlanView:
    """The plan and each move's state; reading a running plan also moves it on (a restarted control plane)."""
    with state.store.session() as session:
        plan = plans.get_plan(session, plan_id)
        plans.advance(session, plan)
        return plans.PlanView.of(plan)


@router.post("/pool/plans/{plan_id}/approve", response_model=plans.PlanView, dependencies=[Depends(cluster_admin)])
def approve_plan(plan_id: str, state: AppState = Depends(app_state)) -> plans.PlanView:
    """Run a recommended plan; refused when the pool changed since it was made (make a new one)."""
    with state.store.session() as session:
        view = plans.PlanView.of(plans.approve(session, plan_id))
    return _maybe_run(state, view)


@router.post("/pool/plans/{plan_id}/cancel", response_model=plans.PlanView, dependencies=[Depends(cluster_admin)])
def cancel_plan(plan_id: str, state: AppState = Depends(app_state)) -> plans.PlanView:
    with state.store.session() as session:
        return plans.PlanView.of(plans.cancel(session, plan_id))


@router.post("/hosts/{name}/standby", dependencies=[Depends(cluster_admin)])
def standby_host(name: str, state: AppState = Depends(app_state)) -> dict[str, object]:
    """An empty host takes no placements, and the power command (if configured) switches it off."""
    with state.store.session() as session:
        host = plans.set_standby(session, name)
        return {"host": host.name, "standby": host.standby}


@router.post("/hosts/{name}/wake", dependencies=[Depends(cluster_admin)])
def wake_host(name: str, state: AppState = Depends(app_state)) -> dict[str, object]:
    with state.store.session() as session:
        host = plans.wake(session, name)
        return {"host": host.name, "standby": host.standby}
