"""VM and volume rows that several control-plane verbs share: finding a VM, refusing a busy one, writing a new
VM's row or a disk's, the checks every new VM or disk passes.

Here rather than in corral.cluster.vms because the verbs that make VMs other ways (clones, templates, forks,
restores, disk resize) need them too, and vms itself hands template creation to corral.cluster.clones: with
these in one module below both, neither imports the other in a cycle.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.cluster import networks, placement, quotas
from corral.errors import AlreadyExists, Conflict, InsufficientResources, InvalidInput, NotFound
from corral.spec.names import validate_name
from corral.spec.sizes import format_size
from corral.spec.vm import NicSpec, PowerState, VMSpec
from corral.store import jobs
from corral.store.models import VM, Host, Image, Volume, new_id, volume_file


def get_vm(session: Session, name: str, project: str = "default") -> VM:
    vm = session.scalars(select(VM).where(VM.project == project, VM.name == name)).first()
    if vm is None:
        raise NotFound(f"VM {name!r} not found", "list VMs with `corral vm list`")
    return vm


def ensure_idle(session: Session, vm: VM, allow: tuple[str, ...] = ()) -> None:
    for job in jobs.active_for(session, "vm", vm.id):
        if job.kind not in allow:
            raise Conflict(
                f"VM {vm.name} is busy with {job.kind} (job {job.id[:12]})",
                f"wait for it: `corral job wait {job.id[:12]}`",
            )


def check_ha(session: Session, spec: VMSpec) -> None:
    """HA needs leases, which only a pool on PostgreSQL has (docs/ha.md): on a single SQLite host it is refused."""
    if spec.ha and session.get_bind().dialect.name != "postgresql":
        raise InvalidInput(
            "HA needs a pool of hosts on PostgreSQL; this is a single host on SQLite",
            "leave out --ha, or run the VM in a pool (docs/cluster.md, docs/ha.md)",
        )


def check_pool_space(session: Session, size: int, what: str, host: str | None = None) -> None:
    """A disk cannot be larger than the storage pool it goes to: ``host``'s, or before placement the largest any
    host has. The sizes are the inventories the agents report (corral.host.inventory), so the check holds in a
    pool of hosts too, where the control plane has no storage pool of its own; a host that has not reported yet
    (0) does not count."""
    query = select(func.max(Host.storage_total))
    if host is not None:
        query = query.where(Host.name == host)
    total = session.scalar(query) or 0
    if total and size > total:
        raise InsufficientResources(
            f"{what} of {format_size(size)} is larger than the storage pool ({format_size(total)})",
            "ask for a smaller disk",
        )


def host_of(session: Session, host_name: str | None) -> Host:
    """The row of a VM's host, refused when that host is not registered (its agent never started)."""
    host = session.scalars(select(Host).where(Host.name == host_name)).first()
    if host is None:
        raise Conflict(f"the VM's host {host_name!r} is not registered", "start its agent")
    return host


def free_volume_name(session: Session, project: str, wanted: str) -> str:
    name, suffix = wanted, 1
    while session.scalars(select(Volume.id).where(Volume.project == project, Volume.name == name)).first():
        suffix += 1
        name = f"{wanted}-{suffix}"
    return name


def new_volume(
    session: Session,
    vm: VM,
    name: str,
    size: int,
    index: int,
    role: str = "data",
    *,
    pool: str = "default",
    backing_image: str | None = None,
    backing_path: str | None = None,
) -> Volume:
    """A disk row for ``vm`` (its file is made by the agent's job), refused if the name is taken.

    The file is named by the volume's id, not its name: names are unique only per project, files per pool."""
    if session.scalars(select(Volume.id).where(Volume.project == vm.project, Volume.name == name)).first():
        raise AlreadyExists(f"volume {name!r} already exists", "delete it or choose another VM name")
    volume_id = new_id()
    volume = Volume(
        id=volume_id,
        name=name,
        project=vm.project,
        pool=pool,
        host=vm.host,
        path=volume_file(volume_id),
        size=size,
        role=role,
        backing_image=backing_image,
        backing_path=backing_path,
        vm_id=vm.id,
        device_index=index,
    )
    session.add(volume)
    return volume


def new_vm(session: Session, spec: VMSpec, host: str | None, project: str, start: bool) -> VM:
    validate_name(spec.name, "VM name")
    if session.scalars(select(VM.id).where(VM.project == project, VM.name == spec.name)).first():
        raise AlreadyExists(f"VM {spec.name!r} already exists", "choose another name")
    host_row = session.scalars(select(Host).where(Host.name == host)).first()
    if host_row is None:
        raise Conflict(f"host {host} is not registered", "start its agent")
    if start:
        placement.check_fits(session, host_row, spec)
    else:
        placement.check_hard_limits(host_row, spec)
    vm = VM(
        name=spec.name,
        project=project,
        spec=spec.model_dump(mode="json"),
        host=host,
        desired_state=PowerState.RUNNING if start else PowerState.STOPPED,
        status_message="creating",
    )
    session.add(vm)
    session.flush()
    networks.attach_nics(session, vm, spec)
    return vm


def volume_name(vm_name: str, index: int) -> str:
    return f"{vm_name}-root" if index == 0 else f"{vm_name}-disk{index}"


def fresh_identity(spec: VMSpec, name: str) -> VMSpec:
    """A clone is a new machine: its own name (hostname) and MACs; the machine id follows from the new VM id."""
    nics = [NicSpec(network=nic.network, slot=spec.nic_slot(position)) for position, nic in enumerate(spec.nics)]
    return spec.model_copy(update={"name": name, "nics": nics}).with_macs()


def new_vm_with_disks(session: Session, spec: VMSpec, host: str, project: str, sizes: list[int], image: Image) -> VM:
    """A new stopped VM with pending volumes of ``sizes``, quotas checked: for restores and imports (of corral's
    own exports, OVAs, libvirt domains), whose disks the agent then fills from the source."""
    quotas.check(session, project, vcpus=spec.cpus, memory=spec.memory, disk=sum(sizes), vms=1)
    vm = new_vm(session, spec, host, project, start=False)
    for index, size in enumerate(sizes):
        # The disks will be standalone copies; naming the image keeps it (and its kernel) from being deleted.
        new_volume(
            session,
            vm,
            volume_name(spec.name, index),
            size,
            index,
            "root" if index == 0 else "data",
            backing_image=image.id if index == 0 else None,
        )
    return vm
