"""The web console at /ui/: its static shell, and the login routes that turn a token into a session cookie.

Only the shell (HTML, scripts, styles) is public. Every piece of data the pages show comes from the REST API,
with the caller's own role, through the session cookie (corral.api.auth accepts it only with a same-origin
proof). These are plain Starlette routes under a mount, not API routes: they are no part of the REST API's
schema, and the RBAC matrix (which reads the API routes' permission dependencies) does not apply to them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles

from corral.api import ui_sessions
from corral.api.auth import LOCAL, UI_PREFIX, principal, same_origin
from corral.cluster import identity
from corral.errors import Forbidden, InvalidInput, NotFound

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
MAX_LOGIN_BODY = 4096


def _check_origin(request: Request) -> None:
    """Login and logout change a browser's session: only the console's own page may ask (no login CSRF)."""
    if request.headers.get(ui_sessions.CSRF_HEADER) != "1" or not same_origin(request):
        raise Forbidden("this route answers only the web console's own page", "open the console at /ui/")


def _whoami(request: Request) -> dict[str, Any]:
    who = principal(request)
    return {"user": who.user, "project": who.project, "role": who.role.label, "cluster": who.cluster}


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_LOGIN_BODY:
        raise InvalidInput("the login request is too large", 'send {"token": "..."}')
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise InvalidInput("the login request is not JSON", 'send {"token": "..."}') from exc
    if not isinstance(body, dict):
        raise InvalidInput("the login request is not a JSON object", 'send {"token": "..."}')
    return body


async def login(request: Request) -> Response:
    """POST /ui/session {"token": ...} or {"code": ...}: check it, then set the session cookie (never a URL)."""
    _check_origin(request)
    body = await _body(request)
    sessions = ui_sessions.of(request.app)
    token, code = body.get("token"), body.get("code")
    if isinstance(code, str) and code:
        if not sessions.redeem(code):
            raise Forbidden("this login link is spent or expired", "run `corral ui` again for a new one")
        secret: str | None = None
        who = identity.ROOT
    elif isinstance(token, str) and token.strip():
        secret = token.strip()
        state = request.app.state.corral

        def check() -> identity.Principal:
            with state.store.reading() as session:
                return identity.authenticate(session, secret)

        who = await asyncio.to_thread(check)
    else:
        raise InvalidInput("token: a token is needed to log in", "paste a token made with `corral token create`")
    request.scope["corral.principal"] = who  # the audit log records who logged in
    response = JSONResponse({"user": who.user, "project": who.project, "role": who.role.label, "cluster": who.cluster})
    response.set_cookie(
        ui_sessions.COOKIE,
        sessions.open(secret),
        max_age=int(ui_sessions.SESSION_TTL),
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


async def whoami(request: Request) -> Response:
    """GET /ui/session: who the session (or bearer token) is: the pages hide what that role cannot do."""
    return JSONResponse(await asyncio.to_thread(_whoami, request))


async def logout(request: Request) -> Response:
    """DELETE /ui/session: forget the session here and in the browser."""
    _check_origin(request)
    session_id = request.cookies.get(ui_sessions.COOKIE)
    if session_id:
        ui_sessions.of(request.app).close(session_id)
    response = Response(status_code=204)
    response.delete_cookie(ui_sessions.COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


async def link(request: Request) -> Response:
    """POST /ui/link: a one-time login code for local root (`corral ui`), and the console's address. Only the unix
    socket's caller (root on this host) may mint one."""
    if not request.scope.get(LOCAL):
        raise Forbidden("login links are made only on the daemon's unix socket", "run `corral ui` on the host")
    listen = getattr(request.app.state, "listen", None)
    if not listen:
        raise NotFound(
            "the daemon serves no HTTPS listener for a browser",
            "restart it with `corral serve --listen 127.0.0.1:8443`",
        )
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    code = ui_sessions.of(request.app).new_code()
    # The code rides in the fragment: browsers never send it to a server, so no access log ever holds it.
    return JSONResponse(
        {"url": f"https://{host}:{port}{UI_PREFIX}/#code={code}", "expires_in": int(ui_sessions.LINK_TTL)}
    )


async def to_shell(request: Request) -> Response:
    return RedirectResponse(f"{UI_PREFIX}/", status_code=308)


class Shell(StaticFiles):
    """The static files, with headers that keep the pages from being framed or sniffed, and a tight CSP: the
    pages load only their own scripts and talk only to this daemon."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: Any) -> None:
    """Mount the console on ``app`` (both listeners serve it). A bare router, not an app, so that its routes see
    the API's app (its state, its error handlers: refusals are the API's problem bodies)."""
    ui_sessions.of(app)  # made now, not raced for by the first requests' threads
    ui = Router(
        routes=[
            Route("/session", login, methods=["POST"]),
            Route("/session", whoami, methods=["GET"]),
            Route("/session", logout, methods=["DELETE"]),
            Route("/link", link, methods=["POST"]),
            Mount("/", app=Shell(directory=STATIC, html=True, check_dir=False)),
        ]
    )
    app.add_route(UI_PREFIX, to_shell, methods=["GET"], include_in_schema=False)
    app.mount(UI_PREFIX, ui)
