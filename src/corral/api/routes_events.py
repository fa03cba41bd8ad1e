"""GET /events: state changes and job steps as server-sent events, filtered by project, resource and type.

The route tails the events table by id. A commit in this process rings a bell so followers wake at once; a poll
every second covers writers in other processes (agents on other hosts writing to a shared PostgreSQL store).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from corral.api import disclosure
from corral.api.auth import Caller, viewer
from corral.api.limits import HeldStream, slots
from corral.api.state import AppState, app_state
from corral.errors import Forbidden
from corral.store import events as store_events
from corral.store.db import Store
from corral.store.models import Event

router = APIRouter(tags=["events"])
KEEPALIVE = 15.0
POLL = 1.0


class Bell:
    """Wakes every follower in this process when the store commits a change (one notifier callback per app)."""

    def __init__(self, store: Store) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        store.notifier.subscribe(self.ring)

    def ring(self) -> None:
        for loop, flag in list(self._waiters):
            loop.call_soon_threadsafe(flag.set)

    async def wait(self, timeout: float) -> None:
        flag = asyncio.Event()
        waiter = (asyncio.get_running_loop(), flag)
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(flag.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


def _bell(state: AppState) -> Bell:
    bell = getattr(state, "_event_bell", None)
    if bell is None:
        bell = Bell(state.store)
        state._event_bell = bell  # type: ignore[attr-defined]
    return bell


def event_json(row: Event) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at.isoformat(),
        "project": row.project,
        "type": row.type,
        "resource": {"kind": row.resource_kind, "name": row.resource_name, "id": row.resource_id},
        "data": row.data,
    }


def _frame(event: dict[str, Any]) -> bytes:
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event, default=str)}\n\n".encode()


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "a stream of server-sent events"}},
)
async def events(
    request: Request,
    kind: str | None = Query(None, max_length=16, description="only this kind of resource: vm, job, volume, ..."),
    resource: str | None = Query(None, max_length=63, description="only this resource (name or id)"),
    types: list[str] | None = Query(
        None, alias="type", max_length=64, description="only these types (repeatable); 'vm.' matches a prefix"
    ),
    after: int | None = Query(None, ge=0, le=2**62, description="only events with a larger id (resume point)"),
    limit: int = Query(100, ge=1, le=10000, description="without follow: how many of the latest events"),
    follow: bool = Query(False, description="keep the stream open and send new events as they happen"),
    all_projects: bool = Query(False, description="cluster-wide callers: every project's events"),
    last_event_id: str | None = Header(None, description="resume point, as browsers send it on reconnect"),
    caller: Caller = Depends(viewer),
    state: AppState = Depends(app_state),
) -> StreamingResponse:
    """Events in ``text/event-stream``: ``id`` is the event id, ``event`` its type, ``data`` the event as JSON."""
    if all_projects and not caller.principal.cluster:
        raise Forbidden("all_projects needs a cluster-wide role", "ask for one project's events")
    projects = None if all_projects else [caller.project]
    if after is None and last_event_id and last_event_id.isdigit():
        after = int(last_event_id)
    store = state.store

    # A tenant's events carry no host path (an event's data may quote a job's error).
    redact = None if disclosure.insider(request) else disclosure.roots_of(request)

    def read(since: int, count: int, newest: bool = False) -> list[dict[str, Any]]:
        # Plain dicts: the rows expire when the read-only session ends.
        with store.reading() as session:
            found = store_events.since(
                session,
                since,
                projects=projects,
                kind=kind,
                resource=resource,
                types=types,
                limit=count,
                newest=newest,
            )
            rows = [event_json(row) for row in found]
        return rows if redact is None else [disclosure.scrub_data(row, redact) for row in rows]

    def end() -> int:
        with store.reading() as session:
            return store_events.last_id(session)

    # Without a resume point: the latest ``limit`` events, or (following) only what happens from now on.
    position = after if after is not None else (await asyncio.to_thread(end) if follow else None)
    bell = _bell(state)

    async def stream() -> AsyncIterator[bytes]:
        nonlocal position
        quiet_since = time.monotonic()
        if position is None:
            for row in await asyncio.to_thread(read, 0, limit, True):
                yield _frame(row)
            return
        while True:
            rows = await asyncio.to_thread(read, position, 500 if follow else limit)
            for row in rows:
                position = row["id"]
                yield _frame(row)
            if not follow:
                return
            if rows:
                quiet_since = time.monotonic()
                continue
            if time.monotonic() - quiet_since > KEEPALIVE:
                quiet_since = time.monotonic()
                yield b": keepalive\n\n"
            if await request.is_disconnected():
                return
            await bell.wait(POLL)

    # A follower holds a connection and polls the store for as long as it stays: one of the caller's capped slots.
    release = slots(request).take(request, "event stream") if follow else (lambda: None)
    return HeldStream(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        release=release,
    )
