"""Job parameters: one typed model per job kind, shared by the control plane that writes a job and the agent that
runs it, so the two sides cannot drift apart on a key's name or type.

A job's parameters are stored as JSON in its row (``jobs.params``). The writer is strict: ``corral.store.jobs``
validates what it is given against the kind's model and refuses unknown keys, so a malformed job is never queued.
The reader is tolerant: rows written by an older release may carry keys that no model knows any more, and they
still parse (``extra="ignore"``). Field names are the stored keys; the two that are Python keywords (``from``)
have an alias. Optional fields default to what a missing key meant before the models existed.

Some fields are written by the job's own handler while it runs (``publish``), for the other half of a two-host
job to read: a move's endpoint, a replication copy's mode. They default to None ("not published yet").
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.errors import CorralError
from corral.spec.job import JobKind

# A source as corral.spec.sources.Source.params() writes it; a plain string is a path queued by an older release.
SourceParams = dict[str, str]


class JobParamsError(CorralError):
    """A job's parameters do not match its kind's model: a bug in the writer, so never queued."""

    code = "invalid-job-params"
    http_status = 500


class JobParams(BaseModel):
    """The base of every kind's parameters: tolerant of keys an older release wrote (see the module's docstring)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


P = TypeVar("P", bound=JobParams)


class NoParams(JobParams):
    """Kinds whose job needs nothing beyond its target."""


# -- VMs -------------------------------------------------------------------------------------------------------


class VMCreateParams(JobParams):
    start: bool = False
    wait: bool = False
    ready_timeout: float | None = None


class VMStartParams(JobParams):
    wait: bool = False
    ready_timeout: float | None = None


class VMStopParams(JobParams):
    force: bool = False
    timeout: float | None = None


class VMRestartParams(VMStopParams):
    wait: bool = False


class VMDeleteParams(JobParams):
    keep_disks: bool = False
    force: bool = False  # checked by the control plane; kept so a resubmitted delete carries it


class VMExecParams(JobParams):
    argv: list[str] = Field(min_length=1)
    timeout: float = 60
    stdin: str | None = None


# -- images and volumes ----------------------------------------------------------------------------------------


class ImageBuildParams(JobParams):
    recipe: str = "tiny"
    release: str | None = None  # the debian recipe's; the control plane always sets it for debian
    packages: list[str] = Field(default_factory=list)
    size: int | None = None


class ImageImportParams(JobParams):
    source: SourceParams | str | None = None
    file: SourceParams | str | None = None  # queued by an older release: the local admin's path
    format: str | None = None
    cmdline: str | None = None
    cloud_init: bool = False
    firmware: str | None = None
    kernel: SourceParams | str | None = None
    initrd: SourceParams | str | None = None


class VolumeResizeParams(JobParams):
    size: int


# -- snapshots, clones, forks, templates -----------------------------------------------------------------------


class SnapshotParams(JobParams):
    """A snapshot's create or delete: the row the control plane made and its name (for messages)."""

    snapshot_id: str
    name: str


class SnapshotRevertParams(SnapshotParams):
    wait: bool = False


class VMCloneParams(JobParams):
    source_id: str
    linked: bool = False
    snapshot_tag: str | None = None
    start: bool = False
    wait: bool = False


class VMForkParams(JobParams):
    child_ids: list[str]
    names: list[str] = Field(default_factory=list)
    wait: bool = True
    keep_addresses: bool = False


class TemplateCreateParams(JobParams):
    source_id: str


# -- networks and resizes --------------------------------------------------------------------------------------


class NicParams(JobParams):
    """A NIC's hot-plug or unplug: its slot in the VM's spec."""

    slot: int


class ForwardRemoval(JobParams):
    """A port forward being removed: its row is gone by the time the job runs, so the job carries it."""

    host_port: int
    guest_port: int
    protocol: str
    nic_index: int


class PortForwardParams(JobParams):
    add: str | None = None  # the new forward's row id
    remove: ForwardRemoval | None = None


class VMResizeParams(JobParams):
    # VM specs as stored in the VM's row (corral.spec.vm.VMSpec, dumped): validated by the reader as before, so an
    # older row's spec is read exactly as it was.
    old: dict[str, Any]
    new: dict[str, Any]


class DiskAddParams(JobParams):
    volume_id: str
    volume: str | None = None  # its name, for messages
    created: bool = False


class DiskRemoveParams(JobParams):
    volume_id: str
    volume: str | None = None


# -- moves -----------------------------------------------------------------------------------------------------


