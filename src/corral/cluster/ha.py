"""HA in the control plane: take over hosts whose lease expired and restart their HA VMs on survivors (docs/ha.md).

Every control plane runs :func:`watch` from its host watch (corral.daemon.HostWatch), about once a second. All
times are the **database clock**: agents set ``lease_expires_at = now() + lease_time`` and this module compares
it with ``now()`` of the same server, so no two machines' clocks are compared.

A host is taken over only when its lease expired more than ``margin`` (half the lease time) ago. Its agent fenced
itself at 80 % of the lease time after its last renewal started (corral.host.lease), so its HA VMs were dead at
least ``0.2 * lease_time + margin`` before anything here starts them again. The takeover locks the host's row,
checks the expiry again under the lock, bumps the host's epoch (an agent that comes back learns from its next
renewal that it lost its VMs) and marks it ``dead``, in the same transaction that moves its HA VMs' rows to a
survivor chosen by normal placement and queues their start jobs, highest ``ha_priority`` first. An HA VM with a
replica (corral.cluster.replication) restarts from it on the replica's host when that host is online and has room:
its disks may be on the dead host's own storage, the replica has them as of its last copy. A VM no survivor can
reach, and every non-HA VM, is recorded ``lost`` with the reason.

**When most lease holders expire at once, nothing is taken over**: that is the store or the network failing, not
the hosts (the agents fenced their HA VMs all the same, and restart them once they renew). It is said once, as a
``pool.ha_suspended`` event and a log line, and again only when the set of expired hosts changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from corral.cluster import placement, replication
from corral.errors import CorralError
from corral.spec.job import JobKind, JobState
from corral.spec.job_params import VMStartParams
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs
from corral.store.models import VM, Event, Host, Job, utcnow

log = logging.getLogger("corral.ha")

MARGIN_FRACTION = 0.5  # of the lease time, waited after a lease's expiry before its host is taken over
# Hosts whose lease may be taken over: online, unreachable by their heartbeat, or fenced (their lease expired,
# written by :func:`mark_fenced`). "offline" (a clean stop) and "dead" (already taken over) hold no lease the
# control plane acts on.
LEASE_STATES = ("online", "unreachable", "fenced")
FENCED = "fenced"


@dataclass
class Decision:
    """What one pass decided: hosts to take over, or why none (``suspended``)."""

    take_over: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    holders: int = 0
    suspended: bool = False


@dataclass
class Takeover:
    """What taking one host over did."""

    host: str
    epoch: int
    restarted: list[tuple[str, str]] = field(default_factory=list)  # (VM, new host)
    lost: list[tuple[str, str]] = field(default_factory=list)  # (VM, why)


def decide(leases: dict[str, datetime], now: datetime, margin: timedelta) -> Decision:
    """The pure decision over ``leases`` (host -> expiry, for every host that holds one): hosts expired for more
    than ``margin`` are taken over, unless they are most of the holders (more than half), or the only one."""
    expired = sorted(name for name, expiry in leases.items() if expiry + margin < now)
    decision = Decision(expired=expired, holders=len(leases))
    if not expired:
        return decision
    if len(expired) * 2 > len(leases):
        decision.suspended = True
        return decision
    decision.take_over = expired
    return decision


_last_suspended: frozenset[str] = frozenset()


def watch(session: Session, lease_time: float) -> tuple[Decision, list[Takeover]]:
    """One pass (PostgreSQL only; on SQLite there are no leases): decide, then take over each host decided on."""
    global _last_suspended
    if session.get_bind().dialect.name != "postgresql":
        return Decision(), []
    now = _database_now(session)
    mark_fenced(session, now)
    margin = timedelta(seconds=lease_time * MARGIN_FRACTION)
    leases = {
        name: expiry
        for name, expiry in session.execute(
            select(Host.name, Host.lease_expires_at).where(
                Host.lease_expires_at.is_not(None), Host.state.in_(LEASE_STATES)
            )
        )
        if expiry is not None  # excluded by the query already; said again for the type
    }
    decision = decide(leases, now, margin)
    if decision.suspended:
        if frozenset(decision.expired) != _last_suspended:
            _last_suspended = frozenset(decision.expired)
            message = (
                f"{len(decision.expired)} of {decision.holders} hosts lost their lease at once "
                f"({', '.join(decision.expired)}): the store or the network is failing, not the hosts; "
                "HA restarts nothing until they renew"
            )
            log.error("%s", message)
            session.add(
                Event(
                    project=None,
                    type="pool.ha_suspended",
                    resource_kind="pool",
                    resource_name="pool",
                    data={"expired": decision.expired, "holders": decision.holders, "message": message},
                )
            )
        return decision, []
    _last_suspended = frozenset()
    done = []
    for name in decision.take_over:
        result = take_over(session, name, margin)
        if result is not None:
            done.append(result)
    return decision, done


def _database_now(session: Session) -> datetime:
    """``now()`` of the database server: the one clock every lease is compared with."""
    now: datetime = session.execute(select(func.now())).scalar_one()
    return now


def mark_fenced(session: Session, now: datetime) -> list[str]:
    """Hosts whose lease expired (database clock), not yet taken over: now ``fenced``.

    By construction of the watchdog (corral.host.lease) such a host has killed its HA VMs already, at 80 % of the
    lease time, so "fenced" is a fact about it and not a guess; it is written rather than derived so that
    placement, which picks only ``online`` hosts, skips it at once. Only its agent's next successful renewal (same
    epoch) makes it ``online`` again, and a takeover makes it ``dead``: a live host, which renews every
    ``lease_time / 5``, never shows it. It never delays a takeover (:data:`LEASE_STATES` includes it)."""
    names = list(
        session.scalars(
            update(Host)
            .where(
                Host.state.in_(("online", "unreachable")),
                Host.lease_expires_at.is_not(None),
                Host.lease_expires_at < now,
            )
            .values(state=FENCED)
            .returning(Host.name)
        )
    )
    for name in names:
        log.warning("host %s: its lease expired; it fenced itself (its HA VMs are dead) until it renews", name)
    return names


def take_over(session: Session, name: str, margin: timedelta) -> Takeover | None:
    """Take host ``name`` over if its lease is still expired under its row's lock (its agent may have renewed
    meanwhile); restart its HA VMs elsewhere, record the others lost. One transaction with the caller's."""
    host = session.scalars(select(Host).where(Host.name == name).with_for_update()).first()
    now = _database_now(session)
    if (
        host is None
        or host.state not in LEASE_STATES
        or host.lease_expires_at is None
        or host.lease_expires_at + margin >= now
    ):
        return None
    vms = [
        vm
        for vm in session.scalars(select(VM).where(VM.host == name))
        if vm.desired_state != PowerState.STOPPED
        or vm.observed_state not in (PowerState.STOPPED, PowerState.CRASHED, PowerState.LOST)
    ]
    if not vms:
        return None  # nothing to recover: the host stays "unreachable" and keeps its epoch
    host.epoch += 1
    host.state = "dead"
    expired_at = host.lease_expires_at
    result = Takeover(host=name, epoch=host.epoch)
    log.error("host %s: lease expired at %s; taking it over (epoch %d)", name, expired_at.isoformat(), host.epoch)
    session.add(
        Event(
            project=None,
            type="host.takeover",
            resource_kind="host",
            resource_name=name,
            data={"epoch": host.epoch, "lease_expired_at": expired_at.isoformat()},
        )
    )
    # Jobs queued for the dead host would never run; those it was running fail when its agent starts again.
    session.execute(
        update(Job)
        .where(Job.host == name, Job.state == JobState.QUEUED)
        .values(state=JobState.CANCELLED, message=f"host {name} died", finished_at=utcnow(), version=Job.version + 1)
    )
    session.flush()
    specs = {vm.id: VMSpec.model_validate(vm.spec) for vm in vms}
    vms.sort(key=lambda vm: (not specs[vm.id].ha, -specs[vm.id].ha_priority, vm.name))
    why_dead = f"host {name} died (its lease expired at {expired_at:%H:%M:%S} UTC and it was taken over)"
    for vm in vms:
        spec = specs[vm.id]
        if not spec.ha or vm.desired_state == PowerState.STOPPED:
            replica = replication.replica_of(session, vm.id)
            hint = (
                f"`corral vm failover {vm.name}` starts it from its replica on {replica.partner}"
                if replica is not None and replica.last_at is not None
                else "start it again when the host is back, or recreate it"
            )
            _lost(vm, f"{why_dead}; the VM is not HA: {hint}")
            result.lost.append((vm.name, "not HA"))
            continue
        try:
            with placement.placement_lock:
                target = placement.pick_host(
                    session,
                    spec,
                    None,
                    will_run=True,
                    project=vm.project,
                    attached=list(vm.volumes),
                    group=vm.placement_group,
                    policy=vm.placement_policy,
                )
                _restart_on(session, vm, target.name, why_dead)
        except CorralError as exc:
            # No survivor reaches its disks (the dead host's own storage): its replica has them, as of its last copy.
            replica = replication.ha_target(session, vm, name)
            if replica is not None:
                assert replica.last_at is not None  # ha_target picks only a replica with a copy
                with placement.placement_lock:
                    replication.promote(session, vm, replica, why_dead)
                result.restarted.append((vm.name, replica.partner))
                session.add(
                    Event(
                        project=vm.project,
                        type="vm.ha_restart",
                        resource_kind="vm",
                        resource_name=vm.name,
                        resource_id=vm.id,
                        data={"from": name, "to": replica.partner, "replica_copy_at": replica.last_at.isoformat()},
                    )
                )
                log.warning("HA: VM %s restarts on %s from its replica (host %s died)", vm.name, replica.partner, name)
                continue
            reason = f"{why_dead}; HA found no surviving host that reaches its disks and has room: {exc.message}"
            _lost(vm, reason)
            result.lost.append((vm.name, exc.message))
            session.add(
                Event(
                    project=vm.project,
                    type="vm.ha_failed",
                    resource_kind="vm",
                    resource_name=vm.name,
                    resource_id=vm.id,
                    data={"host": name, "reason": exc.message},
                )
            )
            continue
        result.restarted.append((vm.name, target.name))
        log.warning("HA: VM %s restarts on %s (host %s died)", vm.name, target.name, name)
    return result


