"""Where a VM may run: filters, then weights, over a view of the pool loaded in three queries.

A VM counts against a host's CPU and memory while its desired state is running or paused; stopped VMs hold their
disks but not CPU or memory. Disks count against the host's storage whatever the VM's state, under the host's
storage overcommit ratio (qcow2 overlays are thin).

**Filters** reject a host with a reason a person can act on: not online (unreachable, offline), drained, QEMU
missing, the wrong accelerator, networks or storage it lacks (the uplink bridge of a bridge-mode network, an agent
that cannot make bridges, an attached volume in a pool the host does not share), too small for the VM at all, not
enough capacity left under the overcommit ratios, or an affinity / anti-affinity group that rules it out.
**Weights** order what passes: ``spread`` (the default) takes the least allocated host, ``pack`` the most
allocated one that still fits, so that whole hosts stay free. Allocation is the largest of the CPU, memory and
storage fractions in use.

**Concurrency.** On SQLite every writing transaction holds the database's write lock from its start (BEGIN
IMMEDIATE), so check-and-commit is serialised already. On PostgreSQL many control planes place at once: the
chosen host's row is locked (SELECT ... FOR UPDATE) and its allocation re-read under the lock before the VM row
is written; a host that no longer fits is released (the lock was taken inside a savepoint) and the next one is
tried. A transaction holds at most one host lock while it waits, so two placements never deadlock.

The view and the scheduler also place many VMs at once (``place_many``): the pool is read once and a heap keeps
hosts in weight order, which is how 10,000 VMs find hosts among 1,000 in well under two seconds
(benchmarks/scheduler.py).

**Modules.** corral.cluster.host_loads holds the pool's view and the filters, corral.cluster.scheduler the
weights and the scheduler; this module holds what the verbs call (one VM's host, its checks, the settings) and
waking a standby host when nothing awake fits. Every public name of the three is importable from here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster.host_loads import (
    HOST_COLUMNS,
    RUNNING_STATES,
    TENANT_HINT,
    Allocation,
    HostLoad,
    HostVerdict,
    NoHostOnline,
    NoRoom,
    PlacementPlan,
    PlacementRequest,
    Policy,
    Settings,
    Strategy,
    VolumeNeed,
    allocated,
    allocations,
    capacity,
    group_policy,
    is_online,
    load_pool,
    needs,
    online_hosts,
    pool_id,
    settings,
    shares_storage,
    storage_allocated,
)
from corral.cluster.scheduler import Scheduler, place_many, plan
from corral.errors import Conflict
from corral.spec.sizes import format_size
from corral.spec.vm import VMSpec
from corral.store.models import Host, Volume

__all__ = [
    "HOST_COLUMNS",
    "RUNNING_STATES",
    "TENANT_HINT",
    "Allocation",
    "HostLoad",
    "HostVerdict",
    "NoHostOnline",
    "NoRoom",
    "PlacementPlan",
    "PlacementRequest",
    "Policy",
    "Scheduler",
    "Settings",
    "Strategy",
    "VolumeNeed",
    "allocated",
    "allocations",
    "capacity",
    "check_fits",
    "check_hard_limits",
    "configure",
    "group_policy",
    "is_online",
    "load_pool",
    "needs",
    "online_hosts",
    "pick",
    "pick_host",
    "place_many",
    "placement_lock",
    "plan",
    "pool_id",
    "settings",
    "shares_storage",
    "storage_allocated",
    "wake_for",
    "wake_hook",
]

# Serialises check-and-commit among the threads of one process (the SQLite write lock and PostgreSQL's row
# locks do it between processes).
placement_lock = threading.RLock()


def configure(strategy: str, host_timeout: float | None = None) -> None:
    """Set this process's weighing and heartbeat timeout from its settings."""
    settings.strategy = Strategy(strategy)
    if host_timeout is not None:
        settings.host_timeout = timedelta(seconds=host_timeout)


def pick(session: Session, request: PlacementRequest, strategy: Strategy | str | None = None) -> Host:
    """The host for one new VM, its row locked on PostgreSQL until the caller's transaction ends."""
    request = request.model_copy(
        update={"policy": group_policy(session, request.project, request.group, request.policy)}
    )
    scheduler = Scheduler(load_pool(session, request.project), strategy)
    shared = session.get_bind().dialect.name == "postgresql"
    for load in scheduler.candidates(request):
        if scheduler.verdict(load, request) is not None:
            continue
        if not shared:
            scheduler.commit(load, request)
            return session.scalars(select(Host).where(Host.name == load.name)).one()
        # Lock the host, then look again: another control plane may have placed a VM here since we read.
        savepoint = session.begin_nested()
        host = session.scalars(select(Host).where(Host.name == load.name).with_for_update()).one()
        fresh = load_pool(session, request.project, only=[load.name])[load.name]
        if scheduler.verdict(fresh, request) is None:
            savepoint.commit()  # the lock stays with the transaction
            scheduler.commit(load, request)
            return host
        savepoint.rollback()  # releases the lock
        scheduler.view[load.name] = fresh
    woken = wake_for(session, scheduler, request)
    if woken is not None:
        return woken
    raise scheduler.no_host(request)


