"""Moving VMs between hosts, as the control plane decides it: `vm migrate` and `host drain`.

The control plane checks the request and the target here, and writes the move as two jobs in one transaction:
``vm.migrate-in`` for the destination host's agent (start QEMU waiting for the stream, publish where it listens
into its job's parameters, take the VM over and flip the store's rows once the VM runs there) and ``vm.migrate``
for the source host's agent (wait for that endpoint, send disks and RAM, ask the destination's job whether it runs
the VM before quitting the local copy). The user follows the source's job. The agents' side is
``corral.host.move_jobs``; the order of events and why exactly one copy runs at the end is explained
there and in docs/cluster.md.

**Shared storage** is detected, not declared: every agent writes a random id into a marker file at the root of
its storage pool (``.corral-pool-id``) and reports it in its host row (``usage.pool_id``). Two hosts that see the
same id see the same files (the pool is one NFS export or cluster filesystem mounted at the same path), so a move
between them sends only RAM; between hosts with different ids the disks are copied too (NBD + blockdev-mirror).
``--with-storage`` on shared storage would mirror a disk onto itself and is refused, as is leaving it out (when
asked explicitly) between hosts that do not share.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import networks as cluster_networks
from corral.cluster import placement, replication
from corral.cluster.host_loads import shares_storage
from corral.cluster.vm_rows import ensure_idle, get_vm
from corral.errors import Conflict, InvalidInput, NotFound
from corral.spec.job import JobKind
from corral.spec.job_params import HostDrainParams, MigrateInParams, MigrateParams
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs, network_queries
from corral.store.models import VM, Host, Job

POOL_MARKER = ".corral-pool-id"
MOVABLE_STATES = (PowerState.RUNNING, PowerState.PAUSED)


class MigrateRequest(BaseModel):
    """``vm migrate``: where to (None: the scheduler picks), live or offline (None: live when it runs), and
    whether to copy the disks (None: copy them exactly when the two hosts do not share their pool)."""

    model_config = ConfigDict(extra="forbid")
    to: str | None = None
    live: bool | None = None
    with_storage: bool | None = None


def _storage_of(vm: VM) -> int:
    return sum(volume.size for volume in vm.volumes)


def _copy_disks(source: Host, target: Host, asked: bool | None) -> bool:
    shared = shares_storage(source, target)
    if asked and shared:
        raise InvalidInput(
            f"hosts {source.name} and {target.name} share their storage pool: --with-storage would copy the disks "
            "onto themselves",
            "leave --with-storage out",
        )
    if asked is False and not shared:
        raise InvalidInput(
            f"hosts {source.name} and {target.name} do not share their storage pool",
            "pass --with-storage to copy the disks, or mount one pool at the same path on both hosts",
        )
    return not shared


def _request(
    vm: VM, spec: VMSpec, copy: bool, host: str | None = None, networks: dict[str, Any] | None = None
) -> placement.PlacementRequest:
    # Anti-affinity still holds on the way; an affinity group cannot be kept by moving one member, so it is left out.
    # ``networks``: the NICs' needs (placement.needs); the VM's volumes go with it, so they tie it to no host.
    anti = vm.placement_policy == placement.Policy.ANTI_AFFINITY
    return placement.PlacementRequest.of(
        spec,
        storage=_storage_of(vm) if copy else 0,
        will_run=True,
        host=host,
        group=vm.placement_group if anti else None,
        policy=placement.Policy.ANTI_AFFINITY if anti else None,
        project=vm.project,
        **{key: value for key, value in (networks or {}).items() if key != "volumes"},
    )


def choose_target(
    session: Session, vm: VM, to: str | None, with_storage: bool | None, scheduler: placement.Scheduler | None = None
) -> tuple[Host, bool]:
    """The destination host and whether the disks are copied; raises with the reason a person can act on.

    ``to`` None: the scheduler's choice among every host but the VM's own (filters and weights as for a create).
    ``scheduler``: a drain's shared scheduler, so that each VM placed counts for the next ones."""
    spec = VMSpec.model_validate(vm.spec)
    source = session.scalars(select(Host).where(Host.name == vm.host)).first()
    if source is None:
        raise Conflict(f"the host of VM {vm.name} ({vm.host}) is not registered", "start its agent")
    if not placement.is_online(source):
        raise Conflict(
            f"host {source.name}, where VM {vm.name} runs, does not answer (agent {source.state} or "
            "silent): nothing can move off it",
            f"start the agent on {source.address or source.name} again",
        )
    if to is not None and to == vm.host:
        raise InvalidInput(f"VM {vm.name} already runs on host {to}", "name another host with --to, or leave --to out")
    scheduler = scheduler or placement.Scheduler(placement.load_pool(session, vm.project))
    networks = placement.needs(session, spec, vm.project)
    if to is not None:
        target = session.scalars(select(Host).where(Host.name == to)).first()
        if target is None or to not in scheduler.view:
            raise NotFound(f"host {to!r} is not registered", "list hosts with `corral host list`")
        replication.check_move(session, vm, to)
        copy = _copy_disks(source, target, with_storage)
        request = _request(vm, spec, copy, host=to, networks=networks)
        reason = scheduler.verdict(scheduler.view[to], request) or cluster_networks.forwards_clash(session, vm, to)
        if reason is not None:
            raise Conflict(
                f"host {to} cannot take VM {vm.name}: {reason}",
                "choose another host with --to, or leave --to out to let the scheduler choose",
            )
        scheduler.commit(scheduler.view[to], request)
        return target, copy
    # Without --to: try hosts in weight order; the storage need depends on whether each one shares the pool.
    others = {name: load for name, load in scheduler.view.items() if name != vm.host}
    replica = replication.replica_of(session, vm.id)  # never onto its replica's host (check_move)
    if replica is not None:
        others.pop(replica.partner, None)
    rows = {host.name: host for host in session.scalars(select(Host).where(Host.name.in_(list(others))))}
    reasons = []
    for load in sorted(others.values(), key=lambda load: (scheduler.weight(load), load.name)):
        host = rows.get(load.name)
        if host is None:
            continue
        shared = shares_storage(source, host)
        if (with_storage and shared) or (with_storage is False and not shared):
            reasons.append(f"{load.name}: {'shares' if shared else 'does not share'} the storage pool")
            continue
        request = _request(vm, spec, not shared, networks=networks)
        reason = scheduler.verdict(load, request) or cluster_networks.forwards_clash(session, vm, load.name)
        if reason is None:
            scheduler.commit(load, request)
            return host, not shared
        reasons.append(f"{load.name}: {reason}")
    # Nothing awake fits: a standby host is woken for it, as for a create (counted as if the disks were copied,
    # since whether it shares the pool is known only once it is chosen).
    woken = placement.wake_for(session, scheduler, _request(vm, spec, True, networks=networks))
    if woken is not None:
        return woken, not shares_storage(source, woken)
    if not reasons:
        raise Conflict(f"no other host to move VM {vm.name} to", "add a host with `corral agent` on another machine")
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    raise Conflict(f"no host can take VM {vm.name}: {shown}", "add or undrain a host, or free capacity on one")


