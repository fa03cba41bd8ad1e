"""Replication of a VM's disks to a partner host, and failover onto that copy (docs/ha.md, "Replication").

A VM on a host's own storage cannot be restarted elsewhere when its host dies: no other host reaches its disks.
A replica fixes that at the price of a bounded data loss. Every ``every`` seconds the control plane (the host
watch of each ``corral serve``, claiming the row with a conditional UPDATE of its ``version`` as backup schedules
do) writes two jobs in one transaction: ``vm.replica-receive`` for the partner, which exports a new layer of the
replica over NBD on the pool's host network, and ``vm.replicate`` for the VM's host, which copies into it what
changed since the last copy (a dirty bitmap, the machinery of incremental backups) at one instant, guest
filesystems frozen when its agent answers. The partner applies the layer only once the whole copy arrived, so the
replica always reads as a complete, bootable image of the last copy. The first copy (and any copy after the
change record was lost: a storage migration, a restart that left the bitmap inconsistent) is full.

Failover (`vm failover`, or HA when the VM's host is taken over) points the VM's rows at the partner and queues
``vm.failover`` there: the replica's files become the VM's disks and it starts. It is refused while the VM could
still be running on its own host: only a stopped VM, or one whose host the pool has taken over (``dead``: its
lease expired, the host fenced itself and its epoch was bumped), fails over. So a VM never runs twice.

Replication needs a pool (PostgreSQL); on a single SQLite host there is no partner and it is refused.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from corral.cluster import placement
from corral.cluster.host_loads import shares_storage
from corral.cluster.vm_rows import ensure_idle, get_vm
from corral.errors import AlreadyExists, Conflict, CorralError, InvalidInput, NotFound
from corral.spec.backup import parse_duration
from corral.spec.job import JobKind, JobState
from corral.spec.job_params import FailoverParams, ReplicaReceiveParams, ReplicaRemoveParams, ReplicateParams, parse
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs
from corral.store.db import Store
from corral.store.models import VM, Event, Host, Job, Replica, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

log = logging.getLogger("corral.replication")

MIN_EVERY = 10.0  # seconds: a copy every few seconds would keep the VM's host busy copying
DEFAULT_EVERY = 60.0
RETRY_AFTER = 5.0  # a copy that could not start (the VM busy, the partner away) is tried again this soon
COPY_KINDS = (JobKind.VM_REPLICATE, JobKind.VM_REPLICA_RECEIVE)
STOPPED = (PowerState.STOPPED, PowerState.CRASHED, PowerState.LOST)


def check_interval(every: str | float) -> float:
    seconds = parse_duration(every) if isinstance(every, str) else float(every)
    if seconds < MIN_EVERY:
        raise InvalidInput(
            f"a replication interval of {seconds:g} s is shorter than the minimum of {MIN_EVERY:g} s",
            "give a longer --every, e.g. 60s",
        )
    return seconds


def _check_pool(session: Session) -> None:
    if session.get_bind().dialect.name != "postgresql":
        raise InvalidInput(
            "replication needs a pool of hosts on PostgreSQL; this is a single host on SQLite",
            "back the VM up instead (`corral backup schedule`), or run it in a pool (docs/cluster.md, docs/ha.md)",
        )


def _host(session: Session, name: str) -> Host | None:
    return session.scalars(select(Host).where(Host.name == name)).first()


def get_replica(session: Session, vm_name: str, project: str = "default") -> Replica:
    row = session.scalars(select(Replica).where(Replica.project == project, Replica.vm_name == vm_name)).first()
    if row is None:
        raise NotFound(f"VM {vm_name} has no replica", f"make one with `corral vm replicate {vm_name} --to HOST`")
    return row


def replica_of(session: Session, vm_id: str) -> Replica | None:
    return session.scalars(select(Replica).where(Replica.vm_id == vm_id)).first()


def list_replicas(session: Session, project: str = "default") -> list[Replica]:
    return list(session.scalars(select(Replica).where(Replica.project == project).order_by(Replica.vm_name)))


def _disks(vm: VM) -> list[dict[str, Any]]:
    return [
        {"index": i, "volume_id": v.id, "device_index": v.device_index, "pool": v.pool, "size": v.size}
        for i, v in enumerate(sorted(vm.volumes, key=lambda v: v.device_index))
    ]


def replicate(
    session: Session, vm_name: str, to: str, every: str | float | None = None, project: str = "default"
) -> tuple[Replica, Job | None]:
    """Make (or re-time) the VM's replica on host ``to`` and copy now when the VM runs. Asked again for the same
    partner, it takes a copy at once: the way to make one between two periodic ones."""
    _check_pool(session)
    seconds = check_interval(every) if every is not None else None
    vm = get_vm(session, vm_name, project)
    if to == vm.host:
        raise InvalidInput(
            f"VM {vm_name} runs on host {to}: a replica on its own host protects nothing",
            "name another host with --to",
        )
    partner = _host(session, to)
    if partner is None:
        raise NotFound(f"host {to!r} is not in the pool", "list the hosts with `corral host list`")
    source = _host(session, vm.host) if vm.host else None
    if source is not None and shares_storage(source, partner):
        raise InvalidInput(
            f"hosts {vm.host} and {to} share their storage pool: the VM's disks are already there",
            "HA restarts it from the shared pool; replicate to a host with its own storage",
        )
    row = replica_of(session, vm.id)
    if row is not None and row.partner != to:
        raise AlreadyExists(
            f"VM {vm_name} already has a replica on host {row.partner}",
            f"remove it first: `corral vm replication remove {vm_name}`",
        )
    if row is None:
        row = Replica(
            project=project,
            vm_name=vm.name,
            vm_id=vm.id,
            partner=to,
            every=seconds or DEFAULT_EVERY,
            state="new",
            disks=[],
            copies=0,
            version=0,
            next_at=utcnow(),
        )
        session.add(row)
    elif seconds is not None:
        row.every = seconds
    session.flush()
    job = None
    if vm.observed_state in (PowerState.RUNNING, PowerState.PAUSED):
        job = fire(session, row, vm)
        row.next_at = utcnow() + timedelta(seconds=row.every)
    return row, job


def fire(session: Session, row: Replica, vm: VM | None = None) -> Job:
    """Write one copy's two jobs: the partner's receive first (it publishes where it listens), then the source's
    copy, which the user follows. Every refusal comes before anything is written."""
    vm = vm or session.get(VM, row.vm_id)
    if vm is None:
        raise NotFound(f"VM {row.vm_name} no longer exists")
    if vm.observed_state not in (PowerState.RUNNING, PowerState.PAUSED):
        raise Conflict(f"VM {vm.name} is {vm.observed_state}: only a running VM is replicated", "start it")
    if vm.host == row.partner:
        raise Conflict(
            f"VM {vm.name} now runs on {row.partner}, its replica's host",
            f"remove the replica (`corral vm replication remove {vm.name}`) and replicate to another host",
        )
    ensure_idle(session, vm, allow=(JobKind.VM_EXEC,))
    partner = _host(session, row.partner)
    if partner is None or not placement.is_online(partner):
        raise Conflict(f"host {row.partner}, which keeps the replica of {vm.name}, is not online", "start its agent")
    shared = {"replica_id": row.id, "disks": _disks(vm), "source": vm.host}
    receive = jobs.submit(
        session,
        JobKind.VM_REPLICA_RECEIVE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=row.partner,
        project=vm.project,
        params=ReplicaReceiveParams.model_validate(shared),
    )
    copy = jobs.submit(
        session,
        JobKind.VM_REPLICATE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=vm.project,
        params=ReplicateParams.model_validate(
            {**shared, "receive_job": receive.id, "partner": row.partner, "bitmap": row.bitmap}
        ),
    )
    jobs.add_params(receive, source_job=copy.id)
    row.last_job_id = copy.id
    return copy


def remove(session: Session, vm_name: str, project: str = "default") -> Job | None:
    """The replica goes: its row now, its files on the partner by a job there (None: nothing was copied)."""
    row = get_replica(session, vm_name, project)
    for job in jobs.active_for(session, "vm", row.vm_id):
        if job.kind in COPY_KINDS:
            raise Conflict(
                f"a copy of VM {vm_name} to its replica is running (job {job.id[:12]})",
                f"wait for it: `corral job wait {job.id[:12]}`",
            )
    return _drop(session, row)


def _drop(session: Session, row: Replica) -> Job | None:
    pools = sorted({d["pool"] for d in row.disks}) or ["default"]
    session.delete(row)
    return jobs.submit(
        session,
        JobKind.VM_REPLICA_REMOVE,
        "replica",
        row.vm_name,
        target_id=row.id,
        host=row.partner,
        project=row.project,
        params=ReplicaRemoveParams(replica_id=row.id, pools=pools),
    )


def drop_for_vm(session: Session, vm: VM) -> None:
    """A deleted VM's replica goes with it (its files on the partner by a job there)."""
    row = replica_of(session, vm.id)
    if row is not None:
        _drop(session, row)


