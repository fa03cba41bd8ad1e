"""Who is calling, in which project, with which role: one FastAPI dependency per permission level.

Every route declares exactly one of :func:`viewer`, :func:`operator`, :func:`admin` (project-scoped) or
:func:`cluster_viewer`, :func:`cluster_admin` (cluster-wide), or is listed in :data:`PUBLIC`. The RBAC matrix test
reads those declarations from the app's routes, so a new route without one fails the tests instead of being open.

Two kinds of callers exist. Requests on the daemon's unix socket come from local root (the socket is mode 0600)
and act as cluster admin with no token: :func:`trusted` marks them, in the ASGI scope, where no client can forge
it. Everything else (the HTTPS listener, a test client) must present ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Query, Request
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.api import ui_sessions
from corral.cluster import identity
from corral.cluster.identity import ROOT, Principal, Role
from corral.errors import Forbidden, NotFound, Unauthorized

LOCAL = "corral.local"
PUBLIC = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
UI_PREFIX = "/ui"  # the web console's static shell and its login routes (corral.api.routes_ui): no token needed


def is_public(path: str) -> bool:
    """Whether ``path`` is served without a caller: the listed routes, and the web console's shell."""
    return path in PUBLIC or path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def trusted(app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` for the unix-socket listener: its callers are local root, trusted as cluster admin."""

    async def local(scope: Scope, receive: Receive, send: Send) -> None:
        scope[LOCAL] = True
        await app(scope, receive, send)

    return local


@dataclass(frozen=True)
class Caller:
    """The resolved caller of a project-scoped route: who, the project the request acts in, and the role there."""

    principal: Principal
    project: str
    role: Role

    @property
    def user(self) -> str:
        return self.principal.user


def principal(connection: HTTPConnection) -> Principal:
    """The caller, resolved once per request (and remembered for the audit log)."""
    cached = connection.scope.get("corral.principal")
    if cached is not None:
        return cached
    if connection.scope.get(LOCAL):
        who = ROOT
    else:
        header = connection.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header and ui_sessions.COOKIE in connection.cookies:
            who = _from_ui_session(connection)
        elif scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized(
                "this API needs a token", "send `Authorization: Bearer <token>` (CORRAL_TOKEN for the CLI and SDK)"
            )
        else:
            state = connection.app.state.corral
            with state.store.reading() as session:
                who = identity.authenticate(session, secret.strip())
    connection.scope["corral.principal"] = who
    return who


def same_origin(connection: HTTPConnection) -> bool:
    """Whether a browser request comes from a page of this daemon: its Origin (browsers send one on every
    websocket and every unsafe request) names this very host."""
    origin = connection.headers.get("origin")
    if origin is None:
        return connection.scope["type"] == "http"  # a browser omits it only on same-origin GET/HEAD
    scheme = "https" if connection.url.scheme in ("https", "wss") else "http"
    return origin == f"{scheme}://{connection.headers.get('host', '')}"


def _from_ui_session(connection: HTTPConnection) -> Principal:
    """The caller of a web-console request, from its session cookie. A cookie rides along on any request the
    browser makes to this host, also from another site's page, so it counts only with a same-origin proof: the
    UI's custom header on plain requests (a cross-site page cannot send one without a CORS preflight, which this
    API never grants), and a matching Origin on websockets (where a page cannot set headers). The cookie is also
    SameSite=Strict, HttpOnly and Secure."""
    proven = same_origin(connection) and (
        connection.scope["type"] == "websocket" or connection.headers.get(ui_sessions.CSRF_HEADER) == "1"
    )
    if not proven:
        raise Forbidden(
            "a web-console session is accepted only from the console's own pages",
            "use the console at /ui/, or send `Authorization: Bearer <token>`",
        )
    login = ui_sessions.of(connection.app).get(connection.cookies[ui_sessions.COOKIE])
    if login is None:
        raise Unauthorized("the web-console session has ended", "log in again at /ui/")
    if login.secret is None:
        return ROOT
    state = connection.app.state.corral
    with state.store.reading() as session:
        return identity.authenticate(session, login.secret)


def resolve(connection: HTTPConnection, project: str | None, need: Role) -> Caller:
    who = principal(connection)
    name = project or who.project
    role = who.role_in(name)
    if role is not None:
        # Also for refusals: the project's audit log shows its members' refused requests. A caller with no role
        # there is recorded cluster-wide instead, so no one can write into another project's log.
        connection.scope["corral.project"] = name
    if role is None:
        raise Forbidden(f"{who.user} has no access to project {name!r}", "use a token made for that project")
    if role < need:
        raise Forbidden(
            f"this needs the {need.label} role in project {name!r}; {who.user} is {role.label}",
            "ask a project admin for a token with that role",
        )
    if name != who.project:
        state = connection.app.state.corral
        with state.store.reading() as session:
            if session.get(identity.Project, name) is None:
                raise NotFound(f"project {name!r} not found", "list projects with `corral project list`")
    return Caller(principal=who, project=name, role=role)


PROJECT_QUERY = Query(
    None,
    description="The project to act in (default: the token's project; `default` on the unix socket).",
    pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
)


def _mark(function: Any, scope: str, role: Role) -> Any:
    function.corral_permission = (scope, role)
    return function


def viewer(connection: HTTPConnection, project: str | None = PROJECT_QUERY) -> Caller:
    """Read anything in the project."""
    return resolve(connection, project, Role.VIEWER)


def operator(connection: HTTPConnection, project: str | None = PROJECT_QUERY) -> Caller:
    """Lifecycle verbs (start, stop, pause, console, snapshots, cancel) on the project's resources."""
    return resolve(connection, project, Role.OPERATOR)


def admin(connection: HTTPConnection, project: str | None = PROJECT_QUERY) -> Caller:
    """Everything in the project, creating and deleting resources included."""
    return resolve(connection, project, Role.ADMIN)


def _cluster(connection: HTTPConnection, need: Role) -> Principal:
    who = principal(connection)
    if not who.cluster:
        raise Forbidden(
            f"this needs a cluster-wide role; {who.user} is not a cluster admin",
            "use a token of a user made with `corral user create NAME --cluster-admin`",
        )
    if who.role < need:
        raise Forbidden(
            f"this needs the cluster {need.label} role; this token of {who.user} is {who.role.label}",
            "use an admin token",
        )
    return who


def cluster_viewer(connection: HTTPConnection) -> Principal:
    """Read cluster-wide state (every project, the audit log, metrics)."""
    return _cluster(connection, Role.VIEWER)


def cluster_admin(connection: HTTPConnection) -> Principal:
    """Manage projects, users and tokens."""
    return _cluster(connection, Role.ADMIN)


def authenticated(connection: HTTPConnection) -> Principal:
    """Any valid caller (what the caller may see is then filtered by the route)."""
    return principal(connection)


_mark(viewer, "project", Role.VIEWER)
_mark(operator, "project", Role.OPERATOR)
_mark(admin, "project", Role.ADMIN)
_mark(cluster_viewer, "cluster", Role.VIEWER)
_mark(cluster_admin, "cluster", Role.ADMIN)
_mark(authenticated, "any", Role.VIEWER)


def audit_identity(request: Request) -> tuple[str, str | None, str | None]:
    """(user, token id, project) of a finished request, for the audit log; 'anonymous' when none was resolved.

    A request lands in a project's log only when its caller is known and has a role in that project: an
    anonymous request (or one refused before its token was resolved) is recorded with no project, where only
    cluster admins read it, so ``?project=pb`` without a token cannot write into pb's log."""
    who: Principal | None = request.scope.get("corral.principal")
    if who is None:
        return "anonymous", None, None
    project = request.scope.get("corral.project") or request.query_params.get("project")
    if project is not None and who.role_in(project) is None:
        project = None
    return who.user, who.token_id, project  # None: a cluster-wide change (projects, users, tokens)