def _lock_target(session: Session, target: Host) -> None:
    """On PostgreSQL, hold the destination's row until the jobs are written, as placement does for a create."""
    if session.get_bind().dialect.name == "postgresql":
        session.scalars(select(Host.id).where(Host.id == target.id).with_for_update()).first()


def submit_pair(session: Session, vm: VM, target: Host, copy: bool, after: str | None = None) -> Job:
    """The destination's and the source's jobs for one live move; returns the source's (the one to follow)."""
    common = {"from": vm.host, "to": target.name, "with_storage": copy}
    incoming = jobs.submit(
        session,
        JobKind.VM_MIGRATE_IN,
        "vm",
        vm.name,
        target_id=vm.id,
        host=target.name,
        project=vm.project,
        params=MigrateInParams.model_validate(common),
    )
    outgoing = jobs.submit(
        session,
        JobKind.VM_MIGRATE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=vm.project,
        params=MigrateParams.model_validate({**common, "dest_job": incoming.id, "after": after}),
    )
    jobs.add_params(incoming, source_job=outgoing.id)
    return outgoing


def move_stopped(session: Session, vm: VM, target: Host) -> None:
    """A stopped VM on shared storage moves by its rows alone: its disks are already where the target looks."""
    vm.host = target.name
    for volume in vm.volumes:
        volume.host = target.name
    network_queries.move_forwards(session, vm, target.name)