def check_move(session: Session, vm: VM, target: str) -> None:
    """Migrating a VM onto its replica's host is refused: the replica's files would sit beside the VM's own copy
    and a failover would have nowhere to go. Moving it to any third host keeps the replica (the next copy is full:
    the change record does not travel with a storage migration)."""
    row = replica_of(session, vm.id)
    if row is not None and row.partner == target:
        raise Conflict(
            f"host {target} keeps the replica of VM {vm.name}",
            f"migrate it elsewhere, or remove the replica first: `corral vm replication remove {vm.name}`",
        )


# -- failover ---------------------------------------------------------------------------------------------------


def failover(session: Session, vm_name: str, to: str | None = None, project: str = "default") -> Job:
    """Start the VM from its newest replica on the partner, when it cannot be running on its own host."""
    vm = get_vm(session, vm_name, project)
    row = get_replica(session, vm_name, project)
    if to is not None and to != row.partner:
        raise InvalidInput(
            f"the replica of VM {vm_name} is on host {row.partner}, not {to}",
            f"leave --to out, or pass --to {row.partner}",
        )
    if row.last_at is None:
        raise Conflict(f"the replica of VM {vm_name} holds no copy yet", "wait for its first copy to finish")
    source = _host(session, vm.host) if vm.host else None
    stopped = vm.desired_state == PowerState.STOPPED and vm.observed_state in STOPPED
    dead = source is None or source.state == "dead"
    if not (stopped or dead):
        raise Conflict(
            f"VM {vm_name} may still run on host {vm.host} (host {source.state if source else '?'}, its lease "
            "not taken over): a failover would run it twice",
            f"stop it first (`corral vm stop {vm_name}`), or wait until the pool declares {vm.host} dead",
        )
    for job in jobs.active_for(session, "vm", vm.id):
        if job.kind != JobKind.VM_EXEC:
            raise Conflict(f"VM {vm_name} is busy with {job.kind} (job {job.id[:12]})", "wait for it")
    partner = _host(session, row.partner)
    if partner is None or not placement.is_online(partner):
        raise Conflict(f"host {row.partner}, which keeps the replica of {vm_name}, is not online", "start its agent")
    return promote(session, vm, row, f"failover from {vm.host}")


