"""Backup schedules: periodic backups of a VM and the retention that prunes them (docs/backups.md).

A schedule is a row in the store. Every control plane runs a ``ScheduleRunner`` thread that, when one is due or the
store changed (at most once a second), looks for schedules that are due or have backups to prune; before acting on
one it claims the row with a conditional UPDATE of its ``version`` (as job claims do), so in a pool with several
control planes exactly one of them fires a schedule, and a control plane that dies mid-pass leaves nothing half
claimed. Firing submits an ordinary backup job (full, or incremental on the VM's newest backup); the agent of the
VM's host runs it.

Retention (``prune``) is a pure function of the backups' times and parents. It only ever deletes a schedule's own
backups, never a backup anything kept (or being made) builds on: a full with live incrementals stays until they go,
so pruning never breaks a chain. Deletion is newest first, one layer per pass (a parent goes once its last child
is gone), each an ordinary backup delete job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from corral.cluster import backups
from corral.cluster.vm_rows import get_vm
from corral.errors import AlreadyExists, Conflict, CorralError, InvalidInput, NotFound
from corral.spec.backup import parse_duration
from corral.spec.job import JobKind, JobState
from corral.spec.job_params import BackupOfVMParams, BackupParams, parse
from corral.store import events, jobs
from corral.store.db import Store
from corral.store.models import VM, Backup, BackupSchedule, Job, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between the runner's passes: a schedule fires at most this late
RETRY_AFTER = 5.0  # a firing that could not start (the VM busy, say with the previous backup) is retried this soon
MAX_KEEP = 10_000


# -- retention: a pure function ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """What retention needs to know of one backup. ``candidate``: the schedule's own, ready and idle, so it may
    be pruned; every other backup (taken by hand, still being made, being deleted) only protects its ancestors."""

    id: str
    parent_id: str | None
    created_at: datetime
    candidate: bool = True


def keep_by_policy(items: Iterable[Item], keep_last: int, keep_daily: int, keep_weekly: int) -> set[str]:
    """The candidates retention keeps for their own sake: the ``keep_last`` newest, the newest of each of the
    ``keep_daily`` newest UTC days that have one, and likewise per ISO week. The rules add up (a backup kept by
    several counts once); days and weeks are those of the backups, so a pause does not empty the history."""
    newest_first = sorted((i for i in items if i.candidate), key=lambda i: i.created_at, reverse=True)
    kept = {i.id for i in newest_first[:keep_last]}
    for count, bucket in ((keep_daily, _day), (keep_weekly, _week)):
        seen: set[tuple[int, ...]] = set()
        for item in newest_first:
            if len(seen) >= count:
                break
            key = bucket(item.created_at)
            if key not in seen:
                seen.add(key)
                kept.add(item.id)
    return kept


def prune(items: Iterable[Item], keep_last: int, keep_daily: int, keep_weekly: int) -> list[str]:
    """The ids to delete, newest first (children before their parents). Kept: what the policy keeps, every
    non-candidate, and every ancestor of anything kept, so no remaining backup ever loses its base."""
    items = list(items)
    by_id = {i.id: i for i in items}
    kept = keep_by_policy(items, keep_last, keep_daily, keep_weekly) | {i.id for i in items if not i.candidate}
    for item_id in list(kept):
        parent = by_id[item_id].parent_id
        while parent is not None and parent not in kept:
            kept.add(parent)
            parent = by_id[parent].parent_id if parent in by_id else None
    doomed = [i for i in items if i.candidate and i.id not in kept]
    return [i.id for i in sorted(doomed, key=lambda i: i.created_at, reverse=True)]


def _day(moment: datetime) -> tuple[int, ...]:
    return (moment.year, moment.month, moment.day)


def _week(moment: datetime) -> tuple[int, ...]:
    year, week, _ = moment.isocalendar()
    return (year, week)


# -- the verbs --------------------------------------------------------------------------------------------------


def check_policy(
    every: float, keep_last: int, keep_daily: int, keep_weekly: int, incremental_every: int, minimum: float
) -> None:
    """Refuse a schedule that would fire too often or keep nothing (its backups would go as they are made)."""
    if every < minimum:
        raise InvalidInput(
            f"a schedule of {every:g} s is shorter than the minimum of {minimum:g} s",
            "give a longer --every, e.g. 1h (the minimum is the backup_min_interval setting)",
        )
    for flag, value in (
        ("--keep-last", keep_last),
        ("--keep-daily", keep_daily),
        ("--keep-weekly", keep_weekly),
        ("--incremental-every", incremental_every),
    ):
        if not 0 <= value <= MAX_KEEP:
            raise InvalidInput(f"{flag} {value} is out of range", f"give 0 to {MAX_KEEP}")
    if keep_last == keep_daily == keep_weekly == 0:
        raise InvalidInput(
            "a retention that keeps nothing would delete every backup as soon as it is made",
            "give at least one of --keep-last, --keep-daily, --keep-weekly",
        )


def set_schedule(
    session: Session,
    vm_name: str,
    every: str | float,
    keep_last: int = 24,
    keep_daily: int = 7,
    keep_weekly: int = 4,
    incremental_every: int = 0,
    project: str = "default",
    minimum: float = 60.0,
) -> BackupSchedule:
    """Make or replace a VM's schedule; its first backup is due one interval from now."""
    seconds = parse_duration(every) if isinstance(every, str) else float(every)
    check_policy(seconds, keep_last, keep_daily, keep_weekly, incremental_every, minimum)
    vm = get_vm(session, vm_name, project)
    row = session.scalars(
        select(BackupSchedule).where(BackupSchedule.project == project, BackupSchedule.vm_name == vm.name)
    ).first()
    if row is None:
        row = BackupSchedule(project=project, vm_name=vm.name, vm_id=vm.id, version=0)
        session.add(row)
    elif row.vm_id != vm.id:
        raise AlreadyExists(
            f"a schedule for an older VM named {vm_name} exists",
            f"remove it first: `corral backup schedule rm {vm_name}`",
        )
    row.every, row.keep_last, row.keep_daily, row.keep_weekly = seconds, keep_last, keep_daily, keep_weekly
    row.incremental_every = incremental_every
    row.next_at = utcnow() + timedelta(seconds=seconds)
    row.last_error = None
    session.flush()
    return row


