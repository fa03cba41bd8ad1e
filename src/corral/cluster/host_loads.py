"""The pool as placement sees it, and the filters: which hosts may take a VM, and why not.

A VM counts against a host's CPU and memory while its desired state is running or paused; stopped VMs hold their
disks but not CPU or memory. Disks count against the host's storage whatever the VM's state, under the host's
storage overcommit ratio (qcow2 overlays are thin).

**Filters** (:meth:`HostLoad.fits`) reject a host with a reason a person can act on: not online (unreachable,
offline), drained, QEMU missing, the wrong accelerator, networks or storage it lacks (the uplink bridge of a
bridge-mode network, an agent that cannot make bridges, an attached volume in a pool the host does not share), too
small for the VM at all, or not enough capacity left under the overcommit ratios. The view (:func:`load_pool`)
reads the whole pool in three queries. Weights and the scheduler that applies filters and weights are in
corral.cluster.scheduler; the entry points the verbs call are in corral.cluster.placement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import BigInteger, Integer, cast, func, select
from sqlalchemy.orm import Session

from corral.errors import Conflict, InsufficientResources, InvalidInput
from corral.spec.sizes import format_size
from corral.spec.vm import USER_NETWORK, PowerState, VMSpec
from corral.store.models import VM, Host, Network, Volume, utcnow

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


@dataclass
class Settings:
    """This process's weighing and heartbeat timeout, from its settings (``corral.cluster.placement.configure``,
    which create_app calls); requests may not override them. One mutable object, so every module that reads
    them sees the configured values."""

    strategy: Strategy = Strategy.SPREAD
    host_timeout: timedelta = field(default_factory=lambda: timedelta(seconds=60))


settings = Settings()


class Allocation(BaseModel):
    cpus: int = 0
    memory: int = 0
    vms: int = 0


class VolumeNeed(BaseModel):
    """An existing volume a new VM attaches: it lives in ``pool`` on ``host``, so the VM must run there or on a
    host that mounts the same pool (the same ``pool_id``, see corral.cluster.moves)."""

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


def pool_id(host: Host) -> str | None:
    """The storage pool identity an agent reported: hosts that report the same one mount the same storage pool
    (corral.cluster.moves explains how it is found)."""
    value = (host.usage or {}).get("pool_id")
    return str(value) if value else None


def shares_storage(source: Host, target: Host) -> bool:
    ours, theirs = pool_id(source), pool_id(target)
    return ours is not None and ours == theirs


def capacity(host: Any) -> tuple[float, float]:
    """CPUs and bytes of memory this host may hand out."""
    return host.cpus * host.cpu_overcommit, max(0, host.memory - host.reserved_memory) * host.memory_overcommit


def is_online(host: Any, now: Any = None) -> bool:
    """Online, and heard from within the timeout (the control plane marks it unreachable soon after, too)."""
    return host.state == "online" and host.heartbeat_at >= (now or utcnow()) - settings.host_timeout


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
    return {host: int(total or 0) for host, total in session.execute(query) if host is not None}


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
    for member_host, group, count in session.execute(members):
        if member_host is not None and member_host in view and group is not None:  # both filtered as not NULL above
            view[member_host].groups[group] = int(count)
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