def promote(session: Session, vm: VM, row: Replica, why: str) -> Job:
    """Point the VM and its disks at the partner and queue ``vm.failover`` there (one transaction with the
    caller's). The disks' rows keep their ids; the replica's files take their place on the partner."""
    source = vm.host
    previous = _previous(vm, row)
    _clean_old_host(session, vm, row)
    vm.host = row.partner
    for volume in vm.volumes:
        volume.host = row.partner
        volume.backing_path = None  # the replica is a standalone copy
        volume.state = "pending"  # until the failover job put its file in place
    vm.observed_state = PowerState.STOPPED
    vm.pid = None
    vm.ready = False
    vm.interfaces = []
    vm.desired_state = PowerState.RUNNING
    age = f"copy of {row.last_at:%H:%M:%S} UTC" if row.last_at else "no copy"
    vm.status_message = f"starting on {row.partner} from its replica ({age}): {why}"
    row.state = "promoting"
    session.add(
        Event(
            project=vm.project,
            type="vm.failover",
            resource_kind="vm",
            resource_name=vm.name,
            resource_id=vm.id,
            data={"from": source, "to": row.partner, "copy_at": row.last_at.isoformat() if row.last_at else None},
        )
    )
    job = jobs.submit(
        session,
        JobKind.VM_FAILOVER,
        "vm",
        vm.name,
        target_id=vm.id,
        host=row.partner,
        project=vm.project,
        params=FailoverParams.model_validate(
            {"replica_id": row.id, "disks": row.disks, "from": source, "previous": previous}
        ),
    )
    row.last_job_id = job.id  # no copy runs while promoting: settle_failovers follows this job instead
    return job


