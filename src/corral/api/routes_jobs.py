"""Jobs: list, follow (long-poll on a version number) and cancel."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api.auth import Caller, operator, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import JobView
from corral.errors import InvalidInput, NotFound
from corral.spec.job import JobState
from corral.store import jobs
from corral.store.models import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


def resolve_job(session: Session, job_ref: str, project: str | None = None) -> Job:
    """A job by full id or by a unique prefix of at least 6 characters (as the CLI prints them); with ``project``,
    only that project's jobs are found (another project's job is as good as missing)."""
    job = session.get(Job, job_ref)
    if job is not None and (project is None or job.project == project):
        return job
    if len(job_ref) < 6 or not job_ref.isalnum():
        raise InvalidInput(f"invalid job id {job_ref!r}", "give at least the first 6 characters of its id")
    query = select(Job).where(Job.id.startswith(job_ref))
    if project is not None:
        query = query.where(Job.project == project)
    matches = session.scalars(query.limit(2)).all()
    if len(matches) != 1:
        raise NotFound(f"job {job_ref} not found", "list jobs with `corral job list`")
    return matches[0]


@router.get("", response_model=list[JobView])
def list_jobs(
    limit: int = Query(50, ge=1, le=1000),
    active: bool = False,
    caller: Caller = Depends(viewer),
    session: Session = Depends(db_session),
) -> list[JobView]:
    query = select(Job).where(Job.project == caller.project).order_by(Job.created_at.desc()).limit(limit)
    if active:
        query = query.where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    return [JobView.of(job) for job in session.scalars(query)]


@router.get("/{job_ref}", response_model=JobView)
def get_job(
    job_ref: str,
    wait: float = Query(0, ge=0, le=60),
    version: int | None = None,
    caller: Caller = Depends(viewer),
    state: AppState = Depends(app_state),
) -> JobView:
    """With ``wait``, block until the job's version differs from ``version`` or it finishes (long poll)."""
    deadline = time.monotonic() + wait
    while True:
        generation = state.store.notifier.generation
        with state.store.reading() as session:
            job = resolve_job(session, job_ref, caller.project)
            view = JobView.of(job)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or JobState(view.state).finished or (version is not None and view.version != version):
            return view
        if version is None:
            return view
        state.store.notifier.wait(generation, remaining)


@router.post("/{job_ref}/cancel", response_model=JobView)
def cancel_job(job_ref: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)) -> JobView:
    with state.store.session() as session:
        job_id = resolve_job(session, job_ref, caller.project).id
    job = jobs.request_cancel(state.store, job_id)
    if job is None:
        raise NotFound(f"job {job_ref} not found")
    return JobView.of(job)
