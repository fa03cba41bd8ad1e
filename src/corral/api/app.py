"""The FastAPI application: routes, and errors as RFC 9457 problem bodies."""

from __future__ import annotations

import logging
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from corral import __version__
from corral.api import (
    disclosure,
    routes_admin,
    routes_backups,
    routes_clones,
    routes_console,
    routes_events,
    routes_hosts,
    routes_jobs,
    routes_moves,
    routes_networks,
    routes_pool,
    routes_replication,
    routes_resize,
    routes_snapshots,
    routes_storage,
    routes_uploads,
    routes_vms,
)
from corral.api.audit import note_problem
from corral.api.auth import LOCAL, cluster_viewer
from corral.api.limits import CallerSlots, RequestLimits
from corral.api.state import AppState, db_session
from corral.api.views import HostView
from corral.cluster import placement
from corral.config import Settings
from corral.errors import AlreadyExists, CorralError, InvalidInput, Timeout
from corral.store.db import Store, StoreUnavailable
from corral.store.models import Host

PROBLEM = "application/problem+json"
log = logging.getLogger("corral.api")


def _problem(error: CorralError, request: Request | None = None) -> JSONResponse:
    """The problem body, as ``request``'s caller may read it (corral.api.disclosure: no host path or host
    figure for a tenant)."""
    shown = disclosure.for_caller(request, error) if request is not None else error
    return JSONResponse(shown.to_problem(), status_code=shown.http_status, media_type=PROBLEM)


async def corral_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CorralError)
    shown = disclosure.for_caller(request, exc)
    note_problem(request, shown.message)  # a project's admins read its audit log: what the caller was told
    return _problem(shown)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    note_problem(request, f"invalid request: {message}")
    return _problem(InvalidInput(f"invalid request: {message}", "see the API schema at /docs"), request)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug still answers in the API's own format, and leaves a traceback in the daemon's log. Two database
    outcomes are not bugs: a store too busy to answer in time, and a concurrent request that made the same
    thing first."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    if isinstance(exc, IntegrityError):
        return _problem(
            AlreadyExists(
                "another request made the same resource at the same moment", "list it, or choose another name"
            )
        )
    if isinstance(exc, OperationalError):
        log.warning("store error: %s", exc)
        if exc.connection_invalidated or "connection" in str(exc.orig).lower():
            # The server is down or restarting: the pool's pre-ping replaces dead connections once it is back.
            return _problem(
                StoreUnavailable(
                    "cannot reach the store; nothing was changed",
                    "check that the database server runs; try again once it does",
                )
            )
        busy = Timeout("the store is busy; nothing was changed", "try again in a moment")
        busy.http_status = 503
        return _problem(busy)
    # The detail goes to the daemon's log under an id; a remote caller gets the id alone (an exception's text
    # may carry host paths, sizes or another project's names).
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error %s in %s %s", error_id, request.method, request.url.path, exc_info=exc)
    if request.scope.get(LOCAL):
        return _problem(CorralError(f"internal error {error_id}: {type(exc).__name__}: {exc}", "see the daemon's log"))
    return _problem(CorralError(f"internal error, id {error_id}", "see the daemon's log (the administrator's)"))


def create_app(settings: Settings, store: Store) -> FastAPI:
    app = FastAPI(
        title="corral",
        version=__version__,
        description="Virtual machines on QEMU. Every verb that changes something returns the job that does it.",
    )
    app.state.corral = AppState(settings=settings, store=store)
    app.add_exception_handler(CorralError, corral_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    # Innermost of the middlewares (added first), so the audit log and the metrics see what it refuses.
    app.add_middleware(RequestLimits, settings=settings)
    app.state.caller_slots = CallerSlots(settings.max_waits_per_caller)
    from corral.api import metrics

    metrics.install(app, store)
    from corral.api import audit

    audit.install(app, store)
    app.include_router(routes_vms.router)
    app.include_router(routes_console.router)
    app.include_router(routes_snapshots.router)
    app.include_router(routes_backups.router)
    app.include_router(routes_clones.router)
    app.include_router(routes_storage.router)
    app.include_router(routes_uploads.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_hosts.router)
    app.include_router(routes_moves.router)
    placement.configure(settings.placement_strategy, settings.host_timeout)
    app.include_router(routes_admin.router)
    app.include_router(routes_events.router)
    app.include_router(routes_networks.router)
    app.include_router(routes_resize.router)
    app.include_router(routes_pool.router)
    app.include_router(routes_replication.router)
    from corral.cluster import plans

    plans.configure(settings.standby_command, settings.wake_command)
    from corral.api import routes_ui

    routes_ui.install(app)  # the web console at /ui/

    @app.get("/health", tags=["host"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    # Hosts' capacity, addresses and bridges are the operators' business, not a tenant's (docs/networking.md).
    @app.get("/hosts", response_model=list[HostView], tags=["host"], dependencies=[Depends(cluster_viewer)])
    def list_hosts(session: Session = Depends(db_session)) -> list[HostView]:
        view = placement.load_pool(session)  # three queries, however many hosts
        return [
            HostView.of(
                host,
                allocated_cpus=view[host.name].cpus_alloc,
                allocated_memory=view[host.name].memory_alloc,
                allocated_storage=view[host.name].storage_alloc,
                vms=view[host.name].vms,
            )
            for host in session.query(Host).order_by(Host.name)
        ]

    return app