class MoveParams(JobParams):
    """What either half of a move is read for by a restarted agent's sweep (corral.host.move_jobs.reclaim_moved)."""

    with_storage: bool = False


class MoveEndsParams(MoveParams):
    """Both halves name the two hosts."""

    source_host: str = Field(alias="from")
    to: str


class MigrateParams(MoveEndsParams):
    """The source's half of a move."""

    dest_job: str
    after: str | None = None  # the move to wait for first (a drain moves one VM at a time)


class MigrateInParams(MoveEndsParams):
    """The destination's half; ``source_job`` is added once the source's job exists."""

    source_job: str | None = None
    # Published while it runs (corral.host.move_jobs):
    endpoint: dict[str, Any] | None = None
    running: bool = False
    resumed_at: float | None = None


class DrainMove(JobParams):
    vm: str
    to: str
    job: str
    with_storage: bool = False


class DrainLeftover(JobParams):
    """A VM a drain could not move (``reason``) or moved by its rows alone (``to``)."""

    vm: str
    to: str | None = None
    reason: str | None = None


class HostDrainParams(JobParams):
    vms: list[DrainMove] = Field(default_factory=list)
    not_moved: list[DrainLeftover] = Field(default_factory=list)
    moved_stopped: list[DrainLeftover] = Field(default_factory=list)


# -- backups, exports, imports ---------------------------------------------------------------------------------


class BackupParams(JobParams):
    """A backup's create: its row and its name."""

    backup_id: str
    name: str


class BackupRestoreParams(BackupParams):
    mode: Literal["over", "new"] = "new"


class BackupOfVMParams(JobParams):
    """A backup's delete or verify: the VM's name, for messages."""

    vm: str | None = None


class VMExportParams(JobParams):
    file: str
    compress: bool = False
    download: str | None = None  # a remote caller's export: the id it downloads it by
    format: str | None = None


class VMImportParams(JobParams):
    """A corral archive (``manifest`` is its export manifest), or with ``foreign`` an OVA or a libvirt domain
    (corral.cluster.appliances; ``manifest`` is then the OVA's checksums)."""

    source: SourceParams | None = None
    file: str | None = None  # queued by an older release: the local admin's path
    manifest: dict[str, Any] | None = None
    foreign: str | None = None
    image_id: str | None = None
    disks: list[dict[str, Any]] = Field(default_factory=list)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    warnings: list[str] = Field(default_factory=list)


# -- replication -----------------------------------------------------------------------------------------------


class ReplicaCopyParams(JobParams):
    """What both halves of a replication copy share: the replica, the VM's disks, the VM's host."""

    replica_id: str
    disks: list[dict[str, Any]]
    source: str


class ReplicateParams(ReplicaCopyParams):
    """The VM's host's half."""

    receive_job: str
    partner: str
    bitmap: str | None = None
    # Published while it runs (corral.host.replication_jobs):
    mode: str | None = None
    copied: dict[str, Any] | None = None


class ReplicaReceiveParams(ReplicaCopyParams):
    """The partner's half; ``source_job`` is added once the VM's host's job exists."""

    source_job: str | None = None
    # Published while it runs:
    have: dict[str, int | None] | None = None
    endpoint: dict[str, Any] | None = None
    applied: bool | None = None


class ReplicaRemoveParams(JobParams):
    """A replica's files on its partner (``replica_id``, ``pools``), or a failed-over VM's stale disks on the host
    it left (``stale_volumes``)."""

    replica_id: str | None = None
    pools: list[str] | None = None
    stale_volumes: list[dict[str, Any]] | None = None


class FailoverParams(JobParams):
    replica_id: str
    disks: list[dict[str, Any]]
    source_host: str | None = Field(default=None, alias="from")
    previous: dict[str, Any] | None = None  # what a failed failover puts back (corral.cluster.replication)


