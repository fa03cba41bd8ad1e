"""SQLAlchemy 2 tables. JSON columns hold the typed specs from corral.spec, validated on the way in and out."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def volume_file(volume_id: str) -> str:
    """The pool-relative file of a new volume: named by its id, never by its name. Names are unique only per
    project, so two projects' ``web-root`` would otherwise be one file (issue 11). Old rows keep their path."""
    return f"vol-{volume_id}.qcow2"


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite forgets the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Host(Base):
    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    address: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default="online")
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_total: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_free: Mapped[int] = mapped_column(BigInteger, default=0)
    accel: Mapped[str] = mapped_column(String(8), default="tcg")
    qemu_version: Mapped[str | None] = mapped_column(String(64))
    cpu_overcommit: Mapped[float] = mapped_column(Float, default=16.0)
    memory_overcommit: Mapped[float] = mapped_column(Float, default=1.0)
    reserved_memory: Mapped[int] = mapped_column(BigInteger, default=0)
    # Thin qcow2 overlays start at a few hundred KiB, so disks may promise more than the pool holds.
    storage_overcommit: Mapped[float] = mapped_column(Float, default=4.0)
    # An operator's "no new VMs here": kept apart from ``state``, which the agent's heartbeat owns.
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    # Emptied by consolidation: takes no placements until woken (a power command may have switched it off).
    standby: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the agent measured at its last heartbeat: memory_used, load1, storage_used (bytes).
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    # HA (PostgreSQL pools, corral.host.lease and corral.cluster.ha): the agent's lease runs until this instant of
    # the database clock; None means the host holds no lease (SQLite, or an agent stopped on purpose).
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    # Bumped by the control plane when it takes the host over: an agent renewing under an older epoch lost its VMs.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("project", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63), default="default")
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, ready, error
    kind: Mapped[str] = mapped_column(String(16), default="kernel")  # kernel (direct boot) or disk
    source: Mapped[str | None] = mapped_column(Text)
    directory: Mapped[str | None] = mapped_column(Text)
    disk_file: Mapped[str | None] = mapped_column(String(255))
    disk_format: Mapped[str] = mapped_column(String(16), default="qcow2")
    kernel_file: Mapped[str | None] = mapped_column(String(255))
    initrd_file: Mapped[str | None] = mapped_column(String(255))
    cmdline: Mapped[str] = mapped_column(Text, default="")
    virtual_size: Mapped[int] = mapped_column(BigInteger, default=0)
    size_on_disk: Mapped[int] = mapped_column(BigInteger, default=0)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class VM(Base):
    __tablename__ = "vms"
    __table_args__ = (
        UniqueConstraint("project", "name"),
        Index("ix_vms_placement_group", "project", "placement_group"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63), default="default")
    spec: Mapped[dict[str, Any]] = mapped_column()
    host: Mapped[str | None] = mapped_column(String(63), index=True)
    desired_state: Mapped[str] = mapped_column(String(16), default="stopped")
    observed_state: Mapped[str] = mapped_column(String(16), default="stopped")
    status_message: Mapped[str] = mapped_column(Text, default="")
    pid: Mapped[int | None] = mapped_column(Integer)
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    interfaces: Mapped[list[Any]] = mapped_column(default=list)
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    last_exit: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    current_snapshot: Mapped[str | None] = mapped_column(String(32))
    # Host ports forwarded to the guest while it runs (user-mode networking), e.g. {"ssh": 40123}.
    ports: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Host-local slot of the VM's own uid (sandboxed QEMU); kept while its files exist, since they are owned by it.
    uid_slot: Mapped[int | None] = mapped_column(Integer)
    # Usage the agent observed last (cgroup and QMP counters), for metrics: cpu_seconds, memory_bytes, disk io.
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    template: Mapped[str | None] = mapped_column(String(32), ForeignKey("templates.id"))
    # Affinity group: VMs of one group run on one host (affinity) or each on a different one (anti-affinity).
    placement_group: Mapped[str | None] = mapped_column(String(63))
    placement_policy: Mapped[str | None] = mapped_column(String(16))
    # The floor automatic ballooning never goes under (`vm set --min-memory`); None: the default floor
    # (corral.spec.vm.memory_floor). Not part of the spec: it steers the agent, not what QEMU is started with.
    min_memory: Mapped[int | None] = mapped_column(BigInteger)

    volumes: Mapped[list[Volume]] = relationship(back_populates="vm", order_by="Volume.device_index")
    # A VM's NICs on networks and its port forwards go with it.
    network_ports: Mapped[list[NetworkPort]] = relationship(cascade="all, delete-orphan")
    port_forwards: Mapped[list[PortForward]] = relationship(cascade="all, delete-orphan")


