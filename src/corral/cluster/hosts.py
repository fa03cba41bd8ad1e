"""Hosts of the pool as the control plane manages them: liveness, drain, removal, and the pool's totals.

Agents own their row's inventory, usage and heartbeat (``corral.host.agent``); the control plane owns the rest.
A host whose heartbeat is older than the timeout is marked ``unreachable`` here, so placement skips it and
people see it; that alone restarts nothing elsewhere (leases decide that: corral.cluster.ha, which also marks a
host whose lease expired ``fenced``). Its next heartbeat makes an unreachable host ``online`` again; a fenced one
needs its lease renewed (corral.host.lease).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from corral.cluster import placement
from corral.errors import Conflict, NotFound
from corral.spec.job import JobState
from corral.store.models import VM, Host, Job, Volume, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult


def get_host(session: Session, name: str) -> Host:
    host = session.scalars(select(Host).where(Host.name == name)).first()
    if host is None:
        raise NotFound(f"host {name!r} not found", "list hosts with `corral host list`")
    return host


def mark_unreachable(session: Session, timeout: timedelta | None = None) -> int:
    """Hosts online in the store whose agent has not been heard from within ``timeout``: now unreachable."""
    result = session.execute(
        update(Host)
        .where(Host.state == "online", Host.heartbeat_at < utcnow() - (timeout or placement.settings.host_timeout))
        .values(state="unreachable")
    )
    return cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor result


def set_drained(session: Session, name: str, drained: bool) -> Host:
    """A drained host takes no new VMs; those it runs stay (moving them is the migration orchestrator's job)."""
    host = get_host(session, name)
    host.drained = drained
    return host


def remove(session: Session, name: str) -> None:
    """Forget a host. Refused while anything lives on it, or while its agent still reports (it would come back)."""
    host = get_host(session, name)
    vms = session.scalars(select(VM.name).where(VM.host == name).order_by(VM.name).limit(4)).all()
    if vms:
        count = session.execute(select(func.count()).select_from(VM).where(VM.host == name)).scalar_one()
        shown = ", ".join(vms[:3]) + (f" and {count - 3} more" if count > 3 else "")
        raise Conflict(
            f"host {name} still has {count} VM(s): {shown}",
            "delete or move them first (`corral vm list` shows each VM's host)",
        )
    volumes = session.scalar(select(func.count()).select_from(Volume).where(Volume.host == name))
    if volumes:
        raise Conflict(f"host {name} still holds {volumes} volume(s)", "delete them first (`corral volume list`)")
    if placement.is_online(host):
        raise Conflict(
            f"host {name} is online: its agent would register it again",
            f"stop the agent on {host.address or name} first, then remove it",
        )
    session.execute(
        update(Job)
        .where(Job.host == name, Job.state == JobState.QUEUED)
        .values(state=JobState.CANCELLED, message="the host was removed", finished_at=utcnow(), version=Job.version + 1)
    )
    session.delete(host)


class Resource(BaseModel):
    """One kind of resource over the pool (or one host): what exists, what may be promised, what is."""

    capacity: float  # physical: CPUs, bytes
    limit: float  # what may be allocated under the overcommit ratios
    allocated: float  # promised to VMs (CPU and memory: VMs meant to run; storage: every disk)
    used: float  # measured by the agents (CPU: load average; memory and storage: bytes in use)
    overcommit: float  # allocated / capacity


class PoolView(BaseModel):
    hosts: int
    online: int
    drained: int
    unreachable: int
    fenced: int = 0  # lease expired, not yet taken over (corral.cluster.ha.mark_fenced)
    vms: int
    cpu: Resource
    memory: Resource
    storage: Resource


def _resource(capacity: float, limit: float, allocated: float, used: float) -> Resource:
    return Resource(
        capacity=capacity,
        limit=limit,
        allocated=allocated,
        used=used,
        overcommit=round(allocated / capacity, 3) if capacity else 0.0,
    )


def pool(session: Session) -> PoolView:
    """The pool's totals; hosts that are not online count in the host numbers but not in capacity."""
    view = placement.load_pool(session)
    rows = {host.name: host for host in session.scalars(select(Host))}
    live = [load for load in view.values() if load.state == "online"]
    usage = [rows[load.name].usage or {} for load in live]
    vm_count = session.scalar(select(func.count()).select_from(VM)) or 0
    return PoolView(
        hosts=len(view),
        online=len(live),
        drained=sum(1 for load in view.values() if load.drained),
        unreachable=sum(1 for load in view.values() if load.state == "unreachable"),
        fenced=sum(1 for load in view.values() if load.state == "fenced"),
        vms=vm_count,
        cpu=_resource(
            sum(load.cpus for load in live),
            sum(load.cpu_cap for load in live),
            sum(load.cpus_alloc for load in live),
            sum(float(u.get("load1", 0)) for u in usage),
        ),
        memory=_resource(
            sum(rows[load.name].memory for load in live),
            sum(load.mem_cap for load in live),
            sum(load.memory_alloc for load in live),
            sum(int(u.get("memory_used", 0)) for u in usage),
        ),
        storage=_resource(
            sum(rows[load.name].storage_total for load in live),
            sum(load.storage_cap for load in live),
            sum(load.storage_alloc for load in live),
            sum(rows[load.name].storage_total - rows[load.name].storage_free for load in live),
        ),
    )