def migrate(session: Session, name: str, request: MigrateRequest, project: str = "default") -> tuple[Job | None, VM]:
    """Check a `vm migrate` and write its jobs (None for a stopped VM on shared storage: the rows just move)."""
    vm = get_vm(session, name, project)
    ensure_idle(session, vm)
    running = vm.desired_state in MOVABLE_STATES and vm.observed_state in MOVABLE_STATES
    live = running if request.live is None else request.live
    if live and not running:
        raise Conflict(
            f"VM {name} is {vm.observed_state}, not running: it cannot move live",
            f"start it first (`corral vm start {name}`), or move it stopped with --offline",
        )
    if not live and running:
        raise Conflict(
            f"VM {name} is running: an offline move needs it stopped",
            f"stop it first (`corral vm stop {name}`), or move it live with --live",
        )
    if vm.observed_state in (PowerState.STARTING, PowerState.STOPPING):
        raise Conflict(f"VM {name} is {vm.observed_state}", "wait until it is running or stopped")
    with placement.placement_lock:
        if not live:
            _migrate_stopped(session, vm, request)  # the rows move; no job
            return None, vm
        target, copy = choose_target(session, vm, request.to, request.with_storage)
        _lock_target(session, target)
        return submit_pair(session, vm, target, copy), vm


def _migrate_stopped(session: Session, vm: VM, request: MigrateRequest) -> None:
    spec = VMSpec.model_validate(vm.spec)
    view = placement.load_pool(session, vm.project)
    scheduler = placement.Scheduler(view)
    # A stopped VM holds no CPU or memory, only storage, which shared storage does not move.
    source = session.scalars(select(Host).where(Host.name == vm.host)).first()
    candidates = [request.to] if request.to else [n for n in view if n != vm.host]
    if request.to and request.to == vm.host:
        raise InvalidInput(f"VM {vm.name} is already on host {request.to}", "name another host with --to")
    if request.to and request.to not in view:
        raise NotFound(f"host {request.to!r} is not registered", "list hosts with `corral host list`")
    if request.with_storage:
        raise InvalidInput(
            "copying the disks of a stopped VM is not supported yet",
            f"start it and move it live: `corral vm start {vm.name}` then `corral vm migrate {vm.name} --with-storage`",
        )
    reasons = []
    for name in sorted(candidates, key=lambda n: (scheduler.weight(view[n]), n)):
        target = session.scalars(select(Host).where(Host.name == name)).one()
        if source is None or not shares_storage(source, target):
            reasons.append(f"{name}: does not share the storage pool")
            continue
        why = view[name].fits(placement.PlacementRequest.of(spec, will_run=False))
        why = why or cluster_networks.forwards_clash(session, vm, name)
        if why is not None:
            reasons.append(f"{name}: {why}")
            continue
        move_stopped(session, vm, target)
        return None
    raise Conflict(
        f"VM {vm.name} cannot move while stopped: " + "; ".join(reasons[:5]),
        f"start it and move it live (its disks go with it): `corral vm start {vm.name}`",
    )


def drain(session: Session, host_name: str) -> tuple[Job | None, dict[str, Any]]:
    """Mark a host drained and move every VM off it: running ones live (each placed by the scheduler, one move
    at a time, which a ``host.drain`` job on the host follows), stopped ones by their rows when a host shares
    the storage; those that cannot go anywhere are reported. Returns the drain job (None when nothing moves)."""
    from corral.cluster import hosts

    host = hosts.set_drained(session, host_name, True)
    vms = list(session.scalars(select(VM).where(VM.host == host_name).order_by(VM.name)))
    report: dict[str, Any] = {"moved_stopped": [], "not_moved": [], "vms": []}
    with placement.placement_lock:
        view = placement.load_pool(session, lock=session.get_bind().dialect.name == "postgresql")
        scheduler = placement.Scheduler(view)
        previous: str | None = None
        for vm in vms:
            try:
                ensure_idle(session, vm)
                running = vm.desired_state in MOVABLE_STATES and vm.observed_state in MOVABLE_STATES
                if not running:
                    _migrate_stopped(session, vm, MigrateRequest(live=False))
                    report["moved_stopped"].append({"vm": vm.name, "to": vm.host})
                    continue
                target, copy = choose_target(session, vm, None, None, scheduler)
            except (Conflict, InvalidInput, NotFound) as exc:
                report["not_moved"].append({"vm": vm.name, "reason": exc.message})
                continue
            job = submit_pair(session, vm, target, copy, after=previous)
            previous = job.id
            report["vms"].append({"vm": vm.name, "to": target.name, "job": job.id, "with_storage": copy})
    if not report["vms"]:
        return None, report
    drain_job = jobs.submit(
        session,
        JobKind.HOST_DRAIN,
        "host",
        host.name,
        target_id=host.id,
        host=host.name,
        params=HostDrainParams.model_validate(report),
    )
    return drain_job, report
