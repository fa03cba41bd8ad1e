"""Jobs: list, follow (long-poll on a version number) and cancel."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from corral.api import disclosure
from corral.api.auth import Caller, operator, viewer
from corral.api.limits import slots
from corral.api.state import AppState, app_state, db_session
from corral.api.views import JobView
from corral.errors import InvalidInput, NotFound
from corral.spec.job import JobState
from corral.store import jobs
from corral.store.models import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


def shown(connection: HTTPConnection, view: JobView) -> JobView:
    """The job as its caller may read it: a tenant's copy has no host path in its message, log or error (they come
    from the agent, which may quote qemu-img or the kernel naming files). The result is left as it is: it holds
    what the tenant asked for (a command's output in its own guest), which is not the host's."""
    if disclosure.insider(connection):
        return view
    roots = disclosure.roots_of(connection)
    fields = {"message": view.message, "log": view.log, "error": view.error, "error_hint": view.error_hint}
    return view.model_copy(update=disclosure.scrub_data(fields, roots))


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
    request: Request,
    limit: int = Query(50, ge=1, le=1000),
    active: bool = False,
    caller: Caller = Depends(viewer),
    session: Session = Depends(db_session),
) -> list[JobView]:
    query = select(Job).where(Job.project == caller.project).order_by(Job.created_at.desc()).limit(limit)
    if active:
        query = query.where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    return [shown(request, JobView.of(job)) for job in session.scalars(query)]


@router.get("/{job_ref}", response_model=JobView)
async def get_job(
    request: Request,
    job_ref: str,
    wait: float = Query(0, ge=0, le=60),
    version: int | None = None,
    caller: Caller = Depends(viewer),
    state: AppState = Depends(app_state),
) -> JobView:
    """With ``wait``, block until the job's version differs from ``version`` or it finishes (long poll).

    The wait is a coroutine on the store's notifier, not a worker thread: before, 45 waits of one tenant took the
    whole thread pool and every other caller's requests queued behind them. Each token may hold
    ``max_waits_per_caller`` waits at once; one more is a 429 (an answer without waiting would only turn the
    client's loop into a busy poll)."""

    def read() -> JobView:
        with state.store.reading() as session:
            return shown(request, JobView.of(resolve_job(session, job_ref, caller.project)))

    notifier = state.store.notifier
    generation = notifier.generation
    view = await asyncio.to_thread(read)
    if wait <= 0 or version is None or view.version != version or JobState(view.state).finished:
        return view
    deadline = time.monotonic() + wait
    with slots(request).hold(request, "job wait"):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return view
            await notifier.wait_async(generation, remaining)
            generation = notifier.generation
            view = await asyncio.to_thread(read)
            if view.version != version or JobState(view.state).finished:
                return view


@router.post("/{job_ref}/cancel", response_model=JobView)
def cancel_job(
    request: Request, job_ref: str, caller: Caller = Depends(operator), state: AppState = Depends(app_state)
) -> JobView:
    with state.store.session() as session:
        job_id = resolve_job(session, job_ref, caller.project).id
    job = jobs.request_cancel(state.store, job_id)
    if job is None:
        raise NotFound(f"job {job_ref} not found")
    return shown(request, JobView.of(job))
