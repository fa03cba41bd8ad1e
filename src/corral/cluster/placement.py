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
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import BigInteger, Integer, cast, func, select
from sqlalchemy.orm import Session

from corral.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from corral.spec.sizes import format_size
from corral.spec.vm import USER_NETWORK, PowerState, VMSpec
from corral.store.models import VM, Host, Network, Volume, utcnow

# Serialises check-and-commit among the threads of one process (the SQLite write lock and PostgreSQL's row
# locks do it between processes).
placement_lock = threading.RLock()
HOST_TIMEOUT = timedelta(seconds=60)
RUNNING_STATES = (PowerState.RUNNING, PowerState.PAUSED)


class Strategy(StrEnum):
    SPREAD = "spread"
    PACK = "pack"


class Policy(StrEnum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"


class NoRoom(InsufficientResources):
    """A capacity refusal told twice. ``message`` names hosts and their numbers, for whoever runs the pool (the
    local root, cluster admins); :meth:`for_tenants` says what the project can do about it without telling a
    tenant the pool's hosts, their sizes or what other projects take (the API picks one by its caller)."""

    def __init__(self, message: str, hint: str | None, *, tenant: str, tenant_hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.tenant = tenant
        self.tenant_hint = tenant_hint

    def for_tenants(self) -> InsufficientResources:
        return InsufficientResources(self.tenant, self.tenant_hint)


class NoHostOnline(Conflict):
    """No host can run VMs at all (none online, QEMU missing): the hosts' names and states are for insiders;
    :meth:`for_tenants` says only that the pool cannot run VMs now."""

    def for_tenants(self) -> Conflict:
        return Conflict("no host can run VMs now", "ask the cluster's administrator")


TENANT_HINT = "ask for less, or stop a VM of this project; the cluster's administrator can see why on the hosts"


def _short_of(reasons: Iterable[str]) -> str:
    """What the refusals are about, in words that name no host and no number of the pool."""
    words = []
    for reason in reasons:
        for key, word in (
            ("vCPUs", "vCPUs"),
            ("memory", "memory"),
            ("storage", "storage"),
            ("affinity", "the VM's placement group"),
            ("bridge", "its network's uplink"),
            ("volume", "its volumes' storage pool"),
            ("host is", "hosts that are up"),
        ):
            if key in reason and word not in words:
                words.append(word)
    return ", ".join(words) or "room"


def _needs(request: PlacementRequest) -> str:
    parts = [f"{request.cpus} vCPUs", f"{format_size(request.memory)} of memory"]
    if request.storage:
        parts.append(f"{format_size(request.storage)} of storage")
    return ", ".join(parts)


# The control plane's weighing, from its settings (create_app calls configure); requests may not override it.
_default_strategy = Strategy.SPREAD


def configure(strategy: str, host_timeout: float | None = None) -> None:
    """Set this process's weighing and heartbeat timeout from its settings."""
    global _default_strategy, HOST_TIMEOUT
    _default_strategy = Strategy(strategy)
    if host_timeout is not None:
        HOST_TIMEOUT = timedelta(seconds=host_timeout)


class Allocation(BaseModel):
    cpus: int = 0
    memory: int = 0
    vms: int = 0


class VolumeNeed(BaseModel):
    """An existing volume a new VM attaches: it lives in ``pool`` on ``host``, so the VM must run there or on a
    host that mounts the same pool (the same ``pool_id``, see corral.cluster.migrations)."""

    name: str
    host: str | None
    pool: str = "default"
    pool_id: str | None = None


class PlacementRequest(BaseModel):
    """What one VM needs from a host, and the user's hints."""

    cpus: int
    memory: int
    storage: int = 0
    will_run: bool = True
    host: str | None = None
    group: str | None = None
    policy: Policy | None = None
    accel: str | None = None
    project: str = "default"
    # NICs on corral networks need an agent that makes bridges; bridge-mode ones also their uplink on the host.
    bridged: bool = False
    uplinks: list[str] = Field(default_factory=list)
    volumes: list[VolumeNeed] = Field(default_factory=list)

    @classmethod
    def of(cls, spec: VMSpec, storage: int = 0, **hints: Any) -> PlacementRequest:
        return cls(cpus=spec.cpus, memory=spec.memory, storage=storage, **hints)


HOST_COLUMNS = (
    "name",
    "state",
    "heartbeat_at",
    "drained",
    "qemu_version",
    "accel",
    "cpus",
    "memory",
    "reserved_memory",
    "cpu_overcommit",
    "memory_overcommit",
    "storage_total",
    "storage_overcommit",
    "usage",
    "standby",
)


class HostLoad:
    """One host as the scheduler sees it: its row's capacity and what is allocated on it now."""

    __slots__ = (
        "accel",
        "bridges",
        "cpu_cap",
        "cpus",
        "cpus_alloc",
        "drained",
        "groups",
        "mem_cap",
        "mem_usable",
        "memory_alloc",
        "name",
        "networking",
        "online",
        "pool_ids",
        "qemu",
        "standby",
        "state",
        "storage_alloc",
        "storage_cap",
        "vms",
    )

    def __init__(self, host: Any, online: bool) -> None:
        """``host``: a Host, or a row with its HOST_COLUMNS."""
        self.name = host.name
        self.state = host.state if online or host.state != "online" else "unreachable"
        self.online = online
        self.drained = host.drained
        # Emptied by consolidation (corral.cluster.plans): no placements until woken, which ``pick`` does when
        # nothing else fits.
        self.standby = bool(getattr(host, "standby", False))
        self.qemu = host.qemu_version is not None
        self.accel = host.accel
        self.cpus = host.cpus
        self.mem_usable = max(0, host.memory - host.reserved_memory)
        self.cpu_cap, self.mem_cap = capacity(host)
        self.storage_cap = host.storage_total * host.storage_overcommit
        # What the agent's heartbeat saw (corral.host.agent.register); None: not reported, nothing is assumed.
        usage = getattr(host, "usage", None) or {}
        self.bridges: set[str] | None = set(usage["bridges"]) if "bridges" in usage else None
        self.networking: bool = bool(usage.get("networking", True))
        self.pool_ids: dict[str, str] = {"default": usage["pool_id"]} if usage.get("pool_id") else {}
        self.cpus_alloc = 0
        self.memory_alloc = 0
        self.storage_alloc = 0
        self.vms = 0
        self.groups: dict[str, int] = {}

    def utilisation(self) -> float:
        """The largest fraction in use of CPU, memory and storage capacity: the quantity weights compare."""
        return max(
            self.cpus_alloc / self.cpu_cap if self.cpu_cap else 1.0,
            self.memory_alloc / self.mem_cap if self.mem_cap else 1.0,
            self.storage_alloc / self.storage_cap if self.storage_cap else 0.0,
        )

    def add(self, request: PlacementRequest) -> None:
        if request.will_run:
            self.cpus_alloc += request.cpus
            self.memory_alloc += request.memory
        self.storage_alloc += request.storage
        self.vms += 1
        if request.group:
            self.groups[request.group] = self.groups.get(request.group, 0) + 1

    def fits(self, request: PlacementRequest) -> str | None:
        """None when ``request`` can go here now, else why not (one phrase, with the numbers)."""
        if self.state != "online":
            return f"host is {self.state}"
        if self.drained:
            return "host is drained"
        if self.standby:
            return "host is in standby"
        if not self.qemu:
            return "QEMU is not installed"
        if request.accel and request.accel != self.accel:
            return f"accelerator is {self.accel}, not {request.accel}"
        if request.bridged and not self.networking:
            return "its agent cannot make bridges (not root): no corral networks here"
        missing = [uplink for uplink in request.uplinks if self.bridges is not None and uplink not in self.bridges]
        if missing:
            return f"no bridge {', '.join(missing)} here (the uplink of a bridge-mode network)"
        for need in request.volumes:
            if need.host != self.name and not (need.pool_id and self.pool_ids.get(need.pool) == need.pool_id):
                return f"volume {need.name} is in storage pool {need.pool} of host {need.host}, not shared here"
        if request.cpus > self.cpus:
            return f"{request.cpus} vCPUs is more than host {self.name} has ({self.cpus})"
        if request.memory > self.mem_usable:
            return (
                f"{format_size(request.memory)} of memory is more than host {self.name} can give "
                f"({format_size(self.mem_usable)})"
            )
        if request.will_run:
            if self.cpus_alloc + request.cpus > self.cpu_cap:
                return f"{self.cpu_cap - self.cpus_alloc:g} of {self.cpu_cap:g} vCPUs left, {request.cpus} needed"
            if self.memory_alloc + request.memory > self.mem_cap:
                return (
                    f"{format_size(int(max(0, self.mem_cap - self.memory_alloc)))} of memory left, "
                    f"{format_size(request.memory)} needed"
                )
        if request.storage and self.storage_alloc + request.storage > self.storage_cap:
            return (
                f"{format_size(int(max(0, self.storage_cap - self.storage_alloc)))} of storage left, "
                f"{format_size(request.storage)} needed"
            )
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "cpus": f"{self.cpus_alloc}/{self.cpu_cap:g}",
            "memory": f"{format_size(self.memory_alloc)}/{format_size(int(self.mem_cap))}",
            "utilisation": round(self.utilisation(), 4),
        }


class HostVerdict(BaseModel):
    host: str
    chosen: bool = False
    fits: bool
    reason: str
    weight: float | None = None
    allocation: dict[str, Any] = Field(default_factory=dict)


class PlacementPlan(BaseModel):
    """``vm create --dry-run``: the host that would be chosen, and every host's verdict."""

    strategy: Strategy
    group: str | None = None
    policy: Policy | None = None
    chosen: str | None
    hosts: list[HostVerdict]


def capacity(host: Any) -> tuple[float, float]:
    """CPUs and bytes of memory this host may hand out."""
    return host.cpus * host.cpu_overcommit, max(0, host.memory - host.reserved_memory) * host.memory_overcommit


def is_online(host: Any, now: Any = None) -> bool:
    """Online, and heard from within the timeout (the control plane marks it unreachable soon after, too)."""
    return host.state == "online" and host.heartbeat_at >= (now or utcnow()) - HOST_TIMEOUT


def online_hosts(session: Session) -> list[Host]:
    now = utcnow()
    hosts = session.scalars(select(Host).order_by(Host.name)).all()
    return [h for h in hosts if is_online(h, now)]


def _vm_cpus() -> Any:
    return cast(VM.spec["cpus"].as_string(), Integer)


def _vm_memory() -> Any:
    return cast(VM.spec["memory"].as_string(), BigInteger)


def allocations(
    session: Session, hosts: Iterable[str] | None = None, exclude_vm: str | None = None
) -> dict[str, Allocation]:
    """CPU and memory of the VMs meant to run, per host, in one query."""
    query = (
        select(VM.host, func.coalesce(func.sum(_vm_cpus()), 0), func.coalesce(func.sum(_vm_memory()), 0), func.count())
        .where(VM.desired_state.in_(RUNNING_STATES), VM.host.is_not(None))
        .group_by(VM.host)
    )
    if hosts is not None:
        query = query.where(VM.host.in_(list(hosts)))
    if exclude_vm is not None:
        query = query.where(VM.id != exclude_vm)
    return {host: Allocation(cpus=int(c), memory=int(m), vms=int(n)) for host, c, m, n in session.execute(query)}


def allocated(session: Session, host: str, exclude_vm: str | None = None) -> Allocation:
    return allocations(session, [host], exclude_vm).get(host, Allocation())


def storage_allocated(session: Session, hosts: Iterable[str] | None = None) -> dict[str, int]:
    """Bytes of disks promised on each host (their virtual sizes)."""
    query = select(Volume.host, func.sum(Volume.size)).where(Volume.host.is_not(None)).group_by(Volume.host)
    if hosts is not None:
        query = query.where(Volume.host.in_(list(hosts)))
    return {host: int(total or 0) for host, total in session.execute(query)}


def load_pool(
    session: Session, project: str = "default", only: Iterable[str] | None = None, lock: bool = False
) -> dict[str, HostLoad]:
    """Every host (or ``only`` these) with what is allocated on it: three aggregate queries, whatever the size."""
    # Plain rows, not ORM objects: a thousand hosts load in a few milliseconds instead of tens.
    query = select(*(getattr(Host, column) for column in HOST_COLUMNS)).order_by(Host.name)
    names = list(only) if only is not None else None
    if names is not None:
        query = query.where(Host.name.in_(names))
    if lock:
        query = query.with_for_update()
    now = utcnow()
    view = {host.name: HostLoad(host, is_online(host, now)) for host in session.execute(query)}
    for name, used in allocations(session, names).items():
        if name in view:
            view[name].cpus_alloc, view[name].memory_alloc, view[name].vms = used.cpus, used.memory, used.vms
    for name, total in storage_allocated(session, names).items():
        if name in view:
            view[name].storage_alloc = total
    members = (
        select(VM.host, VM.placement_group, func.count())
        .where(VM.project == project, VM.placement_group.is_not(None), VM.host.is_not(None))
        .group_by(VM.host, VM.placement_group)
    )
    if names is not None:
        members = members.where(VM.host.in_(names))
    for name, group, count in session.execute(members):
        if name in view:
            view[name].groups[group] = int(count)
    return view


def needs(session: Session, spec: VMSpec, project: str = "default", attached: Iterable[Volume] = ()) -> dict[str, Any]:
    """What ``spec`` needs from a host besides capacity, as PlacementRequest fields: an agent that makes bridges
    when a NIC is on a corral network, the uplink bridge of each bridge-mode network (nat and isolated networks
    are made on any host), and for each ``attached`` volume its host or a host sharing its pool."""
    names = {nic.network for nic in spec.nics if nic.network != USER_NETWORK}
    uplinks: set[str] = set()
    if names:
        rows = session.execute(
            select(Network.mode, Network.uplink).where(Network.project == project, Network.name.in_(names))
        )
        uplinks = {uplink for mode, uplink in rows if mode == "bridge" and uplink}
    volumes = list(attached)
    usage: dict[str, dict[str, Any]] = {}
    if volumes:
        homes = {volume.host for volume in volumes if volume.host}
        usage = {
            name: used or {}
            for name, used in session.execute(select(Host.name, Host.usage).where(Host.name.in_(homes)))
        }
    return {
        "bridged": bool(names),
        "uplinks": sorted(uplinks),
        "volumes": [
            VolumeNeed(
                name=volume.name,
                host=volume.host,
                pool=volume.pool,
                pool_id=usage.get(volume.host or "", {}).get("pool_id") if volume.pool == "default" else None,
            )
            for volume in volumes
        ],
    }


def group_policy(session: Session, project: str, group: str | None, policy: str | None) -> Policy | None:
    """The policy a group's VMs share: the one its first VM was made with. Asking for the other one is refused."""
    if group is None:
        if policy is not None:
            raise InvalidInput("--policy needs --group", "name the group: --group GROUP --policy " + str(policy))
        return None
    existing = session.scalars(
        select(VM.placement_policy).where(VM.project == project, VM.placement_group == group).limit(1)
    ).first()
    if existing is not None and policy is not None and existing != policy:
        raise Conflict(
            f"group {group!r} is {existing}, not {policy}",
            f"pass --policy {existing}, or leave --policy out to join it as it is",
        )
    return Policy(existing or policy or Policy.ANTI_AFFINITY)


class Scheduler:
    """Filters and weights over a pool view. ``place`` updates the view, so successive calls see earlier ones."""

    def __init__(self, view: dict[str, HostLoad], strategy: Strategy | str | None = None) -> None:
        self.view = view
        self.strategy = Strategy(strategy or _default_strategy)
        self._key: dict[str, float] = {load.name: self.weight(load) for load in view.values()}
        # One heap per request shape, without the hosts that can no longer take that shape: in a batch,
        # allocations only grow, so a host too full (or unsuitable) for a shape stays so. Without this, packing
        # would pop every full host again for every VM.
        self._heaps: dict[tuple[Any, ...], list[tuple[float, str]]] = {}
        self._dead: dict[tuple[Any, ...], set[str]] = {}

    def weight(self, load: HostLoad) -> float:
        """Lower is better: spread wants the least allocated host, pack the most allocated one."""
        return load.utilisation() if self.strategy == Strategy.SPREAD else -load.utilisation()

    @staticmethod
    def _shape(request: PlacementRequest) -> tuple[Any, ...]:
        running = request.will_run
        return (
            request.cpus if running else 0,
            request.memory if running else 0,
            request.storage,
            request.accel,
            request.bridged,
            tuple(request.uplinks),
            tuple((v.host, v.pool, v.pool_id) for v in request.volumes),
        )

    def _heap_for(self, shape: tuple[Any, ...]) -> list[tuple[float, str]]:
        heap = self._heaps.get(shape)
        if heap is None:
            dead = self._dead.setdefault(shape, set())
            heap = [(key, name) for name, key in self._key.items() if name not in dead]
            heapq.heapify(heap)
            self._heaps[shape] = heap
        return heap

    def _push(self, load: HostLoad) -> None:
        key = self.weight(load)
        self._key[load.name] = key
        for shape, heap in self._heaps.items():
            if load.name not in self._dead[shape]:
                heapq.heappush(heap, (key, load.name))

    def _group_rule(self, load: HostLoad, request: PlacementRequest) -> str | None:
        if not request.group:
            return None
        members_here = load.groups.get(request.group, 0)
        if request.policy == Policy.ANTI_AFFINITY and members_here:
            return f"anti-affinity: a VM of group {request.group} is already here"
        if request.policy == Policy.AFFINITY and not members_here and self._group_hosts(request.group):
            return f"affinity: group {request.group} runs on {', '.join(self._group_hosts(request.group))}"
        return None

    def _group_hosts(self, group: str) -> list[str]:
        return sorted(name for name, load in self.view.items() if load.groups.get(group))

    def verdict(self, load: HostLoad, request: PlacementRequest) -> str | None:
        if request.host is not None and load.name != request.host:
            return f"--host {request.host} was asked for"
        return load.fits(request) or self._group_rule(load, request)

    def candidates(self, request: PlacementRequest) -> Iterable[HostLoad]:
        """Hosts in weight order, lazily: a heap with stale entries skipped."""
        if request.host is not None:
            if request.host in self.view:
                yield self.view[request.host]
            return
        if request.group and request.policy == Policy.AFFINITY:
            members = self._group_hosts(request.group)
            if members:
                yield from sorted((self.view[name] for name in members), key=self.weight)
                return
        shape = self._shape(request)
        heap, dead = self._heap_for(shape), self._dead[shape]
        popped: list[tuple[float, str]] = []
        try:
            while heap:
                key, name = heapq.heappop(heap)
                if self._key.get(name) != key or name in dead:
                    continue  # stale: the host's weight changed since this entry
                popped.append((key, name))
                yield self.view[name]
        finally:
            for entry in popped:
                if self._key.get(entry[1]) == entry[0] and entry[1] not in dead:
                    heapq.heappush(heap, entry)

    def place(self, request: PlacementRequest) -> HostLoad:
        """The best host that passes every filter; raises with every host's reason when none does."""
        for load in self.candidates(request):
            if request.host is None and load.fits(request) is not None:
                self._dead[self._shape(request)].add(load.name)  # stays true for the rest of this batch
                continue
            if self.verdict(load, request) is None:
                self.commit(load, request)
                return load
        raise self.no_host(request)

    def commit(self, load: HostLoad, request: PlacementRequest) -> None:
        load.add(request)
        self._push(load)

    def no_host(self, request: PlacementRequest) -> Exception:
        if request.host is not None and request.host not in self.view:
            return NotFound(f"host {request.host!r} is not registered", "list hosts with `corral host list`")
        verdicts = self.explain(request)
        if not verdicts:
            return Conflict("no host agent is registered", "start one with `corral serve` or `corral agent`")
        reasons = [f"{v.host}: {v.reason}" for v in verdicts if not v.fits]
        if all("QEMU is not installed" in r for r in reasons):
            return NoHostOnline(
                f"cannot run VMs on {'; '.join(reasons)}",
                "install qemu-system-x86 (apt-get install qemu-system-x86), then restart corral",
            )
        if not any(v.reason not in ("host is unreachable", "host is offline") for v in verdicts):
            return NoHostOnline(
                "no host agent is online: " + "; ".join(reasons),
                "start the daemon with `corral serve` (or the hosts' `corral agent`)",
            )
        shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        tenant = f"no host can take this VM now (it needs {_needs(request)}; short of {_short_of(reasons)})"
        if len(verdicts) == 1:
            return NoRoom(
                f"host {shown}",
                "stop a VM, ask for less, or raise the overcommit ratios",
                tenant=tenant,
                tenant_hint=TENANT_HINT,
            )
        if request.host is not None:
            reason = next(v.reason for v in verdicts if v.host == request.host)
            return NoRoom(
                f"host {request.host} cannot take this VM: " + reason,
                "see why with --dry-run, or leave --host out",
                tenant=f"host {request.host} cannot take this VM now (short of {_short_of([reason])})",
                tenant_hint="leave --host out, or ask for less",
            )
        return NoRoom(
            f"no host can take this VM: {shown}",
            "see why with --dry-run; stop VMs, add hosts or undrain one",
            tenant=tenant,
            tenant_hint=TENANT_HINT,
        )

    def explain(self, request: PlacementRequest) -> list[HostVerdict]:
        """Every host's verdict, in weight order; the first that fits is the one ``place`` would choose."""
        loads = sorted(self.view.values(), key=lambda load: (self.weight(load), load.name))
        if request.group and request.policy == Policy.AFFINITY and self._group_hosts(request.group):
            members = set(self._group_hosts(request.group))
            loads.sort(key=lambda load: load.name not in members)
        verdicts, chosen = [], False
        for load in loads:
            reason = self.verdict(load, request)
            pick = reason is None and not chosen
            chosen = chosen or pick
            verdicts.append(
                HostVerdict(
                    host=load.name,
                    chosen=pick,
                    fits=reason is None,
                    reason=reason or ("chosen: " if pick else "fits: ") + self._why_weight(load),
                    weight=round(load.utilisation(), 4),
                    allocation=load.summary(),
                )
            )
        return verdicts

    def _why_weight(self, load: HostLoad) -> str:
        word = "least" if self.strategy == Strategy.SPREAD else "most"
        return f"{self.strategy} ({word} allocated first), {load.utilisation():.0%} allocated"


def plan(session: Session, request: PlacementRequest, strategy: Strategy | str | None = None) -> PlacementPlan:
    """The dry run: what ``pick`` would do now, and why for every host. Changes nothing."""
    request = request.model_copy(
        update={"policy": group_policy(session, request.project, request.group, request.policy)}
    )
    scheduler = Scheduler(load_pool(session, request.project), strategy)
    verdicts = scheduler.explain(request)
    if request.host is not None and request.host not in scheduler.view:
        raise NotFound(f"host {request.host!r} is not registered", "list hosts with `corral host list`")
    chosen = next((v.host for v in verdicts if v.chosen), None)
    return PlacementPlan(
        strategy=scheduler.strategy, group=request.group, policy=request.policy, chosen=chosen, hosts=verdicts
    )


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


def place_many(
    session: Session, requests: list[PlacementRequest], strategy: Strategy | str | None = None
) -> list[str | None]:
    """Hosts for many VMs at once (a drain, a batch, the benchmark): the pool is read once. A request that fits
    nowhere gets None; the others still get hosts. Callers hold ``placement_lock`` and write in the same
    transaction (on PostgreSQL, lock the hosts first with ``load_pool(..., lock=True)``)."""
    projects = {request.project for request in requests} or {"default"}
    if len(projects) > 1:
        raise InvalidInput("place_many places one project's VMs at a time", "call it once per project")
    project = projects.pop()
    scheduler = Scheduler(load_pool(session, project, lock=session.get_bind().dialect.name == "postgresql"), strategy)
    policies: dict[str, Policy | None] = {}
    chosen: list[str | None] = []
    for request in requests:
        if request.group and request.group not in policies:
            policies[request.group] = group_policy(session, project, request.group, request.policy)
        if request.group:
            request = request.model_copy(update={"policy": policies[request.group]})
        try:
            chosen.append(scheduler.place(request).name)
        except (InsufficientResources, Conflict, NotFound):
            chosen.append(None)
    return chosen


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
