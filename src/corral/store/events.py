"""Events: every state change and job step, as rows with an ever-growing id.

Events are derived from the rows themselves, in a ``before_flush`` hook on every ORM session: whoever changes a
VM's observed state, a volume's state or a job's progress (the agent, the control plane, a cancel) writes the
event in the same transaction as the change, without knowing about events at all. So an event exists exactly when
its change was committed, and no code path can forget one. Bulk UPDATE statements bypass the ORM; the few that
change state (claiming a job) call :func:`record` themselves.

Followers read ``id > last seen``: plain SQL that works alike on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from corral.store.models import VM, Event, Image, Job, Network, Snapshot, Template, Volume

# model -> (resource kind, the column whose changes are state changes)
TRACKED: dict[type, tuple[str, str]] = {
    VM: ("vm", "observed_state"),
    Volume: ("volume", "state"),
    Image: ("image", "state"),
    Snapshot: ("snapshot", "state"),
    Template: ("template", "state"),
    Network: ("network", "state"),
    Job: ("job", "state"),
}

# Every event type corral writes (docs/observability.md explains each one).
EVENT_TYPES = (
    "vm.created",
    "vm.state",
    "vm.desired_state",
    "vm.deleted",
    "volume.created",
    "volume.state",
    "volume.deleted",
    "image.created",
    "image.state",
    "image.deleted",
    "snapshot.created",
    "snapshot.state",
    "snapshot.deleted",
    "template.created",
    "template.state",
    "template.deleted",
    "network.created",
    "network.state",
    "network.deleted",
    "job.created",
    "job.state",
    "job.progress",
    # HA (corral.cluster.ha, corral.host.lease; docs/ha.md)
    "host.takeover",
    "host.fenced",
    "vm.ha_restart",
    "vm.ha_failed",
    "pool.ha_suspended",
    # Backup schedules and verify (corral.cluster.backup_schedules, corral.host.backup_jobs; docs/backups.md)
    "backup.scheduled",
    "backup.pruned",
    "backup.verified",
    # Automatic ballooning (corral.host.autoballoon; docs/optimization.md): before/after bytes and why
    "vm.balloon",
    # Standby and wake of hosts (corral.cluster.plans, corral.cluster.placement; docs/optimization.md)
    "host.standby",
    "host.wake",
    # Failover of a replicated VM onto its replica's host (corral.cluster.replication; docs/ha.md)
    "vm.failover",
)


def _change(obj: object, attribute: str) -> tuple[Any, Any] | None:
    history = inspect(obj).attrs[attribute].history
    if not history.added:
        return None
    old = history.deleted[0] if history.deleted else None
    new = history.added[0]
    return None if old == new else (old, new)


def _project(session: Session, obj: object) -> str | None:
    if isinstance(obj, Snapshot):
        with session.no_autoflush:
            vm = session.get(VM, obj.vm_id)
        return vm.project if vm is not None else None
    return getattr(obj, "project", None)


def _name(obj: object) -> str:
    if isinstance(obj, Job):
        return obj.target_name
    return str(getattr(obj, "name", ""))


def make(session: Session, obj: object, kind: str, type_: str, data: dict[str, Any]) -> Event:
    return Event(
        project=_project(session, obj),
        type=type_,
        resource_kind=kind,
        resource_name=_name(obj)[:63],
        resource_id=getattr(obj, "id", None),
        data=data,
    )


def job_data(job: Job) -> dict[str, Any]:
    return {
        "job": job.id,
        "kind": job.kind,
        "target": f"{job.target_kind}/{job.target_name}",
        "state": job.state,
        "progress": job.progress,
        "message": job.message,
        **({"error": job.error} if job.error else {}),
    }


def record(session: Session, job: Job) -> None:
    """An explicit job.state event, for state changes made by bulk UPDATE statements."""
    session.add(make(session, job, "job", "job.state", job_data(job)))


def _events_for(session: Session) -> list[Event]:
    found: list[Event] = []
    for obj in list(session.new):
        kind_column = TRACKED.get(type(obj))
        if kind_column is None:
            continue
        kind, column = kind_column
        data: dict[str, Any] = job_data(obj) if isinstance(obj, Job) else {"state": getattr(obj, column, None)}
        found.append(make(session, obj, kind, f"{kind}.created", data))
    for obj in list(session.dirty):
        kind_column = TRACKED.get(type(obj))
        if kind_column is None or not session.is_modified(obj, include_collections=False):
            continue
        kind, column = kind_column
        if isinstance(obj, Job):
            if _change(obj, "state"):
                found.append(make(session, obj, kind, "job.state", job_data(obj)))
            elif _change(obj, "message") or _change(obj, "progress"):
                found.append(make(session, obj, kind, "job.progress", job_data(obj)))
            continue
        state = _change(obj, column)
        if state:
            data = {"from": state[0], "to": state[1]}
            if isinstance(obj, VM):
                data.update(desired=obj.desired_state, status=obj.status_message, host=obj.host)
            found.append(make(session, obj, kind, f"{kind}.state", data))
        if isinstance(obj, VM):
            desired = _change(obj, "desired_state")
            if desired:
                found.append(make(session, obj, kind, "vm.desired_state", {"from": desired[0], "to": desired[1]}))
    for obj in list(session.deleted):
        kind_column = TRACKED.get(type(obj))
        if kind_column is None or isinstance(obj, Job):
            continue
        found.append(make(session, obj, kind_column[0], f"{kind_column[0]}.deleted", {}))
    return found


def _before_flush(session: Session, _context: object, _instances: object) -> None:
    for row in _events_for(session):
        session.add(row)


def install() -> None:
    """Hook every ORM session (idempotent)."""
    if not sa_event.contains(Session, "before_flush", _before_flush):
        sa_event.listen(Session, "before_flush", _before_flush)


def since(
    session: Session,
    after: int,
    *,
    projects: list[str] | None = None,
    kind: str | None = None,
    resource: str | None = None,
    types: list[str] | None = None,
    limit: int = 500,
    newest: bool = False,
) -> list[Event]:
    """Events with an id above ``after``, oldest first, filtered; with ``newest``, the last ``limit`` of them.
    ``types`` entries ending in '.' are prefixes."""
    query = select(Event).where(Event.id > after)
    if projects is not None:
        query = query.where(Event.project.in_(projects))
    if kind:
        query = query.where(Event.resource_kind == kind)
    if resource:
        query = query.where((Event.resource_name == resource) | (Event.resource_id == resource))
    if types:
        from sqlalchemy import or_

        query = query.where(or_(*(Event.type.startswith(t) if t.endswith(".") else Event.type == t for t in types)))
    if newest:
        return list(reversed(session.scalars(query.order_by(Event.id.desc()).limit(limit)).all()))
    return list(session.scalars(query.order_by(Event.id).limit(limit)))


def last_id(session: Session) -> int:
    from sqlalchemy import func

    return int(session.scalar(select(func.coalesce(func.max(Event.id), 0))) or 0)


install()
