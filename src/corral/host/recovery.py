"""What a job interrupted by the agent's death leaves half done, settled when the agent starts again.

Jobs cannot be resumed (their progress lived in the dead process), so they are marked failed; this module then
makes the store tell the truth about what they left:

- a VM whose create was interrupted before its disks were all made is removed, with the disk files its create
  made (a pending volume's file is named by its own id: it can be nobody else's), as a failed create would;
- a VM that should run but has no QEMU after adoption (its start was interrupted, or a restart the policy had
  scheduled died with the agent) is started again when its restart policy asks for it, and otherwise recorded
  as stopped with the reason, so its desired state never promises what nothing will do.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from corral.host import storage, vm_lifecycle
from corral.spec.job import JobKind
from corral.spec.job_params import JobParams, VMDeleteParams, VMStartParams, VMStopParams, parse
from corral.spec.vm import PowerState, RestartPolicy, VMSpec
from corral.store import jobs
from corral.store.models import VM, Job, Snapshot

if TYPE_CHECKING:
    from corral.host.agent import Agent

log = logging.getLogger("corral.agent")
WANTS_A_PROCESS = (PowerState.RUNNING, PowerState.PAUSED)


def settle_interrupted_creates(agent: Agent, interrupted: list[Job]) -> list[str]:
    """Remove VMs whose create died before their disks were made; returns their names."""
    removed = []
    for job in interrupted:
        if job.kind != JobKind.VM_CREATE or job.target_id is None:
            continue
        with agent.store.session() as session:
            vm = session.get(VM, job.target_id)
            if vm is None or all(volume.state != "pending" for volume in vm.volumes):
                continue
            if vm.id in agent.vms:
                continue  # it runs (adopted): its disks exist whatever their rows say
            for volume in list(vm.volumes):
                # The create's own disks were written with the VM's row; a volume made before it was attached
                # with --volume and outlives the VM, as on a failed create.
                if volume.state == "pending" or volume.created_at >= vm.created_at:
                    if volume.id in volume.path:  # named by its id: made for this volume, nobody else's file
                        storage.remove(agent, volume)
                    session.delete(volume)
                else:
                    volume.vm_id = None
            session.query(Snapshot).filter(Snapshot.vm_id == vm.id).delete()
            session.delete(vm)
            removed.append(vm.name)
        vm_lifecycle.remove_run_dir(agent, job.target_id)
        log.warning("VM %s: its create was interrupted by an agent restart; removed what it had made", job.target_name)
    if removed:
        agent.store.notifier.notify()
    return removed


def wanting_to_run(agent: Agent) -> set[str]:
    """VMs that should run here though the store says no QEMU was started or left for them (stopped or crashed):
    read before adoption, which settles the others (a QEMU that died unwatched goes through its restart policy)."""
    with agent.store.reading() as session:
        return set(
            session.scalars(
                select(VM.id).where(
                    VM.host == agent.host_name,
                    VM.desired_state.in_(WANTS_A_PROCESS),
                    VM.observed_state.in_((PowerState.STOPPED, PowerState.CRASHED)),
                )
            )
        )


def settle_unrun(agent: Agent, wanting: set[str]) -> dict[str, list[str]]:
    """Of ``wanting`` (see :func:`wanting_to_run`), the VMs that still have no QEMU and no job that would start one
    after adoption: started again by their restart policy, or recorded as stopped with the reason."""
    outcome: dict[str, list[str]] = {"started": [], "stopped": []}
    with agent.store.session() as session:
        candidates = [
            vm for vm in (session.get(VM, vm_id) for vm_id in sorted(wanting))
            if vm is not None and vm.desired_state in WANTS_A_PROCESS and vm.id not in agent.vms
            and vm.id not in agent.unadopted and not jobs.active_for(session, "vm", vm.id)
        ]  # fmt: skip
        for vm in candidates:
            policy = RestartPolicy(VMSpec.model_validate(vm.spec).restart_policy)
            if policy == RestartPolicy.NEVER:
                vm.desired_state = PowerState.STOPPED
                if vm.observed_state != PowerState.CRASHED:
                    vm.observed_state = PowerState.STOPPED
                vm.pid = None
                vm.ready = False
                vm.status_message = "its start was interrupted by an agent restart; start it again"
                outcome["stopped"].append(vm.name)
                continue
            jobs.submit(session, JobKind.VM_START, "vm", vm.name, target_id=vm.id, host=agent.host_name,
                        project=vm.project, params=VMStartParams())  # fmt: skip
            vm.status_message = f"started again by its restart policy ({policy.value}) after an agent restart"
            outcome["started"].append(vm.name)
    for what, names in outcome.items():
        for name in names:
            log.warning("VM %s wanted to run but had no QEMU after an agent restart: %s", name, what)
    return outcome


def settle_unstopped(agent: Agent, interrupted: list[Job]) -> dict[str, list[str]]:
    """VMs whose interrupted delete left them half removed (running or not, some files perhaps already gone), and
    VMs adopted running although their desired state is stopped (a stop died with the agent after the intent was
    recorded): the delete is submitted again, or a stop with the interrupted job's options, so the VM ends as
    asked instead of lingering against its desired state."""
    by_vm = {job.target_id: job for job in interrupted if job.target_kind == "vm" and job.target_id}
    outcome: dict[str, list[str]] = {"stopping": [], "deleting": []}
    with agent.store.session() as session:
        # A delete is finished whatever state it was left in: its files may already be gone.
        deletes = {vm_id for vm_id, job in by_vm.items() if job.kind == JobKind.VM_DELETE}
        for vm_id in sorted(set(agent.vms) | deletes):
            vm = session.get(VM, vm_id)
            if vm is None or vm.desired_state != PowerState.STOPPED or jobs.active_for(session, "vm", vm_id):
                continue
            earlier = by_vm.get(vm_id)
            # The earlier job's options, read as the reader reads them: keys an older release wrote are dropped.
            params: JobParams
            if earlier is not None and earlier.kind == JobKind.VM_DELETE:
                kind, params, what = JobKind.VM_DELETE, parse(VMDeleteParams, earlier.params), "deleting"
            elif earlier is not None and earlier.kind == JobKind.VM_STOP and earlier.params:
                kind, params, what = JobKind.VM_STOP, parse(VMStopParams, earlier.params), "stopping"
            else:
                kind, params, what = JobKind.VM_STOP, VMStopParams(force=False), "stopping"
            jobs.submit(session, kind, "vm", vm.name, target_id=vm.id, host=agent.host_name, project=vm.project,
                        params=params)  # fmt: skip
            vm.status_message = f"{what} again: the agent restarted while it was being done"
            outcome[what].append(vm.name)
            log.warning(
                "VM %s: its %s was interrupted by an agent restart; %s it again",
                vm.name,
                earlier.kind if earlier else "stop",
                what,
            )
    return outcome