def _previous(vm: VM, row: Replica) -> dict[str, Any]:
    """What a failed failover puts back (:func:`settle_failovers`): the VM's host, states and its disks' rows."""
    return {
        "replica_state": row.state,
        "host": vm.host,
        "desired_state": vm.desired_state,
        "observed_state": vm.observed_state,
        "volumes": {v.id: {"host": v.host, "state": v.state, "backing_path": v.backing_path} for v in vm.volumes},
    }


def settle_failovers(session: Session) -> list[str]:
    """Replicas left ``promoting`` by a failover job that failed or was cancelled (its agent restarted, or the
    partner was taken over): the replica goes back to its state before, with the error recorded, and, when the
    replica's files were not taken (the job removes the row once they are), the VM's rows go back where its disks
    are, so that `vm failover` can be asked again and a host that comes back finds its VM as it left it. Returns
    the VM names settled."""
    settled = []
    for row in session.scalars(select(Replica).where(Replica.state == "promoting").with_for_update()):
        job = session.get(Job, row.last_job_id) if row.last_job_id else None
        if job is not None and not JobState(job.state).finished:
            continue
        if job is not None and job.state == JobState.SUCCEEDED:
            continue  # its handler removed the row: only a concurrent read could see it here
        why = (job.error or job.message if job is not None else None) or "its job is gone"
        previous = parse(FailoverParams, job.params).previous if job is not None else None
        row.state = (previous or {}).get("replica_state") or ("ready" if row.last_at else "new")
        row.last_error = f"failover to {row.partner} failed: {why}"
        vm = session.get(VM, row.vm_id)
        if vm is not None and vm.host == row.partner and previous:
            _put_back(session, vm, previous, row.last_error)
        session.add(
            Event(
                project=row.project,
                type="vm.failover_failed",
                resource_kind="vm",
                resource_name=row.vm_name,
                resource_id=row.vm_id,
                data={"to": row.partner, "error": why},
            )
        )
        log.error("VM %s: %s; its replica is %s again", row.vm_name, row.last_error, row.state)
        settled.append(row.vm_name)
    return settled


def _put_back(session: Session, vm: VM, previous: dict[str, Any], why: str) -> None:
    vm.host = previous["host"]
    # The removal of its "stale" files there (queued by _clean_old_host) would wait for nothing: they are its disks.
    session.execute(
        update(Job)
        .where(
            Job.kind == JobKind.VM_REPLICA_REMOVE,
            Job.target_id == vm.id,
            Job.host == vm.host,
            Job.state == JobState.QUEUED,
        )
        .values(
            state=JobState.CANCELLED,
            message="the failover failed: these files are the VM's disks again",
            finished_at=utcnow(),
            version=Job.version + 1,
        )
    )
    for volume in vm.volumes:
        before = previous["volumes"].get(volume.id)
        if before is not None:
            volume.host, volume.state, volume.backing_path = before["host"], before["state"], before["backing_path"]
    source = _host(session, vm.host) if vm.host else None
    if source is not None and source.state == "dead":
        vm.observed_state = PowerState.LOST  # still on the dead host: `vm failover` may be asked again
    else:
        vm.observed_state, vm.desired_state = previous["observed_state"], previous["desired_state"]
    vm.status_message = f"{why}; the VM is back on {vm.host}: fix the cause, then `corral vm failover {vm.name}`"


