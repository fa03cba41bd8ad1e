"""Resizing VMs while they run: memory, CPUs and CPU limits (`vm set`), and disks (`vm disk add|remove`).

The control plane checks everything a change needs before it writes anything: the new spec must validate
(memory within max_memory, CPUs within max_cpus), growth must fit the host under its overcommit ratios and the
project's quotas. Then the new spec is written at once (it is the desired state, so the next start uses it,
and shrinking frees allocation immediately) and a job applies what it can to the running QEMU
(host/resize_jobs.py). See docs/resize.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import placement, quotas
from corral.cluster.vm_rows import (
    check_ha,
    check_pool_space,
    ensure_idle,
    free_volume_name,
    get_vm,
    host_of,
    new_volume,
)
from corral.cluster.volumes import get_volume
from corral.errors import Conflict, InvalidInput, NotFound
from corral.spec.job import JobKind
from corral.spec.job_params import DiskAddParams, DiskRemoveParams, VMResizeParams
from corral.spec.names import validate_name
from corral.spec.sizes import format_size
from corral.spec.vm import MAX_DISKS, MIN_FLOOR, PowerState, Size, VMSpec
from corral.store import jobs
from corral.store.models import VM, Job, Volume

_RUNNING = (PowerState.RUNNING, PowerState.PAUSED, PowerState.STARTING)


class VMResize(BaseModel):
    """`vm set`: what to change; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    memory: Size | None = None
    cpus: int | None = None
    cpu_limit: float | None = Field(default=None, gt=0)
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)
    max_memory: Size | None = None
    max_cpus: int | None = None
    # HA (docs/ha.md): takes effect at once, for the next time the VM's host dies.
    ha: bool | None = None
    ha_priority: int | None = Field(default=None, ge=-1000, le=1000)
    # The floor automatic ballooning keeps (docs/optimization.md): stored on the VM, not in its spec.
    min_memory: Size | None = None

    @model_validator(mode="after")
    def _something(self) -> VMResize:
        if all(value is None for value in self.model_dump().values()):
            raise InvalidInput(
                "nothing to change",
                "pass --memory, --cpus, --cpu-limit, --cpu-weight, --max-memory, --max-cpus, --min-memory "
                "or --ha/--no-ha",
            )
        return self


class DiskAdd(BaseModel):
    """`vm disk add`: a new blank volume of ``size``, or an existing free volume by name."""

    model_config = ConfigDict(extra="forbid")

    size: Size | None = None
    volume: str | None = None

    @field_validator("volume")
    @classmethod
    def _volume(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "volume name")

    @model_validator(mode="after")
    def _one_source(self) -> DiskAdd:
        if (self.size is None) == (self.volume is None):
            raise InvalidInput("a disk needs either a size or an existing volume", "pass --size 2G or --volume NAME")
        return self


def resized_spec(spec: VMSpec, request: VMResize) -> VMSpec:
    """The spec after ``request``, validated (raises InvalidInput naming the limit that is broken).

    A VM created without ceilings gets one when it shrinks: its current size becomes max_memory / max_cpus, so
    it can grow back live to where it was. Growing past a ceiling the user set is refused; growing a VM that has
    none is allowed and takes effect at the next start (the running QEMU has no room for it)."""
    update: dict[str, Any] = {
        key: value for key, value in request.model_dump(exclude={"min_memory"}).items() if value is not None
    }
    if (
        request.memory is not None
        and request.max_memory is None
        and spec.max_memory is None
        and request.memory < spec.memory
    ):
        update["max_memory"] = spec.memory
    if request.cpus is not None and request.max_cpus is None and spec.max_cpus is None and request.cpus < spec.cpus:
        update["max_cpus"] = spec.cpus
    return VMSpec.model_validate({**spec.model_dump(mode="json"), **update})


def _check_floor(vm: VM, new: VMSpec, request: VMResize) -> None:
    """`--min-memory` within [MIN_FLOOR, memory]; a shrink under a floor the user set is refused, not clamped.
    Stores the new floor on the row (the caller's transaction commits it with the spec)."""
    floor = request.min_memory if request.min_memory is not None else vm.min_memory
    if floor is None:
        return
    if floor < MIN_FLOOR:
        raise InvalidInput(
            f"--min-memory {format_size(floor)} is below the least floor, {format_size(MIN_FLOOR)}",
            f"give at least {format_size(MIN_FLOOR)}, e.g. --min-memory 128M",
        )
    if floor > new.memory:
        which = "--min-memory" if request.min_memory is not None else f"VM {vm.name}'s floor"
        raise InvalidInput(
            f"{which} {format_size(floor)} is above the VM's memory, {format_size(new.memory)}",
            "give a floor at most its memory"
            + ("" if request.min_memory is not None else f" (`--min-memory {format_size(new.memory)}` with it)"),
        )
    vm.min_memory = floor


