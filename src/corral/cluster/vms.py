"""VM verbs of the control plane: check the request against the store, write desired state and a job."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import clones, networks, placement, quotas, replication
from corral.cluster.images import find_image
from corral.cluster.requests import VMCreate, VMDelete, VMExec, VMRestart, VMStart, VMStop
from corral.cluster.vm_rows import (
    check_ha,
    check_pool_space,
    ensure_idle,
    free_volume_name,
    get_vm,
    host_of,
    new_volume,
)
from corral.errors import AlreadyExists, Conflict, NotFound
from corral.spec.job import JobKind
from corral.spec.job_params import (
    VMCreateParams,
    VMDeleteParams,
    VMExecParams,
    VMRestartParams,
    VMStartParams,
    VMStopParams,
)
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs
from corral.store.models import VM, Job, Volume


def list_vms(session: Session, project: str = "default") -> list[VM]:
    return list(session.scalars(select(VM).where(VM.project == project).order_by(VM.name)))


def create(session: Session, request: VMCreate, project: str = "default") -> Job:
    """Validate everything, then write the VM, its volume rows and one job in a single transaction."""
    spec = request.spec.with_macs()
    check_ha(session, spec)
    if session.scalars(select(VM.id).where(VM.project == project, VM.name == spec.name)).first():
        raise AlreadyExists(f"VM {spec.name!r} already exists", "choose another name or delete it first")
    if request.template is not None:
        return clones.create_from_template(session, request.template, spec, request.start, request.wait, project)
    image = find_image(session, spec.image, project)  # the project's own first, then the default catalog
    if image is None:
        raise NotFound(
            f"image {spec.image!r} not found", "build the default one with `corral image build tiny`, or import one"
        )
    if image.state != "ready":
        raise Conflict(f"image {spec.image!r} is {image.state}", "wait for its job to finish")
    for disk in spec.disks:
        if disk.size is not None:
            check_pool_space(session, disk.size, "a disk")
    attached = []
    for volume_name in request.volumes + [d.volume for d in spec.disks if d.volume]:
        volume = session.scalars(select(Volume).where(Volume.project == project, Volume.name == volume_name)).first()
        if volume is None:
            raise NotFound(f"volume {volume_name!r} not found", "list volumes with `corral volume list`")
        if volume.vm_id is not None or volume.state != "ready":
            raise Conflict(f"volume {volume_name!r} is in use or not ready", "pick a free volume")
        attached.append(volume)
    new_disk = image.virtual_size + sum(disk.size for disk in spec.disks if disk.size is not None)
    with placement.placement_lock:
        quotas.check(session, project, vcpus=spec.cpus, memory=spec.memory, disk=new_disk, vms=1)
        host = placement.pick_host(
            session,
            spec,
            request.host,
            will_run=request.start,
            project=project,
            group=request.group,
            policy=request.policy,
            accel=request.accel,
            attached=attached,
            storage=image.virtual_size + sum(disk.size for disk in spec.disks if disk.size is not None),
        )
        vm = VM(
            name=spec.name,
            project=project,
            spec=spec.model_dump(mode="json"),
            host=host.name,
            desired_state=PowerState.RUNNING if request.start else PowerState.STOPPED,
            observed_state=PowerState.STOPPED,
            status_message="creating",
            placement_group=request.group,
            placement_policy=placement.group_policy(session, project, request.group, request.policy),
        )
        session.add(vm)
        session.flush()
        networks.attach_nics(session, vm, spec)
        index = 0
        new_volume(session, vm, f"{spec.name}-root", image.virtual_size, index, role="root", backing_image=image.id)
        for disk in spec.disks:
            if disk.size is not None:
                index += 1
                new_volume(
                    session, vm, free_volume_name(session, project, f"{spec.name}-disk{index}"), disk.size, index
                )
        for volume in attached:
            index += 1
            volume.vm_id = vm.id
            volume.device_index = index
        job = jobs.submit(
            session,
            JobKind.VM_CREATE,
            "vm",
            vm.name,
            target_id=vm.id,
            host=host.name,
            project=project,
            params=VMCreateParams(start=request.start, wait=request.wait, ready_timeout=request.ready_timeout),
        )
    return job


def start(session: Session, name: str, request: VMStart, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    ensure_idle(session, vm)
    with placement.placement_lock:
        if vm.desired_state == PowerState.STOPPED or vm.observed_state in (PowerState.STOPPED, PowerState.CRASHED):
            host = host_of(session, vm.host)
            placement.check_fits(session, host, VMSpec.model_validate(vm.spec), exclude_vm=vm.id)
        vm.desired_state = PowerState.RUNNING
        return jobs.submit(
            session,
            JobKind.VM_START,
            "vm",
            vm.name,
            target_id=vm.id,
            host=vm.host,
            project=project,
            params=VMStartParams.model_validate(request.model_dump()),
        )


def stop(session: Session, name: str, request: VMStop, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    # A stop may overtake a running start or exec: that is how a hung boot is ended.
    ensure_idle(session, vm, allow=(JobKind.VM_START, JobKind.VM_EXEC, JobKind.VM_STOP, JobKind.VM_CREATE))
    return jobs.submit(
        session,
        JobKind.VM_STOP,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=VMStopParams.model_validate(request.model_dump()),
    )


def restart(session: Session, name: str, request: VMRestart, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    ensure_idle(session, vm)
    return jobs.submit(
        session,
        JobKind.VM_RESTART,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=VMRestartParams.model_validate(request.model_dump()),
    )


def pause(session: Session, name: str, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    ensure_idle(session, vm, allow=(JobKind.VM_EXEC,))
    if vm.observed_state not in (PowerState.RUNNING, PowerState.PAUSED):
        raise Conflict(f"VM {name} is {vm.observed_state}, not running", f"start it with `corral vm start {name}`")
    return jobs.submit(session, JobKind.VM_PAUSE, "vm", vm.name, target_id=vm.id, host=vm.host, project=project)


def resume(session: Session, name: str, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    ensure_idle(session, vm, allow=(JobKind.VM_EXEC,))
    if vm.observed_state not in (PowerState.RUNNING, PowerState.PAUSED):
        raise Conflict(f"VM {name} is {vm.observed_state}, not paused", f"start it with `corral vm start {name}`")
    return jobs.submit(session, JobKind.VM_RESUME, "vm", vm.name, target_id=vm.id, host=vm.host, project=project)


def delete(session: Session, name: str, request: VMDelete, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    ensure_idle(session, vm, allow=(JobKind.VM_EXEC,))
    if vm.observed_state not in (PowerState.STOPPED, PowerState.CRASHED) and not request.force:
        raise Conflict(
            f"VM {name} is {vm.observed_state}", f"stop it first or pass --force: `corral vm delete {name} --force`"
        )
    vm.desired_state = PowerState.STOPPED
    replication.drop_for_vm(session, vm)  # its replica's files go on the partner
    return jobs.submit(
        session,
        JobKind.VM_DELETE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=VMDeleteParams.model_validate(request.model_dump()),
    )


def exec_(session: Session, name: str, request: VMExec, project: str = "default") -> Job:
    vm = get_vm(session, name, project)
    if vm.observed_state not in (PowerState.RUNNING, PowerState.STARTING) and vm.desired_state != PowerState.RUNNING:
        raise Conflict(f"VM {name} is {vm.observed_state}", f"start it with `corral vm start {name}`")
    return jobs.submit(
        session,
        JobKind.VM_EXEC,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=VMExecParams.model_validate(request.model_dump()),
    )