def _clean_old_host(session: Session, vm: VM, row: Replica) -> None:
    """Queue, on the host the VM leaves, the removal of its now stale disk files: a dead host's agent runs it when
    it comes back (jobs queued after a takeover wait for it), a live one at once. Not when that host shares its
    storage pool with the partner: the files there would be the very ones the VM now uses."""
    old = _host(session, vm.host) if vm.host else None
    partner = _host(session, row.partner)
    if old is None or partner is None or shares_storage(old, partner):
        return
    jobs.submit(
        session,
        JobKind.VM_REPLICA_REMOVE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=old.name,
        project=vm.project,
        params=ReplicaRemoveParams(stale_volumes=[{"id": v.id, "pool": v.pool, "path": v.path} for v in vm.volumes]),
    )


def ha_target(session: Session, vm: VM, dead: str) -> Replica | None:
    """The replica HA restarts ``vm`` from when its host ``dead`` was taken over: one with a copy, on a host that
    is online and has room for the VM (placement's checks, without its disks: the replica holds them)."""
    row = replica_of(session, vm.id)
    if row is None or row.last_at is None or row.partner == dead:
        return None
    spec = VMSpec.model_validate(vm.spec)
    try:
        placement.pick_host(session, spec, row.partner, will_run=True, project=vm.project, attached=[])
    except CorralError as exc:
        log.warning("HA: the replica host %s of VM %s cannot take it: %s", row.partner, vm.name, exc.message)
        return None
    return row


# -- what `vm show` and `replication show` say ------------------------------------------------------------------


def describe(row: Replica, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    age = (now - row.last_at).total_seconds() if row.last_at else None
    return {
        "vm": row.vm_name,
        "partner": row.partner,
        "every": row.every,
        "state": row.state,
        "copies": row.copies,
        "last_at": row.last_at.isoformat() if row.last_at else None,
        "age_seconds": round(age, 1) if age is not None else None,
        "last_kind": row.last_kind,
        "last_consistent": row.last_consistent,
        "last_bytes": row.last_bytes,
        "last_seconds": row.last_seconds,
        "last_error": row.last_error,
        "next_at": row.next_at.isoformat(),
        # What a failover now would lose at most: the writes since the last copy, i.e. its age, and about one
        # interval (plus a copy's own time) in steady state.
        "data_loss_bound_seconds": row.every,
    }


# -- the runner -------------------------------------------------------------------------------------------------


def run_once(store: Store, now: datetime | None = None) -> int:
    """One pass: fire every due replica whose VM runs. Returns how many copies were submitted."""
    now = now or utcnow()
    with store.session() as session:
        settle_failovers(session)
    with store.session() as session:
        seen = [(r.id, r.version) for r in session.scalars(select(Replica).where(Replica.next_at <= now))]
    submitted = 0
    for replica_id, version in seen:
        try:
            submitted += _pass(store, replica_id, version, now)
        except Exception as exc:  # one replica's trouble must not stop the others
            log.warning("replication pass failed: %s", exc)
    return submitted


def _pass(store: Store, replica_id: str, version: int, now: datetime) -> int:
    with store.session() as session:
        result = session.execute(
            update(Replica).where(Replica.id == replica_id, Replica.version == version).values(version=version + 1)
        )
        claimed = cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor result
        if claimed != 1:
            session.rollback()
            return 0  # another control plane has it
        row = session.get(Replica, replica_id)
        if row is None or row.state == "promoting":
            return 0
        vm = session.get(VM, row.vm_id)
        if vm is None:
            _drop(session, row)
            return 0
        if vm.observed_state not in (PowerState.RUNNING, PowerState.PAUSED):
            row.next_at = now + timedelta(seconds=row.every)  # a stopped VM writes nothing
            return 0
        try:
            fire(session, row, vm)
        except CorralError as exc:
            row.last_error = exc.message
            row.next_at = now + timedelta(seconds=min(row.every, RETRY_AFTER))
            return 0
        row.next_at = now + timedelta(seconds=row.every)
        return 1