def _meant_to_run(vm: VM) -> bool:
    return vm.desired_state in _RUNNING or vm.observed_state in _RUNNING


def resize(session: Session, name: str, request: VMResize, project: str = "default") -> Job | None:
    """Validate, check capacity and quotas for growth, write the new spec, and queue the live change. A change
    of the floor alone (`--min-memory`) is only a row to write: no job (None)."""
    vm = get_vm(session, name, project)
    ensure_idle(session, vm)
    old = VMSpec.model_validate(vm.spec)
    new = resized_spec(old, request)
    check_ha(session, new)
    _check_floor(vm, new, request)
    if new == old and request.min_memory is not None:
        return None
    grow_cpus, grow_memory = max(0, new.cpus - old.cpus), max(0, new.memory - old.memory)
    with placement.placement_lock:
        if grow_cpus or grow_memory:
            quotas.check(session, project, vcpus=grow_cpus, memory=grow_memory)
            if _meant_to_run(vm):
                host = host_of(session, vm.host)
                placement.check_fits(session, host, new, exclude_vm=vm.id)
        vm.spec = new.model_dump(mode="json")
        params = VMResizeParams(old=old.model_dump(mode="json"), new=vm.spec)
        return jobs.submit(
            session, JobKind.VM_RESIZE, "vm", vm.name, target_id=vm.id, host=vm.host, project=project, params=params
        )


def _free_index(vm: VM) -> int:
    taken = {volume.device_index for volume in vm.volumes}
    for index in range(1, MAX_DISKS + 1):
        if index not in taken:
            return index
    raise Conflict(
        f"VM {vm.name} already has {MAX_DISKS} data disks",
        f"remove one first: `corral vm disk remove {vm.name} VOLUME`",
    )


def disk_add(session: Session, name: str, request: DiskAdd, project: str = "default") -> Job:
    """Attach a new or existing volume to a VM at the lowest free device index (its hotplug port for life)."""
    vm = get_vm(session, name, project)
    ensure_idle(session, vm)
    index = _free_index(vm)
    if request.volume is not None:
        volume = get_volume(session, request.volume, project)
        if volume.vm_id is not None:
            owner = session.get(VM, volume.vm_id)
            raise Conflict(
                f"volume {volume.name} is in use by VM {owner.name if owner else volume.vm_id}",
                "remove it there first, or pick a free volume (`corral volume list`)",
            )
        if volume.state != "ready":
            raise Conflict(f"volume {volume.name} is {volume.state}", "wait for its job to finish")
        if volume.host is not None and vm.host is not None and volume.host != vm.host:
            raise Conflict(
                f"volume {volume.name} is on host {volume.host}, VM {vm.name} on {vm.host}",
                "attach volumes on the VM's own host",
            )
        if jobs.active_for(session, "volume", volume.id):
            raise Conflict(f"volume {volume.name} is busy", "wait for its job to finish")
        volume.vm_id, volume.device_index = vm.id, index
        created = False
    else:
        assert request.size is not None
        check_pool_space(session, request.size, "a disk", vm.host)
        quotas.check(session, project, disk=request.size)
        volume = new_volume(
            session, vm, free_volume_name(session, project, f"{vm.name}-disk{index}"), request.size, index
        )
        created = True
    session.flush()
    return jobs.submit(
        session,
        JobKind.VM_DISK_ADD,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=DiskAddParams(volume_id=volume.id, volume=volume.name, created=created),
    )


def disk_remove(session: Session, name: str, volume_name: str, project: str = "default") -> Job:
    """Detach a data disk; the volume stays, free for another VM (delete it with `corral volume delete`)."""
    vm = get_vm(session, name, project)
    ensure_idle(session, vm)
    volume = session.scalars(select(Volume).where(Volume.project == project, Volume.name == volume_name)).first()
    if volume is None or volume.vm_id != vm.id:
        disks = ", ".join(v.name for v in sorted(vm.volumes, key=lambda v: v.device_index) if v.role != "root")
        raise NotFound(
            f"VM {vm.name} has no disk {volume_name!r}", f"its data disks: {disks}" if disks else "it has no data disks"
        )
    if volume.role == "root" or volume.device_index == 0:
        raise InvalidInput(
            f"{volume_name} is the root disk of {vm.name} and cannot be removed",
            f"delete the VM instead: `corral vm delete {vm.name}`",
        )
    return jobs.submit(
        session,
        JobKind.VM_DISK_REMOVE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=DiskRemoveParams(volume_id=volume.id, volume=volume.name),
    )


def describe(old: VMSpec, new: VMSpec) -> list[str]:
    """The changes in words, for job messages."""
    words = []
    if old.memory != new.memory:
        words.append(f"memory {format_size(old.memory)} -> {format_size(new.memory)}")
    if old.cpus != new.cpus:
        words.append(f"CPUs {old.cpus} -> {new.cpus}")
    return words
