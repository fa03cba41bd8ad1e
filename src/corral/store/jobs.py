"""The job queue: rows that the control plane writes and an agent claims, runs and reports on.

Claiming is a conditional UPDATE (queued -> running) so two agents can never run the same job; on PostgreSQL
the same query gains FOR UPDATE SKIP LOCKED. Every change bumps ``version`` and wakes waiters, which is how the
CLI follows progress without polling fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from corral.errors import CorralError, NotFound
from corral.spec import job_params
from corral.spec.job import JobState
from corral.spec.job_params import JobParams, SnapshotParams, VMForkParams
from corral.store import events
from corral.store.db import Store
from corral.store.models import Job, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

MAX_LOG_LINES = 200


def submit(
    session: Session,
    kind: str,
    target_kind: str,
    target_name: str,
    *,
    target_id: str | None = None,
    host: str | None = None,
    project: str = "default",
    params: JobParams | dict[str, Any] | None = None,
) -> Job:
    """Queue a job. Its parameters are checked against the kind's model (corral.spec.job_params) first: a job the
    agent could not read is refused here, with JobParamsError, rather than failing on its host later."""
    stored = job_params.validated(kind, params)
    job = Job(
        kind=kind,
        target_kind=target_kind,
        target_name=target_name,
        target_id=target_id,
        host=host,
        project=project,
        params=stored,
        message="queued",
    )
    session.add(job)
    session.flush()
    return job


def add_params(job: Job, **values: Any) -> None:
    """Add parameters to a job already written (the other half's job id, what a running half publishes), checked
    as ``submit`` checks them. The caller's session commits the change."""
    job.params = job_params.merged(job.kind, job.params or {}, values)


def get(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", "list jobs with `corral job list`")
    return job


def active_for(session: Session, target_kind: str, target_id: str) -> list[Job]:
    """Jobs on a resource that have not finished: the control plane refuses a conflicting second one."""
    rows = session.scalars(
        select(Job).where(
            Job.target_kind == target_kind,
            Job.target_id == target_id,
            Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
        )
    )
    return list(rows)


def claim(store: Store, host: str, exclude: set[str] | frozenset[str] = frozenset()) -> Job | None:
    """Take the oldest queued job for ``host``; None when there is none (or another agent won the race)."""
    with store.session() as session:
        query = select(Job.id).where(Job.state == JobState.QUEUED, Job.host == host).order_by(Job.created_at)
        if exclude:
            query = query.where(Job.id.not_in(exclude))
        if store.engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job_id = session.scalars(query.limit(1)).first()
        if job_id is None:
            return None
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(state=JobState.RUNNING, started_at=utcnow(), message="running", version=Job.version + 1)
        )
        claimed = cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor result
        job = session.get(Job, job_id) if claimed else None
        if job is not None:
            events.record(session, job)  # the UPDATE above bypassed the ORM's event hook
    store.notifier.notify()
    return job


def report(store: Store, job_id: str, progress: float | None = None, message: str | None = None) -> bool:
    """Record progress; returns True when cancellation was requested, so long work can stop early."""
    with store.session() as session:
        job = get(session, job_id)
        if progress is not None:
            job.progress = max(0.0, min(1.0, progress))
        if message is not None:
            job.message = message
            job.log = [*job.log, {"at": utcnow().isoformat(), "message": message}][-MAX_LOG_LINES:]
        job.version += 1
        cancel = job.cancel_requested
    store.notifier.notify()
    return cancel


def finish(store: Store, job_id: str, result: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
    with store.session() as session:
        job = get(session, job_id)
        job.finished_at = utcnow()
        job.version += 1
        if error is None:
            job.state = JobState.SUCCEEDED
            job.progress = 1.0
            job.message = "done"
            job.result = result
        else:
            job.state = JobState.CANCELLED if job.cancel_requested else JobState.FAILED
            job.error = error.message if isinstance(error, CorralError) else f"{type(error).__name__}: {error}"
            job.error_code = error.code if isinstance(error, CorralError) else "internal"
            job.error_hint = error.hint if isinstance(error, CorralError) else None
            job.message = job.error
            job.log = [*job.log, {"at": utcnow().isoformat(), "message": f"error: {job.error}"}][-MAX_LOG_LINES:]
    store.notifier.notify()


def request_cancel(store: Store, job_id: str) -> Job:
    """A queued job ends at once (and what the control plane made for it goes); a running one is asked to stop
    at its next progress report, and its own failure path undoes what it made."""
    with store.session() as session:
        job = get(session, job_id)
        if job.state == JobState.QUEUED:
            job.state = JobState.CANCELLED
            job.finished_at = utcnow()
            job.message = "cancelled before it started"
            discard_pending(session, job)
        elif job.state == JobState.RUNNING:
            job.cancel_requested = True
        job.version += 1
    store.notifier.notify()
    return job


def discard_pending(session: Session, job: Job) -> None:
    """Remove the rows a never-run job was to make real: nothing exists on a host for them yet."""
    from corral.store.models import VM, Image, Snapshot, Template, Volume

    def drop_vm(vm_id: str | None) -> None:
        vm = session.get(VM, vm_id) if vm_id else None
        if vm is None:
            return
        for volume in list(vm.volumes):
            if volume.state == "pending":
                session.delete(volume)
            else:
                volume.vm_id = None  # an existing volume that was to be attached
        session.delete(vm)

    if job.kind in ("vm.create", "vm.clone"):
        drop_vm(job.target_id)
    elif job.kind == "vm.fork":
        for child_id in job_params.parse(VMForkParams, job.params).child_ids:
            drop_vm(child_id)
    elif job.kind == "snapshot.create":
        snapshot = session.get(Snapshot, job_params.parse(SnapshotParams, job.params).snapshot_id)
        if snapshot is not None:
            session.delete(snapshot)
    else:
        model = {"template.create": Template, "image.build": Image, "image.import": Image, "volume.create": Volume}.get(
            job.kind
        )
        row = session.get(model, job.target_id) if model is not None and job.target_id else None
        if row is not None:
            session.delete(row)


def fail_orphans(store: Store, host: str) -> list[Job]:
    """Jobs left running by a daemon that died cannot be resumed safely; mark them failed with the reason and
    return them, so the agent can settle what each left half done."""
    with store.session() as session:
        orphans = list(
            session.scalars(select(Job).where(Job.host == host, Job.state == JobState.RUNNING).with_for_update())
        )
        for job in orphans:
            job.state = JobState.FAILED
            job.error = "the agent restarted while this job ran"
            job.error_code = "internal"
            job.finished_at = utcnow()
            job.version = job.version + 1
        session.flush()
        session.expunge_all()
    return orphans
