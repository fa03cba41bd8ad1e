"""The schedule runner against the store (SQLite and PostgreSQL): one firing per due schedule however many control
planes pass at once, pruning by delete jobs children first, and where a job reading a backup runs."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from corral.cluster import backup_schedules, backups
from corral.errors import InvalidInput, NotFound
from corral.spec.job import JobKind
from corral.store.db import Store
from corral.store.models import VM, Backup, BackupSchedule, Event, Host, Job, utcnow


@pytest.fixture
def vm(store, host):  # type: ignore[no-untyped-def]
    with store.session() as session:
        row = VM(
            name="web",
            spec={"name": "web", "image": "tiny"},
            host=host,
            desired_state="stopped",
            observed_state="stopped",
        )
        session.add(row)
        session.flush()
        return row.id


def _due(store: Store, every: float = 60, **policy: int) -> str:
    with store.session() as session:
        row = backup_schedules.set_schedule(session, "web", every, minimum=1, **policy)
        row.next_at = utcnow() - timedelta(seconds=1)
        return row.id


def _jobs(store: Store, kind: str) -> list[Job]:
    with store.session() as session:
        return list(session.scalars(select(Job).where(Job.kind == kind)))


def test_several_control_planes_fire_a_due_schedule_once(store, vm):  # type: ignore[no-untyped-def]
    schedule_id = _due(store)
    planes = [Store(store.url) for _ in range(4)]
    try:
        barrier = threading.Barrier(len(planes))
        now = utcnow()

        def plane(other: Store) -> None:
            barrier.wait()
            backup_schedules.run_once(other, now)

        threads = [threading.Thread(target=plane, args=(p,)) for p in planes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for other in planes:
            other.close()
    created = _jobs(store, JobKind.BACKUP_CREATE)
    assert len(created) == 1
    with store.session() as session:
        schedule = session.get(BackupSchedule, schedule_id)
        assert schedule.next_at > utcnow() + timedelta(seconds=50)
        assert schedule.last_job_id == created[0].id
        backup = session.get(Backup, created[0].params["backup_id"])
        assert backup.schedule_id == schedule_id and backup.kind == "full"
        fired = session.scalars(select(Event).where(Event.type == "backup.scheduled")).all()
        assert [(e.resource_name, e.data["job"]) for e in fired] == [(backup.name, created[0].id)]
    # Not due any more: another pass does nothing.
    assert backup_schedules.run_once(store) == 0


def test_pruning_deletes_children_first_and_once(store, vm):  # type: ignore[no-untyped-def]
    schedule_id = _due(store, keep_last=1, keep_daily=0, keep_weekly=0)
    with store.session() as session:
        session.get(BackupSchedule, schedule_id).next_at = utcnow() + timedelta(hours=1)
        start = utcnow() - timedelta(hours=5)
        parent = None
        for index, kind in enumerate(["full", "incremental", "incremental", "full"]):
            row = Backup(
                name=f"b{index}",
                vm_name="web",
                vm_id=vm,
                host="h1",
                kind=kind,
                state="ready",
                spec={},
                parent_id=parent if kind == "incremental" else None,
                schedule_id=schedule_id,
                created_at=start + timedelta(hours=index),
            )
            session.add(row)
            session.flush()
            parent = row.id
    assert backup_schedules.run_once(store) == 1  # only the leaf b2 of the old chain: b1 and b0 build under it
    assert backup_schedules.run_once(store) == 0  # b2's delete job is still queued: nothing twice
    deletes = _jobs(store, JobKind.BACKUP_DELETE)
    assert [j.target_name for j in deletes] == ["b2"]
    with store.session() as session:
        pruned = session.scalars(select(Event).where(Event.type == "backup.pruned")).all()
        assert [e.resource_name for e in pruned] == ["b2"]
    # The agent deletes b2; the next pass takes b1, then b0; b3 (the newest) stays.
    for expected in ("b1", "b0"):
        with store.session() as session:
            done = session.scalars(select(Backup).where(Backup.name == ("b2" if expected == "b1" else "b1"))).one()
            session.delete(done)
            for job in session.scalars(select(Job).where(Job.kind == JobKind.BACKUP_DELETE)):
                job.state = "succeeded"
        assert backup_schedules.run_once(store) == 1
        assert _jobs(store, JobKind.BACKUP_DELETE)[-1].target_name == expected


def test_a_schedule_whose_vm_is_gone_goes(store, vm):  # type: ignore[no-untyped-def]
    _due(store)
    with store.session() as session:
        session.delete(session.get(VM, vm))
    backup_schedules.run_once(store)
    with store.session() as session:
        assert backup_schedules.list_schedules(session, "default") == []


def test_bad_schedules_write_nothing(store, vm):  # type: ignore[no-untyped-def]
    with store.session() as session, pytest.raises(InvalidInput):
        backup_schedules.set_schedule(session, "web", "0s", minimum=1)
    with store.session() as session, pytest.raises(NotFound):
        backup_schedules.set_schedule(session, "ghost", "1h", minimum=1)
    with store.session() as session, pytest.raises(InvalidInput):
        backup_schedules.set_schedule(session, "web", 30, minimum=60)
    with store.session() as session:
        assert backup_schedules.list_schedules(session, "default") == []


def test_a_backup_on_a_shared_directory_is_read_where_it_is_seen(store, host):  # type: ignore[no-untyped-def]
    """The writer while it is online; else an online host reporting the same backup directory identity."""
    with store.session() as session:
        writer = session.scalars(select(Host).where(Host.name == host)).one()
        writer.usage = {"backup_store": "a" * 32}
        session.add(Host(name="h2", usage={"backup_store": "a" * 32}))
        session.add(Host(name="h3", usage={"backup_store": "b" * 32}))
        backup = Backup(name="b", vm_name="web", vm_id="x", host=host, spec={}, state="ready", backup_store="a" * 32)
        session.add(backup)
        session.flush()
        assert backups.reader_host(session, backup) == host
        writer.heartbeat_at = utcnow() - timedelta(hours=1)
        session.flush()
        assert backups.reader_host(session, backup) == "h2"
        backup.backup_store = "c" * 32  # nobody else sees it: the job waits for its writer
        assert backups.reader_host(session, backup) == host


def test_an_incremental_that_cannot_be_taken_becomes_a_full_one(store, vm):  # type: ignore[no-untyped-def]
    """The newest backup has a disk the VM no longer has: an incremental on it is refused, so the schedule takes a
    full one rather than retrying the refused incremental forever."""
    _due(store, incremental_every=3)
    with store.session() as session:
        session.add(
            Backup(
                name="old",
                vm_name="web",
                vm_id=vm,
                host="h1",
                kind="full",
                state="ready",
                spec={},
                disks=[{"index": 0, "file": "x/disk0.qcow2", "size": 1}],
            )
        )
    assert backup_schedules.run_once(store) == 1
    (job,) = _jobs(store, JobKind.BACKUP_CREATE)
    with store.session() as session:
        assert session.get(Backup, job.params["backup_id"]).kind == "full"
        assert session.scalars(select(BackupSchedule)).one().last_error is None


def test_the_runner_sleeps_while_nothing_is_due_and_a_new_schedule_wakes_it(store, vm, monkeypatch):  # type: ignore[no-untyped-def]
    """Issue 17: no pass a second while there is no schedule; setting one wakes the runner through the store's
    notifier, and it fires at once rather than at the next poll."""
    passes: list[float] = []
    real_run_once = backup_schedules.run_once

    def counted(other: Store, now=None) -> int:  # type: ignore[no-untyped-def]
        passes.append(time.monotonic())
        return real_run_once(other, now)

    monkeypatch.setattr(backup_schedules, "run_once", counted)
    runner = backup_schedules.ScheduleRunner(store)
    runner.start()
    try:
        idle = threading.Event()
        idle.wait(2.5)  # the old runner made a pass every second here
        assert passes == []
        set_at = time.monotonic()
        _due(store)
        generation = store.notifier.generation
        deadline = set_at + 30
        while not _jobs(store, JobKind.BACKUP_CREATE) and time.monotonic() < deadline:
            generation = store.notifier.wait(generation, deadline - time.monotonic())
        assert len(_jobs(store, JobKind.BACKUP_CREATE)) == 1
        assert passes and passes[0] - set_at < 5
    finally:
        runner.stop()
