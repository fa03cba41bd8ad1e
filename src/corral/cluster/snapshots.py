"""Snapshot verbs of the control plane: the tree (parent, current) is kept here; the data is on the host."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster.vm_rows import ensure_idle, get_vm
from corral.errors import AlreadyExists, Conflict, NotFound
from corral.spec.job import JobKind
from corral.spec.job_params import SnapshotParams, SnapshotRevertParams
from corral.spec.names import validate_name
from corral.spec.vm import PowerState
from corral.store import jobs
from corral.store.models import VM, Job, Snapshot, new_id


def get_snapshot(session: Session, vm: VM, name: str) -> Snapshot:
    snapshot = session.scalars(select(Snapshot).where(Snapshot.vm_id == vm.id, Snapshot.name == name)).first()
    if snapshot is None:
        raise NotFound(f"VM {vm.name} has no snapshot {name!r}", f"list them with `corral snapshot list {vm.name}`")
    return snapshot


def list_snapshots(session: Session, vm: VM) -> list[Snapshot]:
    return list(session.scalars(select(Snapshot).where(Snapshot.vm_id == vm.id).order_by(Snapshot.created_at)))


def _live(vm: VM) -> bool:
    return vm.observed_state in (PowerState.RUNNING, PowerState.PAUSED)


def create(
    session: Session,
    vm_name: str,
    name: str,
    memory: bool | None = None,
    description: str = "",
    project: str = "default",
) -> Job:
    """``memory=None`` means: with memory when the VM runs, disk-only when it is stopped."""
    validate_name(name, "snapshot name")
    vm = get_vm(session, vm_name, project)
    ensure_idle(session, vm)
    if session.scalars(select(Snapshot.id).where(Snapshot.vm_id == vm.id, Snapshot.name == name)).first():
        raise AlreadyExists(f"VM {vm_name} already has a snapshot {name!r}", "choose another name")
    if vm.observed_state not in (PowerState.RUNNING, PowerState.PAUSED, PowerState.STOPPED, PowerState.CRASHED):
        raise Conflict(f"VM {vm_name} is {vm.observed_state}", "wait until it is running or stopped")
    with_memory = _live(vm) if memory is None else memory
    if with_memory and not _live(vm):
        raise Conflict(
            f"VM {vm_name} is not running, so there is no memory to save",
            "start it first, or take a --disk-only snapshot",
        )
    if len(description) > 1000:
        raise Conflict("the description is too long", "keep it under 1000 characters")
    snapshot_id = new_id()
    snapshot = Snapshot(
        id=snapshot_id,
        name=name,
        vm_id=vm.id,
        parent_id=vm.current_snapshot,
        memory=with_memory,
        description=description,
        tag=f"corral-{snapshot_id[:16]}",
    )
    session.add(snapshot)
    session.flush()
    return jobs.submit(
        session,
        JobKind.SNAPSHOT_CREATE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=SnapshotParams(snapshot_id=snapshot.id, name=name),
    )


def revert(session: Session, vm_name: str, name: str, wait: bool = False, project: str = "default") -> Job:
    vm = get_vm(session, vm_name, project)
    snapshot = get_snapshot(session, vm, name)
    ensure_idle(session, vm)
    if snapshot.state != "ready":
        raise Conflict(f"snapshot {name} is {snapshot.state}", "wait for it to be ready")
    return jobs.submit(
        session,
        JobKind.SNAPSHOT_REVERT,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=SnapshotRevertParams(snapshot_id=snapshot.id, name=name, wait=wait),
    )


def delete(session: Session, vm_name: str, name: str, project: str = "default") -> Job:
    vm = get_vm(session, vm_name, project)
    snapshot = get_snapshot(session, vm, name)
    ensure_idle(session, vm)
    return jobs.submit(
        session,
        JobKind.SNAPSHOT_DELETE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=SnapshotParams(snapshot_id=snapshot.id, name=name),
    )
