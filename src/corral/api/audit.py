"""The audit log: every request that may change something (any method but GET/HEAD/OPTIONS), with who made it,
from where, in which project, and how it ended, refusals included.

It is written by a middleware after the response is known, in its own transaction: a failed or refused request
changes nothing else, yet must still be recorded. The route's project and the caller are read from the ASGI scope,
where corral.api.auth left them; a problem's detail is left there by the app's error handlers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from corral.api.auth import LOCAL, audit_identity
from corral.store.db import Store
from corral.store.models import AuditEntry

log = logging.getLogger("corral.audit")
READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})
PROBLEM = "corral.problem"


def note_problem(request: Request, detail: str) -> None:
    """Called by the error handlers so the audit entry says why a request failed."""
    request.scope[PROBLEM] = detail


def _write(store: Store, entry: AuditEntry) -> None:
    try:
        with store.session() as session:
            session.add(entry)
    except Exception as exc:  # the answer is already decided; losing one entry must not turn it into a 500
        log.error("could not write an audit entry for %s %s: %s", entry.method, entry.path, exc)


def install(app: FastAPI, store: Store) -> None:
    @app.middleware("http")
    async def audit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.method in READ_ONLY:
            return await call_next(request)
        status, failure = 500, None
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        except Exception as exc:
            failure = f"internal error: {type(exc).__name__}"
            raise
        finally:
            user, token_id, project = audit_identity(request)
            route = request.scope.get("route")
            result = "ok" if status < 400 else (request.scope.get(PROBLEM) or failure or f"HTTP {status}")
            client = request.client
            entry = AuditEntry(
                user=user,
                token_id=token_id,
                source="unix socket" if request.scope.get(LOCAL) else (client.host if client else ""),
                project=project,
                method=request.method,
                path=str(request.url.path)[:2000],
                action=f"{request.method} {getattr(route, 'path', request.url.path)}"[:128],
                status=status,
                result=str(result)[:2000],
            )
            await asyncio.to_thread(_write, store, entry)
