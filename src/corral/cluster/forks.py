"""The fork verb of the control plane: children are new VMs on the parent's host."""

from __future__ import annotations

from sqlalchemy.orm import Session

from corral.cluster import placement, quotas
from corral.cluster.clones import _new_vm, _volume_name, fresh_identity
from corral.cluster.vms import _busy, get_vm, new_volume
from corral.errors import Conflict, InvalidInput
from corral.spec.job import JobKind
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs
from corral.store.models import Job

MAX_CHILDREN = 64


def child_names(name: str, count: int) -> list[str]:
    if not 1 <= count <= MAX_CHILDREN:
        raise InvalidInput(f"invalid --count {count}", f"fork 1 to {MAX_CHILDREN} children at a time")
    return [name] if count == 1 else [f"{name}-{index}" for index in range(1, count + 1)]


def fork(session: Session, source_name: str, name: str, count: int = 1, project: str = "default") -> Job:
    parent = get_vm(session, source_name, project)
    spec = VMSpec.model_validate(parent.spec)
    if not spec.forkable:
        raise Conflict(f"VM {source_name} is not forkable", "create it with --forkable (its RAM goes in a shared file)")
    if parent.observed_state != PowerState.RUNNING:
        raise Conflict(f"VM {source_name} is {parent.observed_state}", "a fork copies a running VM; start it first")
    _busy(session, parent)
    names = child_names(name, count)
    child_ids = []
    with placement.placement_lock:
        quotas.check(
            session,
            project,
            vcpus=spec.cpus * len(names),
            memory=spec.memory * len(names),
            disk=sum(v.size for v in parent.volumes) * len(names),
            vms=len(names),
        )
        for child_name in names:
            child_spec = fresh_identity(spec, child_name).model_copy(update={"forkable": False})
            vm = _new_vm(session, child_spec, parent.host, project, start=True)
            vm.status_message = f"forking from {source_name}"
            for index, source in enumerate(sorted(parent.volumes, key=lambda v: v.device_index)):
                new_volume(
                    session,
                    vm,
                    _volume_name(child_name, index),
                    source.size,
                    source.device_index,  # the child resumes the parent's devices: same nodes, same ports
                    source.role,
                    pool=source.pool,
                    backing_image=source.backing_image,
                    backing_path=source.backing_path,
                )
            session.flush()
            child_ids.append(vm.id)
        return jobs.submit(
            session,
            JobKind.VM_FORK,
            "vm",
            parent.name,
            target_id=parent.id,
            host=parent.host,
            project=project,
            params={"child_ids": child_ids, "names": names},
        )