def list_schedules(session: Session, project: str) -> list[BackupSchedule]:
    return list(
        session.scalars(
            select(BackupSchedule).where(BackupSchedule.project == project).order_by(BackupSchedule.vm_name)
        )
    )


def get_schedule(session: Session, vm_name: str, project: str = "default") -> BackupSchedule:
    row = session.scalars(
        select(BackupSchedule).where(BackupSchedule.project == project, BackupSchedule.vm_name == vm_name)
    ).first()
    if row is None:
        raise NotFound(f"VM {vm_name} has no backup schedule", "list them with `corral backup schedule list`")
    return row


def remove_schedule(session: Session, vm_name: str, project: str = "default") -> None:
    """The schedule goes; its backups stay (delete them with `corral backup delete`)."""
    session.delete(get_schedule(session, vm_name, project))


def verify(session: Session, vm_name: str, name: str, project: str = "default") -> Job:
    """A job on a host that sees the backup's directory: reads the chain back and records the outcome."""
    backup = backups.get_backup(session, vm_name, name, project)
    if backup.state != "ready":
        raise Conflict(f"backup {name} of {vm_name} is {backup.state}", "wait for its job to finish")
    if jobs.active_for(session, "backup", backup.id):
        raise Conflict(f"backup {name} of {vm_name} is busy", "wait for its job to finish")
    return jobs.submit(
        session,
        JobKind.BACKUP_VERIFY,
        "backup",
        name,
        target_id=backup.id,
        host=backups.reader_host(session, backup),
        project=project,
        params=BackupOfVMParams(vm=vm_name),
    )


# -- the runner -------------------------------------------------------------------------------------------------


