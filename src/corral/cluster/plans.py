"""Stored action plans (balancing, consolidation), their approval and their run; standby and wake of hosts.

A plan is what the planners (corral.cluster.planner) recommend, written down with a fingerprint of the pool it
was made from. Its life: ``recommended`` -> ``approved`` -> ``running`` -> ``succeeded`` or ``failed``; or
``cancelled``; or ``superseded`` (a newer plan of the same kind, or a pool that changed before it was approved).

Running a plan is a series of ordinary live migrations (corral.cluster.moves), **one at a time**: before
each move the plan looks again (the VM is still where the plan found it, running, not busy; the target still
takes it, by placement's filters), and a move that no longer holds is skipped with its reason rather than
forced. :func:`advance` makes one step; a thread of the control plane calls it until the plan ends (and every
read of the plan calls it too, so a restarted control plane picks a running plan up again). A consolidation
ends by putting the hosts it emptied in **standby**: they take no placements (placement wakes one when nothing
else fits) and the configured power command may switch them off.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.cluster import packing_bound, placement, planner, usage
from corral.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.spec.job import JobState
from corral.spec.vm import USER_NETWORK, PowerState, VMSpec
from corral.store import events
from corral.store.db import Store
from corral.store.models import VM, Host, Job, Plan, Volume, utcnow

log = logging.getLogger("corral.plans")
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
OPEN_STATES = ("recommended", "approved", "running")
WINDOW = timedelta(minutes=10)

# Power commands (config: standby_command, wake_command): run with the host's name and address as arguments.
_commands: dict[str, str | None] = {"standby": None, "wake": None}


def configure(standby_command: str | None = None, wake_command: str | None = None) -> None:
    """Set this control plane's power commands; placement's wake of a standby host runs ``wake_command`` too."""
    _commands["standby"], _commands["wake"] = standby_command, wake_command
    placement.wake_hook = lambda name, address: _power("wake", name, address)


def _power(action: str, name: str, address: str | None) -> None:
    command = _commands.get(action)
    if not command:
        return
    try:
        subprocess.run([*shlex.split(command), name, address or ""], timeout=120, check=True, capture_output=True)
        log.info("%s command ran for host %s", action, name)
    except (OSError, subprocess.SubprocessError) as exc:  # the host's flag is what placement reads
        log.warning("the %s command for host %s failed: %s", action, name, exc)


# -- standby --------------------------------------------------------------------------------------------------


def set_standby(session: Session, name: str) -> Host:
    """Put an empty host in standby: no placements, then the power command. Refused while it holds VMs."""
    from corral.cluster.hosts import get_host

    host = get_host(session, name)
    count = session.scalar(select(func.count()).select_from(VM).where(VM.host == name)) or 0
    if count:
        raise Conflict(
            f"host {name} still has {count} VM(s): only an empty host goes to standby",
            f"move them first: `corral host drain {name}`, or `corral pool consolidate`",
        )
    if not host.standby:
        host.standby = True
        session.add(events.make(session, host, "host", "host.standby", {"command": bool(_commands["standby"])}))
        _power("standby", host.name, host.address)
    return host


def wake(session: Session, name: str) -> Host:
    from corral.cluster.hosts import get_host

    host = get_host(session, name)
    if host.standby:
        host.standby = False
        session.add(
            events.make(session, host, "host", "host.wake", {"reason": "asked", "command": bool(_commands["wake"])})
        )
        _power("wake", host.name, host.address)
    return host


# -- the pool as the planners see it --------------------------------------------------------------------------


def load(session: Session, window: timedelta = WINDOW) -> tuple[dict[str, placement.HostLoad], list[planner.Guest]]:
    """Hosts (placement's view) and every placed VM with its needs and its history's averages."""
    view = placement.load_pool(session)
    averages = usage.averages(session, "vm", window)
    active = (Job.target_kind == "vm", Job.state.in_(ACTIVE_JOB_STATES), Job.target_id.is_not(None))
    busy = set(session.scalars(select(Job.target_id).where(*active)))
    storage = dict(
        session.execute(
            select(Volume.vm_id, func.sum(Volume.size)).where(Volume.vm_id.is_not(None)).group_by(Volume.vm_id)
        ).all()
    )
    guests: list[planner.Guest] = []
    rows = session.execute(
        select(
            VM.id,
            VM.name,
            VM.project,
            VM.host,
            VM.spec,
            VM.desired_state,
            VM.observed_state,
            VM.placement_group,
            VM.placement_policy,
        )
        .where(VM.host.is_not(None))
        .order_by(VM.project, VM.name)
    )
    for vm_id, name, project, host, spec, desired, observed, group, policy in rows:
        running = desired in placement.RUNNING_STATES and observed in placement.RUNNING_STATES
        extra: dict[str, Any] = {}
        if any((nic or {}).get("network", USER_NETWORK) != USER_NETWORK for nic in spec.get("nics") or []):
            extra = placement.needs(session, VMSpec.model_validate(spec), project)
            extra.pop("volumes", None)
        anti = policy == placement.Policy.ANTI_AFFINITY and group
        request = placement.PlacementRequest(
            cpus=int(spec["cpus"]),
            memory=int(spec["memory"]),
            storage=int(storage.get(vm_id) or 0),
            will_run=running,
            group=group if anti else None,
            policy=placement.Policy.ANTI_AFFINITY if anti else None,
            project=project,
            **extra,
        )
        why = (
            "not running"
            if not running
            else "a job is running on it"
            if vm_id in busy
            else f"affinity group {group}"
            if group and not anti
            else ""
        )
        average = averages.get(vm_id)
        guests.append(
            planner.Guest(
                id=vm_id,
                name=name,
                project=project,
                host=host,
                request=request,
                movable=not why,
                why_pinned=why,
                cpu_used=average.cpu if average else None,
                memory_used=average.memory if average else None,
            )
        )
    return view, guests


def signature(session: Session) -> str:
    """A fingerprint of what the plans depend on: where each VM is and whether it runs, and which hosts take
    work. Usage is left out on purpose: it changes every ten seconds."""
    digest = hashlib.sha256()
    for row in session.execute(select(VM.id, VM.host, VM.desired_state).order_by(VM.id)):
        digest.update(repr(tuple(row)).encode())
    for host_row in session.execute(select(Host.name, Host.state, Host.drained, Host.standby).order_by(Host.name)):
        digest.update(repr(tuple(host_row)).encode())
    return digest.hexdigest()


# -- plans ----------------------------------------------------------------------------------------------------


class PlanView(BaseModel):
    id: str
    kind: str
    state: str
    summary: dict[str, Any]
    moves: list[dict[str, Any]]
    message: str = ""
    created_at: Any = None
    updated_at: Any = None

    @classmethod
    def of(cls, plan: Plan) -> PlanView:
        return cls(
            id=plan.id,
            kind=plan.kind,
            state=plan.state,
            summary=plan.summary or {},
            moves=list(plan.moves or []),
            message=plan.message,
            created_at=plan.created_at,
            updated_at=plan.updated_at,
        )


class BalanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: int = Field(default=planner.DEFAULT_THRESHOLD)
    max_moves: int = Field(default=10, ge=1, le=1000)
    apply: bool = False


class ConsolidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apply: bool = False
    keep_spare: bool = True
    solver_time_limit: float = Field(default=5.0, ge=0.0, le=60.0)


def _supersede(session: Session, kind: str) -> None:
    for plan in session.scalars(select(Plan).where(Plan.kind == kind, Plan.state.in_(("recommended", "approved")))):
        plan.state = "superseded"
        plan.message = "a newer plan replaced it"


def _store(session: Session, kind: str, summary: dict[str, Any], moves: list[planner.Move]) -> Plan:
    _supersede(session, kind)
    plan = Plan(
        kind=kind,
        state="recommended",
        signature=signature(session),
        summary=summary,
        moves=[{**move.as_dict(), "state": "pending", "job": None} for move in moves],
        message="" if moves else "nothing to do",
    )
    if not moves and not summary.get("freed"):
        plan.state = "succeeded"
    session.add(plan)
    session.flush()
    return plan


def recommend_balance(session: Session, request: BalanceRequest) -> Plan:
    if request.threshold not in planner.THRESHOLDS:
        raise InvalidInput(
            f"threshold {request.threshold} is out of range", "give 1 (only large gains) to 5 (small gains too)"
        )
    view, guests = load(session)
    result = planner.balance(view, guests, request.threshold, request.max_moves)
    return _store(session, "balance", result.summary(), result.moves)


def recommend_consolidation(session: Session, request: ConsolidateRequest) -> Plan:
    view, guests = load(session)
    result = planner.consolidate(view, guests, request.keep_spare)
    if request.solver_time_limit:
        packing_bound.exact(view, guests, result, request.keep_spare, request.solver_time_limit)
    return _store(session, "consolidate", result.summary(), result.moves)


# -- automatic balancing and consolidation (config: auto_balance, auto_consolidate) --------------------------------

_auto_last: dict[str, float] = {}
# What the last automatic round of each kind did on this control plane (``corral pool status``): when, and its
# outcome in words, with the plan it started if any.
_auto_rounds: dict[str, dict[str, Any]] = {}


def _note_round(kind: str, outcome: str, plan: Plan | None = None) -> None:
    _auto_rounds[kind] = {"at": utcnow(), "outcome": outcome, "plan": plan.id if plan is not None else None}


def last_rounds() -> dict[str, dict[str, Any]]:
    """The last automatic round of each kind made by this control plane (its memory: a restart forgets them)."""
    return {kind: dict(round_) for kind, round_ in _auto_rounds.items()}


def auto_balance(session: Session, threshold: int) -> Plan | None:
    """The automatic mode: when no plan is running, a balance plan of at most one move whose gain passes
    ``threshold``, approved at once (the HostWatch then runs it as any approved plan). None when nothing is worth
    moving; such rounds store nothing. One move per plan and none while a plan runs: one migration at a time."""
    if session.scalar(select(Plan.id).where(Plan.state.in_(("approved", "running"))).limit(1)) is not None:
        _note_round("balance", "skipped: a plan is approved or running")
        return None
    view, guests = load(session)
    result = planner.balance(view, guests, threshold, 1)
    if not result.moves:
        _note_round("balance", "nothing worth moving")
        return None
    plan = _store(session, "balance", {**result.summary(), "automatic": True}, result.moves)
    plan.state = "running"
    plan.message = f"approved automatically (auto_balance, threshold {threshold})"
    log.info("automatic balancing: moving VM %s to %s", result.moves[0].vm, result.moves[0].target)
    _note_round("balance", f"moving VM {result.moves[0].vm} to {result.moves[0].target}", plan)
    return plan


def auto_balance_tick(store: Store, threshold: int, interval: float) -> str | None:
    """Called on each pass of the control plane's HostWatch: an :func:`auto_balance` round every ``interval``
    seconds. Returns the id of the plan it started, if any."""
    now = time.monotonic()
    if now - _auto_last.get("balance", float("-inf")) < interval:
        return None
    _auto_last["balance"] = now
    with store.session() as session:
        plan = auto_balance(session, threshold)
        return plan.id if plan is not None else None


def _blocking_plan(session: Session) -> Plan | None:
    """A plan automatic consolidation must not run beside: one approved or running (migrations go one at a
    time), or one a person asked for and has not yet approved or cancelled (a new consolidation plan would
    supersede it under their feet; an automatic recommendation left over does not count)."""
    open_plans = session.scalars(select(Plan).where(Plan.state.in_(OPEN_STATES)).order_by(Plan.created_at))
    for plan in open_plans:
        if plan.state != "recommended" or not (plan.summary or {}).get("automatic"):
            return plan
    return None


def auto_consolidate(session: Session) -> Plan | None:
    """The automatic mode of consolidation (DPM's): a consolidation plan, kept N+1, approved at once when it frees
    at least one host; the HostWatch runs it as any approved plan, and its end puts the emptied hosts in standby.
    None, and nothing stored, when it would free no host or when another plan is open (see :func:`_blocking_plan`).
    The solver's check is left out: it may take seconds, and the heuristic alone decides what moves."""
    blocking = _blocking_plan(session)
    if blocking is not None:
        _note_round("consolidate", f"skipped: plan {blocking.id} is {blocking.state}")
        return None
    view, guests = load(session)
    result = planner.consolidate(view, guests, keep_spare=True)
    if not result.freed:
        _note_round("consolidate", "no host to free (N+1 kept)")
        return None
    plan = _store(session, "consolidate", {**result.summary(), "automatic": True}, result.moves)
    plan.state = "running"
    plan.message = "approved automatically (auto_consolidate)"
    log.info("automatic consolidation: freeing %s with %d move(s)", ", ".join(result.freed), len(result.moves))
    _note_round("consolidate", f"freeing {', '.join(result.freed)} with {len(result.moves)} move(s)", plan)
    return plan


def auto_consolidate_tick(store: Store, interval: float) -> str | None:
    """Called on each pass of the HostWatch: an :func:`auto_consolidate` round every ``interval`` seconds. A round
    kept off by an open plan is tried again at the next pass rather than an interval later, so a long automatic
    balancing does not push consolidation back by a whole interval. Returns the id of the plan it started."""
    now = time.monotonic()
    if now - _auto_last.get("consolidate", float("-inf")) < interval:
        return None
    with store.session() as session:
        blocking = _blocking_plan(session)
        if blocking is not None:
            _note_round("consolidate", f"waiting: plan {blocking.id} is {blocking.state}")
            return None
        _auto_last["consolidate"] = now
        plan = auto_consolidate(session)
        return plan.id if plan is not None else None


class AutoMode(BaseModel):
    """One automatic mode as ``corral pool status`` shows it: its settings on this control plane, its last round
    here (None: none since this control plane started) and the newest plan it started (from the store)."""

    enabled: bool
    interval: float
    threshold: int | None = None
    last_round: dict[str, Any] | None = None
    last_plan: dict[str, Any] | None = None


class Ballooning(BaseModel):
    enabled: bool
    target: float
    step: float
    interval: float
    vms_ballooned: int = Field(description="running VMs whose balloon holds them under their memory now")
    bytes_reclaimed: int = Field(description="what those balloons hold back, in all")


class PoolStatus(BaseModel):
    auto_balance: AutoMode
    auto_consolidate: AutoMode
    autoballoon: Ballooning
    standby: list[str]
    open_plans: list[dict[str, Any]]


def _last_automatic(session: Session, kind: str) -> dict[str, Any] | None:
    recent = session.scalars(select(Plan).where(Plan.kind == kind).order_by(Plan.created_at.desc()).limit(50))
    for plan in recent:
        if (plan.summary or {}).get("automatic"):
            return {"id": plan.id, "state": plan.state, "created_at": plan.created_at, "message": plan.message}
    return None


def status(session: Session, settings: Any) -> PoolStatus:
    """The automatic modes (settings of this control plane, last rounds, last plans), hosts in standby and open
    plans. Ballooning runs in each agent with its own settings; those shown are this control plane's."""
    ballooned, reclaimed = 0, 0
    for spec, stats in session.execute(
        select(VM.spec, VM.stats).where(VM.observed_state == PowerState.RUNNING, VM.host.is_not(None))
    ):
        actual = (stats or {}).get("balloon_bytes")
        if actual is not None and int(actual) < int(spec["memory"]):
            ballooned += 1
            reclaimed += int(spec["memory"]) - int(actual)
    rounds = last_rounds()
    return PoolStatus(
        auto_balance=AutoMode(
            enabled=settings.auto_balance,
            interval=settings.auto_balance_interval,
            threshold=settings.auto_balance_threshold,
            last_round=rounds.get("balance"),
            last_plan=_last_automatic(session, "balance"),
        ),
        auto_consolidate=AutoMode(
            enabled=settings.auto_consolidate,
            interval=settings.auto_consolidate_interval,
            last_round=rounds.get("consolidate"),
            last_plan=_last_automatic(session, "consolidate"),
        ),
        autoballoon=Ballooning(
            enabled=settings.autoballoon,
            target=settings.balloon_target,
            step=settings.balloon_step,
            interval=settings.balloon_interval,
            vms_ballooned=ballooned,
            bytes_reclaimed=reclaimed,
        ),
        standby=list(session.scalars(select(Host.name).where(Host.standby.is_(True)).order_by(Host.name))),
        open_plans=[
            {
                "id": plan.id,
                "kind": plan.kind,
                "state": plan.state,
                "automatic": bool((plan.summary or {}).get("automatic")),
            }
            for plan in session.scalars(select(Plan).where(Plan.state.in_(OPEN_STATES)).order_by(Plan.created_at))
        ],
    )


def get_plan(session: Session, plan_id: str) -> Plan:
    plan = session.get(Plan, plan_id)
    if plan is None:
        raise NotFound(f"plan {plan_id!r} not found", "list plans with `corral pool plan list`")
    return plan


def list_plans(session: Session, limit: int = 50) -> list[Plan]:
    return list(session.scalars(select(Plan).order_by(Plan.created_at.desc()).limit(limit)))


def approve(session: Session, plan_id: str) -> Plan:
    """Approve a recommended plan; refused (and the plan superseded) when the pool changed since it was made."""
    plan = get_plan(session, plan_id)
    if plan.state != "recommended":
        raise Conflict(
            f"plan {plan.id} is {plan.state}, not recommended",
            f"make a new one with `corral pool {'balance' if plan.kind == 'balance' else 'consolidate'}`",
        )
    if plan.signature != signature(session):
        plan.state = "superseded"
        plan.message = "the pool changed after the plan was made"
        session.flush()
        raise Conflict(
            f"plan {plan.id} is stale: VMs or hosts changed since it was made",
            f"make a new one with `corral pool {plan.kind}`",
        )
    plan.state = "running"
    plan.message = "approved"
    return plan


def cancel(session: Session, plan_id: str) -> Plan:
    """Stop a plan: no further move starts (one already migrating finishes)."""
    plan = get_plan(session, plan_id)
    if plan.state not in OPEN_STATES:
        raise Conflict(f"plan {plan.id} is already {plan.state}", "nothing to cancel")
    plan.state = "cancelled"
    plan.message = "cancelled"
    return plan


def _set_move(plan: Plan, index: int, **changes: Any) -> None:
    moves = [dict(move) for move in plan.moves]
    moves[index].update(changes)
    plan.moves = moves


def _check_move(session: Session, move: dict[str, Any]) -> tuple[VM, Host, bool]:
    from corral.cluster import moves

    vm = session.get(VM, move["vm_id"])
    if vm is None:
        raise Conflict(f"VM {move['vm']} no longer exists")
    if vm.host != move["from"]:
        raise Conflict(f"VM {vm.name} is now on {vm.host}, not {move['from']}")
    if not (vm.desired_state in placement.RUNNING_STATES and vm.observed_state == PowerState.RUNNING):
        raise Conflict(f"VM {vm.name} is {vm.observed_state}, not running")
    busy = session.scalar(
        select(func.count()).select_from(Job).where(Job.target_id == vm.id, Job.state.in_(ACTIVE_JOB_STATES))
    )
    if busy:
        raise Conflict(f"VM {vm.name} has a job running")
    target, copy = moves.choose_target(session, vm, move["to"], None)
    return vm, target, copy


def advance(session: Session, plan: Plan) -> bool:
    """One step of a running plan; True when it may go on (a move runs or was just started)."""
    from corral.cluster import moves

    if plan.state != "running":
        return False
    if session.get_bind().dialect.name == "postgresql":
        # The control plane's thread and a reader of the plan may step at once: the row lock makes them take
        # turns (SQLite's write lock, taken at BEGIN, does it already), so no move starts twice.
        session.refresh(plan, with_for_update=True)
        if plan.state != "running":
            return False
    for index, move in enumerate(plan.moves):
        if move["state"] == "running":
            job = session.get(Job, move["job"]) if move.get("job") else None
            if job is None or job.state in ACTIVE_JOB_STATES:
                return job is not None
            if job.state == JobState.SUCCEEDED:
                _set_move(plan, index, state="done")
                continue
            _set_move(plan, index, state="failed", reason=f"{move['reason']}; failed: {job.error or job.state}")
            plan.state = "failed"
            plan.message = f"moving VM {move['vm']} failed: {job.error or job.state}"
            return False
        if move["state"] != "pending":
            continue
        with placement.placement_lock:
            try:
                vm, target, copy = _check_move(session, move)
            except CorralError as exc:
                _set_move(plan, index, state="skipped", reason=f"skipped: {exc.message}")
                continue
            job = moves.submit_pair(session, vm, target, copy)
            session.flush()
        _set_move(plan, index, state="running", job=job.id)
        plan.message = f"moving VM {move['vm']} to {move['to']}"
        return True
    _finish(session, plan)
    return False


def _finish(session: Session, plan: Plan) -> None:
    skipped = [move for move in plan.moves if move["state"] == "skipped"]
    if plan.kind == "consolidate":
        parked, kept = [], []
        for name in plan.summary.get("freed", []):
            try:
                set_standby(session, name)
                parked.append(name)
            except CorralError as exc:
                kept.append(f"{name} ({exc.message})")
        plan.summary = {**plan.summary, "standby": parked}
        plan.message = f"hosts in standby: {', '.join(parked) or 'none'}" + (
            f"; not: {'; '.join(kept)}" if kept else ""
        )
    else:
        plan.message = f"{len(plan.moves) - len(skipped)} move(s) done"
    if skipped:
        plan.message += f"; {len(skipped)} move(s) skipped"
    plan.state = "succeeded"


def drive(
    store: Store, plan_id: str, interval: float = 1.0, timeout: float = 6 * 3600, stop: Callable[[], bool] | None = None
) -> None:
    """Advance a plan until it ends (a control-plane thread; see the module's docstring)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop and stop()):
        try:
            with store.session() as session:
                plan = session.get(Plan, plan_id)
                if plan is None or plan.state != "running":
                    return
                advance(session, plan)
        except Exception:  # the store may be restarting; the next pass (or a read of the plan) goes on
            log.exception("plan %s: step failed", plan_id)
        time.sleep(interval)


def start_driving(store: Store, plan_id: str) -> threading.Thread:
    thread = threading.Thread(target=drive, args=(store, plan_id), name=f"corral-plan-{plan_id[:8]}", daemon=True)
    thread.start()
    return thread