# Run on the control plane when placement wakes a standby host (the power-on command; corral.cluster.plans).
wake_hook: Callable[[str, str | None], None] | None = None


def wake_for(session: Session, scheduler: Scheduler, request: PlacementRequest) -> Host | None:
    """When nothing awake fits, the standby host that would take ``request`` is woken (standby cleared, the
    wake hook run) and chosen. One switched off by the power command is not back yet: its wake hook runs and the
    caller is told to try again; the host keeps its standby flag until a placement finds its agent online and
    takes it (so a host that never comes back never looks awake)."""
    for load in sorted(scheduler.view.values(), key=lambda load: (scheduler.weight(load), load.name)):
        if not load.standby:
            continue
        state, load.standby = load.state, False
        load.state = "online"  # as it will be once awake
        reason = scheduler.verdict(load, request)
        load.state = state
        if reason is not None:
            load.standby = True
            continue
        query = select(Host).where(Host.name == load.name)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        host = session.scalars(query).one()
        if wake_hook is not None:
            wake_hook(host.name, host.address)
        if state != "online":
            load.standby = True
            raise Conflict(
                f"host {host.name} was in standby and is waking up to take this VM",
                "try again once `corral host list` shows it online",
            )
        host.standby = False
        from corral.store import events

        session.add(events.make(session, host, "host", "host.wake", {"reason": "placement needs its room"}))
        scheduler.commit(load, request)
        return host
    return None


# -- the single-VM helpers the verbs use --------------------------------------------------------------------


def check_hard_limits(host: Host, spec: VMSpec) -> None:
    """Raise when ``spec`` could never run on ``host``, whatever else runs there."""
    if spec.cpus > host.cpus:
        raise NoRoom(
            f"{spec.cpus} vCPUs is more than host {host.name} has ({host.cpus})",
            f"use --cpus {host.cpus} or fewer",
            tenant=f"{spec.cpus} vCPUs is more than the VM's host can give",
            tenant_hint="ask for fewer vCPUs",
        )
    usable_memory = max(0, host.memory - host.reserved_memory)
    if spec.memory > usable_memory:
        raise NoRoom(
            f"{format_size(spec.memory)} of memory is more than host {host.name} can give "
            f"({format_size(usable_memory)})",
            "ask for less memory",
            tenant=f"{format_size(spec.memory)} of memory is more than the VM's host can give",
            tenant_hint="ask for less memory",
        )


def check_fits(session: Session, host: Host, spec: VMSpec, exclude_vm: str | None = None) -> None:
    """Raise with the numbers when ``spec`` cannot run on ``host`` now (a start, a clone on the parent's host).
    On PostgreSQL the host's row is locked first, so concurrent starts take turns."""
    check_hard_limits(host, spec)
    if session.get_bind().dialect.name == "postgresql":
        session.scalars(select(Host.id).where(Host.id == host.id).with_for_update()).first()
    used = allocated(session, host.name, exclude_vm)
    cpu_cap, mem_cap = capacity(host)
    if used.cpus + spec.cpus > cpu_cap:
        raise NoRoom(
            f"host {host.name} has {cpu_cap - used.cpus:g} of {cpu_cap:g} vCPUs left; this VM needs {spec.cpus}",
            "stop a VM or raise cpu_overcommit in config.toml",
            tenant=f"the VM's host cannot give it {spec.cpus} vCPUs now",
            tenant_hint=TENANT_HINT,
        )
    if used.memory + spec.memory > mem_cap:
        raise NoRoom(
            f"host {host.name} has {format_size(int(mem_cap - used.memory))} of memory left; "
            f"this VM needs {format_size(spec.memory)}",
            "stop a VM or raise memory_overcommit in config.toml",
            tenant=f"the VM's host cannot give it {format_size(spec.memory)} of memory now",
            tenant_hint=TENANT_HINT,
        )


def pick_host(
    session: Session,
    spec: VMSpec,
    wanted: str | None = None,
    will_run: bool = True,
    *,
    storage: int = 0,
    group: str | None = None,
    policy: str | None = None,
    accel: str | None = None,
    project: str = "default",
    attached: Iterable[Volume] = (),
) -> Host:
    """The host for a new VM: filters, then the configured weights (see the module's docstring). ``attached``:
    existing volumes the VM takes, which tie it to their host's storage pool."""
    request = PlacementRequest.of(
        spec,
        storage=storage,
        will_run=will_run,
        host=wanted,
        group=group,
        policy=policy,
        accel=accel,
        project=project,
        **needs(session, spec, project, attached),
    )
    return pick(session, request)