def _items(session: Session, schedule: BackupSchedule) -> list[Item]:
    rows = session.scalars(select(Backup).where(Backup.vm_id == schedule.vm_id)).all()
    busy = set(
        session.scalars(
            select(Job.target_id).where(Job.target_kind == "backup", Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        )
    )
    return [
        Item(b.id, b.parent_id, b.created_at, b.schedule_id == schedule.id and b.state == "ready" and b.id not in busy)
        for b in rows
    ]


def _deletable_now(session: Session, schedule: BackupSchedule) -> list[Backup]:
    """The prunable backups with no child left: this pass deletes them, the next their parents."""
    items = _items(session, schedule)
    doomed = prune(items, schedule.keep_last, schedule.keep_daily, schedule.keep_weekly)
    parents = {i.parent_id for i in items}
    return [row for row_id in doomed if row_id not in parents and (row := session.get(Backup, row_id)) is not None]


def _fire(session: Session, schedule: BackupSchedule, now: datetime) -> None:
    """Submit the schedule's next backup: incremental on the VM's newest ready backup while that chain holds fewer
    than ``incremental_every`` incrementals and the schedule's last backup job succeeded, else full."""
    last_job = session.get(Job, schedule.last_job_id) if schedule.last_job_id else None
    newest = session.scalars(
        select(Backup).where(Backup.vm_id == schedule.vm_id, Backup.state == "ready").order_by(Backup.created_at.desc())
    ).first()
    incremental = (
        schedule.incremental_every > 0
        and newest is not None
        and (last_job is None or last_job.state != JobState.FAILED)
        and len(backups.chain(session, newest)) - 1 < schedule.incremental_every
    )
    try:
        job = backups.create(session, schedule.vm_name, None, incremental, schedule.project)
    except Conflict:
        if not incremental:
            raise
        # The newest backup cannot carry one (a disk was added since, say): a full one starts a new chain. A VM
        # that is busy refuses this one too, and the pass retries later.
        job = backups.create(session, schedule.vm_name, None, False, schedule.project)
    row = session.get(Backup, parse(BackupParams, job.params).backup_id)
    if row is not None:
        row.schedule_id = schedule.id
        session.add(
            events.make(
                session, row, "backup", "backup.scheduled", {"vm": schedule.vm_name, "kind": row.kind, "job": job.id}
            )
        )
    schedule.last_job_id, schedule.last_at, schedule.last_error = job.id, now, None


def run_once(store: Store, now: datetime | None = None) -> int:
    """One pass over every schedule: fire the due ones, prune the rest. Returns how many jobs were submitted."""
    now = now or utcnow()
    submitted = 0
    with store.session() as session:
        seen = [(s.id, s.version) for s in session.scalars(select(BackupSchedule))]
    for schedule_id, version in seen:
        try:
            submitted += _pass(store, schedule_id, version, now)
        except Exception as exc:  # one schedule's trouble (or a store hiccup) must not stop the others
            log.warning("backup schedule pass failed: %s", exc)
    return submitted


def _pass(store: Store, schedule_id: str, version: int, now: datetime) -> int:
    with store.session() as session:
        schedule = session.get(BackupSchedule, schedule_id)
        if schedule is None:
            return 0
        vm = session.get(VM, schedule.vm_id)
        due = schedule.next_at <= now
        if not due and vm is not None and not _deletable_now(session, schedule):
            return 0
        result = session.execute(
            update(BackupSchedule)
            .where(BackupSchedule.id == schedule_id, BackupSchedule.version == version)
            .values(version=version + 1)
        )
        claimed = cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor result
        if claimed != 1:
            session.rollback()
            return 0  # another control plane has it
        session.refresh(schedule)
        if vm is None:  # the VM is gone: its schedule goes, its backups stay
            session.delete(schedule)
            return 0
        submitted = 0
        for backup in _deletable_now(session, schedule):  # again: what we read before the claim may be stale
            try:  # its refusals come before it writes anything
                job = backups.delete(session, backup.vm_name, backup.name, backup.project)
                session.add(
                    events.make(session, backup, "backup", "backup.pruned", {"vm": backup.vm_name, "job": job.id})
                )
                submitted += 1
            except CorralError as exc:
                log.warning("cannot prune backup %s of %s: %s", backup.name, backup.vm_name, exc.message)
        if due:
            try:  # every refusal of backups.create comes before it writes anything
                _fire(session, schedule, now)
                schedule.next_at = now + timedelta(seconds=schedule.every)
                submitted += 1
            except CorralError as exc:
                schedule.last_error = exc.message
                schedule.next_at = now + timedelta(seconds=min(schedule.every, RETRY_AFTER))
    return submitted


class ScheduleRunner:
    """The control plane's thread that runs ``run_once`` when a schedule is due or the store changed.

    It does not poll: with no schedule it sleeps until the store notifier says something was written (a schedule
    added, say); with schedules it sleeps until the earliest ``next_at`` (one query) or such a wake-up, since a
    finished backup or job may leave something to prune. Wake-ups are taken at most once per ``tick``, so a busy
    store costs no more than the old once-a-second pass, and an idle one nothing; ``IDLE_CHECK`` bounds a sleep
    (retention by day and week moves with the clock alone)."""

    IDLE_CHECK = 60.0

    def __init__(self, store: Store, tick: float = TICK) -> None:
        self.store = store
        self.tick = tick
        self._stop = threading.Event()
        self._kick = threading.Event()  # set by every store change (a notifier callback) and by stop()
        self._thread = threading.Thread(target=self._run, name="corral-backup-schedules", daemon=True)

    def start(self) -> None:
        self.store.notifier.subscribe(self._kick.set)
        self._thread.start()

    def _earliest(self) -> datetime | None:
        """The earliest ``next_at`` of all schedules, None when there is none."""
        from sqlalchemy import func

        with self.store.reading() as session:
            return session.scalar(select(func.min(BackupSchedule.next_at)))

    def _sleep(self, seconds: float, since: int) -> int:
        """Wait up to ``seconds`` for a store change after generation ``since``, or for stop; the new generation."""
        notifier = self.store.notifier
        deadline = time.monotonic() + max(0.0, seconds)
        while not self._stop.is_set():
            self._kick.clear()  # before reading the generation: a change after this read sets it again
            generation = notifier.generation
            if generation != since:
                return generation
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # One wait for a change or stop(), not a wake-up every second to look for either.
            self._kick.wait(left)
        return notifier.generation

    def _run(self) -> None:
        generation = self.store.notifier.generation
        while not self._stop.is_set():
            started = time.monotonic()
            timeout = self.IDLE_CHECK
            try:
                earliest = self._earliest()
                if earliest is not None:
                    run_once(self.store)
                    earliest = self._earliest()
                    if earliest is not None:
                        due_in = (earliest - utcnow()).total_seconds()
                        timeout = min(self.IDLE_CHECK, max(self.tick, due_in))
            except Exception as exc:  # the store may be restarting; the next pass tries again
                log.warning("backup schedules pass failed: %s", exc)
                timeout = self.tick
            generation = self._sleep(timeout, generation)
            # A wake-up sooner than a tick after the last pass waits out the rest of the tick (a burst of writes).
            rest = self.tick - (time.monotonic() - started)
            if rest > 0 and self._stop.wait(rest):
                return
            generation = self.store.notifier.generation

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread.is_alive():
            self._thread.join(5)