class Snapshot(Base):
    """A point in a VM's history. The tree lives here; the data lives inside the VM's qcow2 disks (internal
    snapshots), so deleting any node never disturbs another."""

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("vm_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    vm_id: Mapped[str] = mapped_column(String(32), ForeignKey("vms.id"))
    parent_id: Mapped[str | None] = mapped_column(String(32))
    tag: Mapped[str] = mapped_column(String(64))  # the internal snapshot's name inside the qcow2 files
    memory: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, ready, error
    description: Mapped[str] = mapped_column(Text, default="")
    vm_state_size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Backup(Base):
    """A copy of a VM's disks at one instant, in the host's backup directory (outside every pool a VM reaches).

    A full backup stands alone; an incremental one holds only what changed since its parent and reads the rest
    through its qcow2 backing chain. Rows name the VM by name and id but hold no foreign key: a backup outlives
    its VM, which is what disaster recovery needs. ``spec`` is the VM's spec when the backup was taken;
    ``disks`` lists ``{"index", "file", "size", "written"}`` with ``file`` relative to the backup directory."""

    __tablename__ = "backups"
    __table_args__ = (UniqueConstraint("project", "vm_name", "name"), Index("ix_backups_vm_id", "vm_id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63), default="default")
    vm_name: Mapped[str] = mapped_column(String(63))
    vm_id: Mapped[str] = mapped_column(String(32))
    host: Mapped[str | None] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(16), default="full")  # full or incremental
    parent_id: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, ready
    live: Mapped[bool] = mapped_column(Boolean, default=False)
    spec: Mapped[dict[str, Any]] = mapped_column()
    disks: Mapped[list[Any]] = mapped_column(default=list)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes this backup's own files take
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The schedule that made it (None: taken by hand); only a schedule's own backups are pruned by it.
    schedule_id: Mapped[str | None] = mapped_column(String(32))
    # The identity of the backup directory it was written to (corral.host.backup_jobs.store_identity): any host
    # reporting the same one (a shared mount) can read it, so a restore need not run where it was made.
    backup_store: Mapped[str | None] = mapped_column(String(64))
    # The last `backup verify`: "ok" or "corrupt" (None: never verified), when, and what was wrong.
    verify_state: Mapped[str | None] = mapped_column(String(16))
    verified_at: Mapped[datetime | None] = mapped_column()
    verify_error: Mapped[str | None] = mapped_column(Text)


class BackupSchedule(Base):
    """A VM's periodic backups and their retention (corral.cluster.backup_schedules). ``next_at`` is when it
    fires next; ``version`` is bumped by every control plane pass that claims the row, so in a pool with several
    control planes exactly one of them fires it (a conditional UPDATE, as job claims are)."""

    __tablename__ = "backup_schedules"
    __table_args__ = (UniqueConstraint("project", "vm_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(String(63), default="default")
    vm_name: Mapped[str] = mapped_column(String(63))
    vm_id: Mapped[str] = mapped_column(String(32))
    every: Mapped[float] = mapped_column(Float)  # seconds between backups
    keep_last: Mapped[int] = mapped_column(Integer, default=0)
    keep_daily: Mapped[int] = mapped_column(Integer, default=0)
    keep_weekly: Mapped[int] = mapped_column(Integer, default=0)
    incremental_every: Mapped[int] = mapped_column(Integer, default=0)  # incrementals after each full (0: all full)
    next_at: Mapped[datetime] = mapped_column()
    last_at: Mapped[datetime | None] = mapped_column()
    last_job_id: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Replica(Base):
    """A VM's disks copied every ``every`` seconds to host ``partner`` (corral.cluster.replication).

    ``bitmap``: the dirty bitmap on the VM's disks that tracks writes since the last copy applied on the partner
    (None: the next copy is full). ``disks`` lists ``{"index", "volume_id", "size"}`` of the last copy. ``state``:
    new (no copy yet), ready, failed (the last copy failed; the replica still holds the one before). ``version``
    is bumped by the control plane pass that claims the row, as backup schedules do."""

    __tablename__ = "replicas"
    __table_args__ = (UniqueConstraint("vm_id"), UniqueConstraint("project", "vm_name"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(String(63), default="default")
    vm_name: Mapped[str] = mapped_column(String(63))
    vm_id: Mapped[str] = mapped_column(String(32))
    partner: Mapped[str] = mapped_column(String(63))
    every: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="new")
    bitmap: Mapped[str | None] = mapped_column(String(63))
    disks: Mapped[list[Any]] = mapped_column(default=list)
    copies: Mapped[int] = mapped_column(Integer, default=0)
    last_at: Mapped[datetime | None] = mapped_column()  # the instant the last applied copy shows
    last_kind: Mapped[str | None] = mapped_column(String(16))  # full or incremental
    last_consistent: Mapped[bool | None] = mapped_column(Boolean)  # guest filesystems frozen for it
    last_bytes: Mapped[int | None] = mapped_column(BigInteger)
    last_seconds: Mapped[float | None] = mapped_column(Float)
    last_job_id: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_at: Mapped[datetime] = mapped_column()
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Template(Base):
    """A read-only base made from a VM's disks; VMs made from it are linked clones (qcow2 overlays)."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("project", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63), default="default")
    state: Mapped[str] = mapped_column(String(16), default="pending")
    host: Mapped[str | None] = mapped_column(String(63))
    source_vm: Mapped[str] = mapped_column(String(63))
    spec: Mapped[dict[str, Any]] = mapped_column()
    disks: Mapped[list[Any]] = mapped_column(default=list)  # [{"path": ..., "size": ...}] relative to the pool
    forkable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Volume(Base):
    __tablename__ = "volumes"
    # One file, one row: no two volumes of a host's pool may name the same file (migration 0010).
    __table_args__ = (
        UniqueConstraint("project", "name"),
        Index("uq_volumes_host_pool_path", "host", "pool", "path", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63), default="default")
    pool: Mapped[str] = mapped_column(String(63), default="default")
    host: Mapped[str | None] = mapped_column(String(63), index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the pool's directory
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, ready, error
    role: Mapped[str] = mapped_column(String(16), default="data")  # root or data
    backing_image: Mapped[str | None] = mapped_column(String(32), ForeignKey("images.id"))
    # A linked clone's disk is an overlay on another file in the pool (a template's or a frozen base);
    # the base stays until no volume names it.
    backing_path: Mapped[str | None] = mapped_column(Text)
    vm_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("vms.id"))
    device_index: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    vm: Mapped[VM | None] = relationship(back_populates="volumes")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_host_state", "host", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    project: Mapped[str] = mapped_column(String(63), default="default")
    target_kind: Mapped[str] = mapped_column(String(16))
    target_name: Mapped[str] = mapped_column(String(63))
    target_id: Mapped[str | None] = mapped_column(String(32))
    host: Mapped[str | None] = mapped_column(String(63))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    log: Mapped[list[Any]] = mapped_column(default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_hint: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class Network(Base):
    """A virtual network: a Linux bridge on every host that has VMs on it, with DHCP/DNS (dnsmasq) and, in NAT
    mode, masquerade and port forwards (nftables). Rows are desired state; agents reconcile bridges to them."""

    __tablename__ = "networks"
    __table_args__ = (UniqueConstraint("project", "name"), UniqueConstraint("vni", name="uq_networks_vni"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63), default="default")
    mode: Mapped[str] = mapped_column(String(16))  # nat, isolated or bridge
    subnet: Mapped[str | None] = mapped_column(String(64))  # CIDR; None for bridge mode (the LAN's own)
    gateway: Mapped[str | None] = mapped_column(String(64))  # the host's address on the bridge
    dhcp: Mapped[bool] = mapped_column(Boolean, default=True)
    uplink: Mapped[str | None] = mapped_column(String(15))  # bridge mode: the existing host bridge to join
    bridge: Mapped[str] = mapped_column(String(15))  # Linux interface name of the bridge
    # In a pool, nat and isolated networks span hosts as one VXLAN segment with this VNI (unique pool-wide).
    vni: Mapped[int | None] = mapped_column(Integer)
    # The guests' MTU (DHCP option 26); None: the default (the underlay's MTU less VXLAN's 50 bytes in a pool).
    mtu: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, ready, error, deleting
    status_message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NetworkPort(Base):
    """One VM NIC on one network: its TAP, MAC and the address corral reserves for it in DHCP, so the address is
    known before the guest boots (port forwards and anti-spoofing rules need it) and stable across restarts."""

    __tablename__ = "network_ports"
    __table_args__ = (
        UniqueConstraint("network_id", "mac"),
        UniqueConstraint("network_id", "ip"),
        UniqueConstraint("vm_id", "nic_index"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    network_id: Mapped[str] = mapped_column(String(32), ForeignKey("networks.id"))
    vm_id: Mapped[str] = mapped_column(String(32), ForeignKey("vms.id"))
    nic_index: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(17))
    ip: Mapped[str | None] = mapped_column(String(64))
    tap: Mapped[str] = mapped_column(String(15))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PortForward(Base):
    """A host port forwarded to a guest port: nftables DNAT on a NAT network, QEMU hostfwd on user-mode NICs."""

    __tablename__ = "port_forwards"
    __table_args__ = (UniqueConstraint("host", "protocol", "host_port"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    vm_id: Mapped[str] = mapped_column(String(32), ForeignKey("vms.id"))
    host: Mapped[str | None] = mapped_column(String(63))
    nic_index: Mapped[int] = mapped_column(Integer, default=0)
    protocol: Mapped[str] = mapped_column(String(3), default="tcp")
    host_port: Mapped[int] = mapped_column(Integer)
    guest_port: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Project(Base):
    """A tenant: it owns VMs, volumes, networks, templates and the images it imports, under its quotas.

    A quota of None means unlimited. The ``default`` project always exists (migration 0007 makes it), because every
    resource made before projects existed already names it.
    """

    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    max_vcpus: Mapped[int | None] = mapped_column(Integer)
    max_memory: Mapped[int | None] = mapped_column(BigInteger)
    max_disk: Mapped[int | None] = mapped_column(BigInteger)
    max_vms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """Someone who holds API tokens. ``cluster_admin`` users' tokens carry their role into every project and
    (with the admin role) manage projects, users and tokens."""

    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    cluster_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    """An API token: the secret is shown once at creation and only its SHA-256 is kept (see corral.api.auth)."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user: Mapped[str] = mapped_column(String(63), ForeignKey("users.name"))
    project: Mapped[str] = mapped_column(String(63), ForeignKey("projects.name"))
    role: Mapped[str] = mapped_column(String(16))  # admin, operator or viewer
    description: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """One change asked of the API: who, what, when, and how it ended (the HTTP status and the error, if any)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(63))
    token_id: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64), default="")  # "unix socket" or the client's address
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(128))  # the route, e.g. "POST /vms/{name}/start"
    status: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(Text, default="")  # "ok" or the problem's detail
    job_id: Mapped[str | None] = mapped_column(String(32))


class Event(Base):
    """A state change or a job step. The id only grows, so a follower resumes with ``id > last seen`` on SQLite
    and on PostgreSQL alike (no LISTEN/NOTIFY needed for correctness, only for promptness)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    type: Mapped[str] = mapped_column(String(64))  # e.g. vm.state, job.progress
    resource_kind: Mapped[str] = mapped_column(String(16))
    resource_name: Mapped[str] = mapped_column(String(63))
    resource_id: Mapped[str | None] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class UsagePoint(Base):
    """One usage figure of a VM or a host over an interval (corral.cluster.usage): raw points as the agent samples
    them (``resolution`` 0), rolled up to 60 s and 600 s averages. Rates are per second over the interval; a VM's
    history follows its id across hosts, ``host`` says where each point was measured."""

    __tablename__ = "usage_points"
    __table_args__ = (
        Index("ix_usage_points_lookup", "kind", "resource_id", "resolution", "at"),
        Index("ix_usage_points_host", "host", "resolution", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))  # vm or host
    resource_id: Mapped[str] = mapped_column(String(63))  # the VM's id, or the host's name
    host: Mapped[str | None] = mapped_column(String(63))
    resolution: Mapped[int] = mapped_column(Integer, default=0)  # 0 (raw), 60 or 600 seconds
    at: Mapped[datetime] = mapped_column()
    samples: Mapped[int] = mapped_column(Integer, default=1)
    cpu: Mapped[float] = mapped_column(Float, default=0.0)  # CPUs busy
    memory: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes
    balloon: Mapped[int | None] = mapped_column(BigInteger)  # bytes the guest may use (the balloon's size)
    disk_read: Mapped[float] = mapped_column(Float, default=0.0)  # bytes per second
    disk_write: Mapped[float] = mapped_column(Float, default=0.0)
    net_rx: Mapped[float] = mapped_column(Float, default=0.0)
    net_tx: Mapped[float] = mapped_column(Float, default=0.0)
    load: Mapped[float | None] = mapped_column(Float)  # hosts: the 1-minute load average


class Plan(Base):
    """A balancing or consolidation plan (corral.cluster.plans): moves an admin approves, run one at a time.

    ``state``: recommended, approved, running, succeeded, failed, cancelled or superseded. ``moves`` lists
    ``{"vm", "vm_id", "project", "from", "to", "state", "job", "reason"}``; ``summary`` holds the scores, hosts
    freed by the heuristic and by the solver, and the gap. ``signature`` fingerprints the pool the plan was made
    from, so a plan whose pool changed is re-validated (or superseded) before it runs."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))  # balance or consolidate
    state: Mapped[str] = mapped_column(String(16), default="recommended")
    signature: Mapped[str] = mapped_column(String(64), default="")
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    moves: Mapped[list[Any]] = mapped_column(default=list)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