PARAMS: dict[JobKind, type[JobParams]] = {
    JobKind.VM_CREATE: VMCreateParams,
    JobKind.VM_START: VMStartParams,
    JobKind.VM_STOP: VMStopParams,
    JobKind.VM_RESTART: VMRestartParams,
    JobKind.VM_PAUSE: NoParams,
    JobKind.VM_RESUME: NoParams,
    JobKind.VM_DELETE: VMDeleteParams,
    JobKind.VM_EXEC: VMExecParams,
    JobKind.IMAGE_BUILD: ImageBuildParams,
    JobKind.IMAGE_IMPORT: ImageImportParams,
    JobKind.IMAGE_DELETE: NoParams,
    JobKind.VOLUME_CREATE: NoParams,
    JobKind.VOLUME_RESIZE: VolumeResizeParams,
    JobKind.VOLUME_DELETE: NoParams,
    JobKind.SNAPSHOT_CREATE: SnapshotParams,
    JobKind.SNAPSHOT_REVERT: SnapshotRevertParams,
    JobKind.SNAPSHOT_DELETE: SnapshotParams,
    JobKind.VM_CLONE: VMCloneParams,
    JobKind.VM_FORK: VMForkParams,
    JobKind.TEMPLATE_CREATE: TemplateCreateParams,
    JobKind.TEMPLATE_DELETE: NoParams,
    JobKind.NETWORK_CREATE: NoParams,
    JobKind.NETWORK_DELETE: NoParams,
    JobKind.VM_NIC_ADD: NicParams,
    JobKind.VM_NIC_REMOVE: NicParams,
    JobKind.VM_PORT_FORWARD: PortForwardParams,
    JobKind.VM_RESIZE: VMResizeParams,
    JobKind.VM_DISK_ADD: DiskAddParams,
    JobKind.VM_DISK_REMOVE: DiskRemoveParams,
    JobKind.VM_MIGRATE: MigrateParams,
    JobKind.VM_MIGRATE_IN: MigrateInParams,
    JobKind.HOST_DRAIN: HostDrainParams,
    JobKind.BACKUP_CREATE: BackupParams,
    JobKind.BACKUP_DELETE: BackupOfVMParams,
    JobKind.BACKUP_RESTORE: BackupRestoreParams,
    JobKind.BACKUP_VERIFY: BackupOfVMParams,
    JobKind.VM_REPLICATE: ReplicateParams,
    JobKind.VM_REPLICA_RECEIVE: ReplicaReceiveParams,
    JobKind.VM_REPLICA_REMOVE: ReplicaRemoveParams,
    JobKind.VM_FAILOVER: FailoverParams,
    JobKind.VM_EXPORT: VMExportParams,
    JobKind.VM_IMPORT: VMImportParams,
}


def model_for(kind: str) -> type[JobParams]:
    try:
        return PARAMS[JobKind(kind)]
    except (ValueError, KeyError):
        raise JobParamsError(f"no parameter model for job kind {kind!r}", "add one to corral.spec.job_params") from None


def dump(params: JobParams) -> dict[str, Any]:
    """What goes into the row: the keys the writer set (defaults are the reader's business, so a row holds what it
    held before the models existed), under their stored names."""
    return params.model_dump(mode="json", by_alias=True, exclude_unset=True)


def validated(kind: str, params: JobParams | dict[str, Any] | None) -> dict[str, Any]:
    """The writer's check: ``params`` as the row stores them, or JobParamsError naming what is wrong. A dict may not
    carry keys the kind's model does not know: a misspelt key would otherwise be dropped without a word."""
    model = model_for(kind)
    if isinstance(params, JobParams):
        if type(params) is not model:
            raise JobParamsError(f"a {kind} job takes {model.__name__}, not {type(params).__name__}")
        raw = dump(params)  # validated again: a field assigned after construction was not
    else:
        raw = dict(params or {})
        _refuse_unknown(kind, model, raw)
    try:
        return dump(model.model_validate(raw))
    except ValidationError as exc:
        raise JobParamsError(f"bad parameters for a {kind} job: {_first_problem(exc)}") from None


def parse(model: type[P], params: dict[str, Any] | None) -> P:
    """The reader's side: a stored row's parameters as ``model`` (extra keys from older releases are ignored)."""
    try:
        return model.model_validate(params or {})
    except ValidationError as exc:
        raise JobParamsError(f"the job's parameters do not parse as {model.__name__}: {_first_problem(exc)}") from None


def _refuse_unknown(kind: str, model: type[JobParams], values: dict[str, Any]) -> None:
    known = {field.alias or name for name, field in model.model_fields.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise JobParamsError(
            f"a {kind} job has no parameter {', '.join(map(repr, unknown))}",
            f"{model.__name__} takes: {', '.join(sorted(known)) or 'nothing'}",
        )


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "parameters"
    return f"{where}: {error['msg']}"


def merged(kind: str, stored: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A running job's parameters with ``values`` added (what one half of a two-host job publishes for the
    other): the new keys are checked as ``validated`` checks a new job's; keys already stored stay as they are."""
    model = model_for(kind)
    _refuse_unknown(kind, model, values)
    try:
        checked = model.model_validate({**stored, **values})
    except ValidationError as exc:
        raise JobParamsError(f"bad parameters for a {kind} job: {_first_problem(exc)}") from None
    return {**stored, **dump(checked)}