def _lost(vm: VM, reason: str) -> None:
    vm.observed_state = PowerState.LOST
    vm.pid = None
    vm.ready = False
    vm.status_message = reason


def _restart_on(session: Session, vm: VM, target: str, why: str) -> None:
    """Point ``vm`` and its disks at ``target`` and queue its start there (placement already chose it)."""
    source = vm.host
    vm.host = target
    for volume in vm.volumes:
        volume.host = target
    vm.observed_state = PowerState.STOPPED
    vm.pid = None
    vm.ready = False
    vm.interfaces = []
    vm.desired_state = PowerState.RUNNING
    vm.status_message = f"HA: restarting on {target}: {why}"
    session.add(
        Event(
            project=vm.project,
            type="vm.ha_restart",
            resource_kind="vm",
            resource_name=vm.name,
            resource_id=vm.id,
            data={"from": source, "to": target},
        )
    )
    jobs.submit(
        session,
        JobKind.VM_START,
        "vm",
        vm.name,
        target_id=vm.id,
        host=target,
        project=vm.project,
        params=VMStartParams(wait=False),
    )


def active_lease_holders(session: Session) -> int:
    """Hosts holding a lease now: `--ha` is refused where none does (a single host on SQLite)."""
    return session.scalar(select(func.count()).select_from(Host).where(Host.lease_expires_at.is_not(None))) or 0
