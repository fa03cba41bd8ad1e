"""The fork verb of the control plane: children are new VMs on the parent's host."""

from __future__ import annotations

from sqlalchemy.orm import Session

from corral.cluster import placement, quotas
from corral.cluster.vm_rows import ensure_idle, fresh_identity, get_vm, new_vm, new_volume, volume_name
from corral.errors import Conflict, InvalidInput
from corral.spec.job import JobKind
from corral.spec.job_params import VMForkParams
from corral.spec.vm import USER_NETWORK, PowerState, VMSpec
from corral.store import jobs
from corral.store.models import Job

MAX_CHILDREN = 64


def child_names(name: str, count: int) -> list[str]:
    if not 1 <= count <= MAX_CHILDREN:
        raise InvalidInput(f"invalid --count {count}", f"fork 1 to {MAX_CHILDREN} children at a time")
    return [name] if count == 1 else [f"{name}-{index}" for index in range(1, count + 1)]


def fork(
    session: Session,
    source_name: str,
    name: str,
    count: int = 1,
    project: str = "default",
    wait: bool = True,
    networks: dict[str, str] | None = None,
    keep_macs: bool = False,
) -> Job:
    """Fork any running VM (``forkable`` only makes it faster: docs/testing-with-corral.md). With ``wait`` the
    job ends when the children answer with their new identity; without, as soon as they run.

    ``networks`` moves the children's NICs to other networks (old name -> new name) and ``keep_macs`` keeps the
    parent's MACs: an isolated copy (`corral env fork --isolated`), whose guests keep their addresses too."""
    parent = get_vm(session, source_name, project)
    spec = VMSpec.model_validate(parent.spec)
    networks = networks or {}
    unknown = sorted(set(networks) - {nic.network for nic in spec.nics})
    if unknown:
        raise InvalidInput(
            f"VM {source_name} has no NIC on {', '.join(unknown)}",
            f"map only its networks: {', '.join(nic.network for nic in spec.nics) or '(none)'}",
        )
    # QEMU's user network is the VM's own: only corral networks must be moved for a MAC to stay unique.
    if keep_macs and (count != 1 or any(nic.network not in networks | {USER_NETWORK: ""} for nic in spec.nics)):
        raise InvalidInput(
            "keeping MACs needs one child with every NIC moved to another network",
            "a MAC may appear once per network: map each of the VM's networks, and fork one child",
        )
    if parent.observed_state not in (PowerState.RUNNING, PowerState.PAUSED):  # paused: a warm template
        raise Conflict(f"VM {source_name} is {parent.observed_state}", "a fork copies a running VM; start it first")
    ensure_idle(session, parent)
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
            # A forkable parent's children run with their RAM in a file (a private mapping of the parent's, and
            # a shared file of their own after a restart): the RAM block every later plan of theirs (a move's
            # destination, a restart) must have. A plain parent's children have plain RAM.
            child_spec = fresh_identity(spec, child_name).model_copy(update={"forkable": spec.forkable})
            if networks:
                nics = [
                    nic.model_copy(update={"network": networks[nic.network]} if nic.network in networks else {})
                    for nic in (spec.nics if keep_macs else child_spec.nics)
                ]
                child_spec = child_spec.model_copy(update={"nics": nics})
            vm = new_vm(session, child_spec, parent.host, project, start=True)
            vm.status_message = f"forking from {source_name}"
            for index, source in enumerate(sorted(parent.volumes, key=lambda v: v.device_index)):
                new_volume(
                    session,
                    vm,
                    volume_name(child_name, index),
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
            params=VMForkParams(child_ids=child_ids, names=names, wait=wait, keep_addresses=keep_macs),
        )
