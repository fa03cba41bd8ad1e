"""What the API returns: plain, stable shapes built from store rows (never the rows themselves)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from corral.spec.vm import VMSpec, memory_floor
from corral.store.models import VM, Host, Image, Job, Network, PortForward, Volume


class JobView(BaseModel):
    id: str
    kind: str
    state: str
    target_kind: str
    target_name: str
    host: str | None
    progress: float
    message: str
    log: list[Any]
    result: dict[str, Any] | None
    error: str | None
    error_code: str | None
    error_hint: str | None
    version: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobView:
        return cls.model_validate(job, from_attributes=True)


class VolumeView(BaseModel):
    name: str
    pool: str
    host: str | None
    size: int
    format: str
    state: str
    role: str
    vm: str | None
    path: str
    created_at: datetime

    @classmethod
    def of(cls, volume: Volume) -> VolumeView:
        return cls(
            name=volume.name,
            pool=volume.pool,
            host=volume.host,
            size=volume.size,
            format=volume.format,
            state=volume.state,
            role=volume.role,
            vm=volume.vm.name if volume.vm else None,
            path=volume.path,
            created_at=volume.created_at,
        )


class NicView(BaseModel):
    slot: int
    network: str
    mac: str | None
    ip: str | None = Field(default=None, description="the address reserved for the NIC in its network's DHCP")


class ForwardView(BaseModel):
    protocol: str
    host_port: int
    guest_port: int
    nic: int

    @classmethod
    def of(cls, forward: PortForward) -> ForwardView:
        return cls(
            protocol=forward.protocol, host_port=forward.host_port, guest_port=forward.guest_port, nic=forward.nic_index
        )


class NetworkView(BaseModel):
    name: str
    id: str
    project: str
    mode: str
    subnet: str | None
    gateway: str | None
    dhcp: bool
    uplink: str | None
    bridge: str
    state: str
    status: str
    vms: list[str]
    created_at: datetime
    vni: int | None = Field(default=None, description="the VXLAN identifier the network spans a pool's hosts with")
    mtu: int | None = None
    hosts: list[str] = Field(default_factory=list, description="the hosts with a VM on the network")

    @classmethod
    def of(cls, network: Network, vms: list[str] | None = None, hosts: list[str] | None = None) -> NetworkView:
        return cls(
            name=network.name,
            id=network.id,
            project=network.project,
            mode=network.mode,
            subnet=network.subnet,
            gateway=network.gateway,
            dhcp=network.dhcp,
            uplink=network.uplink,
            bridge=network.bridge,
            state=network.state,
            status=network.status_message,
            vms=sorted(vms or []),
            created_at=network.created_at,
            vni=network.vni,
            mtu=network.mtu,
            hosts=hosts or [],
        )


class VMView(BaseModel):
    name: str
    id: str
    project: str
    host: str | None
    image: str
    cpus: int
    memory: int
    desired_state: str
    state: str
    ready: bool
    status: str
    pid: int | None
    interfaces: list[Any]
    ports: dict[str, Any]
    restart_policy: str
    restart_count: int
    last_exit: dict[str, Any] | None
    spec: VMSpec
    disks: list[VolumeView]
    nics: list[NicView] = []
    port_forwards: list[ForwardView] = []
    memory_actual: int | None = Field(default=None, description="what the guest has now, after its balloon")
    min_memory: int | None = Field(default=None, description="the floor set with `vm set --min-memory`, if any")
    memory_floor: int | None = Field(default=None, description="the least automatic ballooning leaves the guest")
    replica: dict[str, Any] | None = Field(
        default=None, description="its replica on a partner host: interval (the bound on data loss) and age"
    )
    created_at: datetime
    started_at: datetime | None

    @classmethod
    def of(cls, vm: VM) -> VMView:
        spec = VMSpec.model_validate(vm.spec)
        return cls(
            name=vm.name,
            id=vm.id,
            project=vm.project,
            host=vm.host,
            image=spec.image,
            cpus=spec.cpus,
            memory=spec.memory,
            desired_state=vm.desired_state,
            state=vm.observed_state,
            ready=vm.ready,
            status=vm.status_message,
            pid=vm.pid,
            interfaces=vm.interfaces,
            ports=vm.ports or {},
            restart_policy=spec.restart_policy,
            restart_count=vm.restart_count,
            last_exit=vm.last_exit,
            spec=spec,
            disks=[VolumeView.of(v) for v in sorted(vm.volumes, key=lambda v: v.device_index)],
            nics=_nics(spec, vm),
            port_forwards=[ForwardView.of(f) for f in sorted(vm.port_forwards, key=lambda f: f.host_port)],
            memory_actual=(vm.stats or {}).get("balloon_bytes") if vm.pid else None,
            min_memory=vm.min_memory,
            memory_floor=memory_floor(spec.memory, vm.min_memory),
            replica=_replica(vm),
            created_at=vm.created_at,
            started_at=vm.started_at,
        )


def _replica(vm: VM) -> dict[str, Any] | None:
    from sqlalchemy.orm import object_session

    from corral.cluster import replication

    session = object_session(vm)
    row = replication.replica_of(session, vm.id) if session is not None else None
    return replication.describe(row) if row is not None else None


def _nics(spec: VMSpec, vm: VM) -> list[NicView]:
    addresses = {port.nic_index: port.ip for port in vm.network_ports}
    return [
        NicView(
            slot=spec.nic_slot(position), network=nic.network, mac=nic.mac, ip=addresses.get(spec.nic_slot(position))
        )
        for position, nic in enumerate(spec.nics)
    ]


class ImageView(BaseModel):
    name: str
    id: str
    state: str
    kind: str
    source: str | None
    virtual_size: int
    size_on_disk: int
    cmdline: str
    details: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, image: Image) -> ImageView:
        return cls.model_validate(image, from_attributes=True)


class HostView(BaseModel):
    name: str
    state: str
    cpus: int
    memory: int
    storage_total: int
    storage_free: int
    accel: str
    qemu_version: str | None
    cpu_overcommit: float
    memory_overcommit: float
    storage_overcommit: float = 1.0
    address: str | None = None
    drained: bool = False
    standby: bool = False  # emptied by consolidation: no placements until woken (docs/optimization.md)
    usage: dict[str, Any] = {}
    allocated_storage: int = 0
    allocated_cpus: int = 0
    allocated_memory: int = 0
    vms: int = 0
    heartbeat_at: datetime
    # HA (docs/ha.md): the lease's expiry on the database clock (None: holds none) and the takeover epoch.
    lease_expires_at: datetime | None = None
    epoch: int = 0

    @classmethod
    def of(cls, host: Host, **allocation: int) -> HostView:
        data = {key: getattr(host, key) for key in cls.model_fields if hasattr(host, key)}
        return cls(**{**data, **allocation})


class Accepted(BaseModel):
    """A verb was accepted: the job that carries it out (None when nothing needed doing)."""

    job: JobView | None
    vm: VMView | None = None
    image: ImageView | None = None
    volume: VolumeView | None = None
    network: NetworkView | None = None
