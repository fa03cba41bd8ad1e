"""Access control against the real daemon over HTTPS: the RBAC matrix over every route of the app, project
isolation, quotas, token revocation and expiry, TLS, and the audit log."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from corral.cluster.identity import Role

pytestmark = pytest.mark.integration

ROLES = ("viewer", "operator", "admin")


# -- the routes, and the permission each declares ----------------------------------------------------------------


def _app_routes() -> list[APIRoute]:
    """The app's routes, from the same code the daemon runs (built on a throw-away store)."""
    import tempfile
    from pathlib import Path

    from corral.api.app import create_app
    from corral.config import Settings
    from corral.store.db import Store

    directory = Path(tempfile.mkdtemp(prefix="corral-routes-"))
    store = Store(f"sqlite:///{directory / 'routes.db'}")
    app = create_app(Settings(home=directory), store)
    store.close()
    found: list[APIRoute] = []

    def walk(routes: list[Any], prefix: str = "") -> None:
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route if not prefix else route.__class__(prefix + route.path, route.endpoint))
            elif hasattr(route, "original_router"):  # FastAPI >= 0.16x includes routers lazily
                walk(route.original_router.routes, prefix + route.include_context.prefix)
            elif hasattr(route, "routes"):
                walk(route.routes, prefix)

    walk(app.routes)
    return found


def permission(route: APIRoute) -> set[tuple[str, Role]]:
    """Every permission dependency a route declares (corral.api.auth marks them), anywhere in its tree."""
    found: set[tuple[str, Role]] = set()
    stack = list(route.dependant.dependencies)
    while stack:
        dependant = stack.pop()
        marked = getattr(dependant.call, "corral_permission", None)
        if marked:
            found.add(marked)
        stack.extend(dependant.dependencies)
    return found


ROUTES = _app_routes()
CASES = [(method, route) for route in ROUTES for method in sorted(route.methods) if route.path != "/health"]


def _id(case: tuple[str, APIRoute]) -> str:
    return f"{case[0]} {case[1].path}"


def _path(route: APIRoute, names: dict[str, str] | None = None) -> str:
    """The route's path with its parameters filled: ``names`` maps a resource kind to a name, others are ghosts."""
    names = names or {}
    kind = _kind(route)

    def fill(match: re.Match[str]) -> str:
        param = match.group(1)
        if param == "vm_name":
            return names.get("vm", "ghost-vm")
        if param == "job_ref":
            return names.get("job", "ghost0000ab")
        if param == "name" and kind in names:
            return names[kind]
        return f"ghost-{param.replace('_', '-')}"

    return re.sub(r"\{(\w+)\}", fill, route.path)


def _kind(route: APIRoute) -> str:
    first = route.path.strip("/").split("/")[0]
    return {"vms": "vm", "volumes": "volume", "jobs": "job", "projects": "project"}.get(first, first)


def _call(client: httpx.Client, method: str, path: str, **params: Any) -> httpx.Response:
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, path, params=params or None, **body)


def test_every_route_declares_exactly_one_permission() -> None:
    missing = [f"{sorted(r.methods)} {r.path}" for r in ROUTES if r.path != "/health" and len(permission(r)) != 1]
    assert not missing, f"routes without exactly one permission dependency (corral.api.auth): {missing}"


# -- the matrix ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_rbac_matrix(team, case) -> None:  # type: ignore[no-untyped-def]
    """role x (own project | another project by parameter | another project's resources by name) x verb."""
    method, route = case
    ((scope, need),) = permission(route)
    own = _path(route)
    for role_name in ROLES:
        role = Role.parse(role_name)
        with team.client(f"alpha-{role_name}") as client:
            # Own project: allowed exactly when the role suffices (cluster routes: never for project tokens).
            answer = _call(client, method, own)
            allowed = scope == "any" or (scope == "project" and role >= need)
            if allowed:
                assert answer.status_code not in (401, 403), (role_name, answer.text)
                assert answer.status_code < 500, (role_name, answer.text)
            else:
                assert answer.status_code == 403, (role_name, answer.status_code, answer.text)
                assert answer.headers["content-type"].startswith("application/problem+json")
            if scope != "project":
                continue
            # Another project named explicitly: refused, whatever the role.
            other = _call(client, method, own, project=team.beta["project"])
            assert other.status_code == 403, (role_name, other.status_code, other.text)
            # Another project's resources by name, from one's own: never reached.
            if "{" in route.path:
                reach = _call(client, method, _path(route, team.beta))
                assert reach.status_code in (403, 404, 409, 422), (role_name, reach.status_code, reach.text)
                if method == "GET" and role >= need:
                    assert reach.status_code == 404, (role_name, reach.text)
    # A cluster admin may do anything anywhere; nobody without a token may do anything.
    with team.client("cluster-admin") as client:
        answer = _call(client, method, own)
        assert answer.status_code not in (401, 403) and answer.status_code < 500, answer.text
    with team.daemon.https() as anonymous:
        assert _call(anonymous, method, own).status_code == 401


def test_beta_stays_invisible_from_alpha(team) -> None:  # type: ignore[no-untyped-def]
    with team.client("alpha-admin") as alpha:
        assert alpha.get("/vms").json() == []
        assert alpha.get("/volumes").json() == []
        assert all(job["target_name"] != "b-vm" for job in alpha.get("/jobs").json())
        assert alpha.get(f"/jobs/{team.beta['job']}").status_code == 404
        assert [p["name"] for p in alpha.get("/projects").json()] == ["alpha"]
        assert alpha.get("/projects/beta").status_code == 404
        assert alpha.delete("/vms/b-vm").status_code == 404
    with team.client("beta-admin") as beta:
        assert [vm["name"] for vm in beta.get("/vms").json()] == ["b-vm"]
        # The shared catalog: beta uses the default project's images, and cannot delete them.
        assert "tiny" in [image["name"] for image in beta.get("/images").json()]
        refused = beta.delete("/images/tiny")
        assert refused.status_code == 403 and "belongs to project 'default'" in refused.json()["detail"]


# -- tokens ----------------------------------------------------------------------------------------------------


def test_a_revoked_token_stops_working_at_once(secure) -> None:  # type: ignore[no-untyped-def]
    secret = secure.cli("token", "create", "--user", "ann", "--project", "alpha", "--role", "viewer").stdout.strip()
    with secure.https(secret) as client:
        assert client.get("/vms").status_code == 200
        token_id = secret.split("_")[1]
        listed = {t["id"]: t for t in secure.cli_json("token", "list", "--user", "ann")}
        assert listed[token_id]["revoked"] is False and "secret" not in listed[token_id]
        secure.cli("token", "revoke", token_id)
        refused = client.get("/vms")
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


def test_an_expired_token_is_refused(secure) -> None:  # type: ignore[no-untyped-def]
    secret = secure.cli(
        "token", "create", "--user", "ann", "--project", "alpha", "--role", "viewer", "--expires", "2s"
    ).stdout.strip()
    with secure.https(secret) as client:
        assert client.get("/vms").status_code == 200
        time.sleep(2.5)
        refused = client.get("/vms")
        assert refused.status_code == 401 and "expired" in refused.json()["detail"]


def test_deleting_a_user_ends_its_tokens_and_bad_tokens_are_401(secure) -> None:  # type: ignore[no-untyped-def]
    secure.cli("user", "create", "temp-user")
    secret = secure.cli("token", "create", "--user", "temp-user", "--project", "alpha", "--role", "admin").stdout
    with secure.https(secret.strip()) as client:
        assert client.get("/vms").status_code == 200
        secure.cli("user", "delete", "temp-user")
        assert client.get("/vms").status_code == 401
    with secure.https("corral_0000_not-a-token") as client:
        assert client.get("/vms").status_code == 401


def test_token_input_errors_are_one_line(secure) -> None:  # type: ignore[no-untyped-def]
    for args, words in (
        (("--role", "god"), "unknown role 'god'"),
        (("--role", "viewer", "--expires", "soon"), "invalid duration 'soon'"),
    ):
        result = secure.cli("token", "create", "--user", "ann", "--project", "alpha", *args, check=False)
        assert result.returncode != 0
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing = secure.cli("token", "create", "--user", "nobody", "--project", "alpha", "--role", "viewer", check=False)
    assert missing.returncode != 0 and "user 'nobody' not found" in missing.stderr


# -- quotas ----------------------------------------------------------------------------------------------------


def _counts(client: httpx.Client) -> tuple[int, int, int]:
    return len(client.get("/vms").json()), len(client.get("/volumes").json()), len(client.get("/jobs").json())


def test_quotas_refuse_before_anything_is_made(secure, team) -> None:  # type: ignore[no-untyped-def]
    secure.cli(
        "project", "create", "small", "--max-vms", "1", "--max-vcpus", "2", "--max-memory", "256M", "--max-disk", "1G"
    )
    secret = secure.cli("token", "create", "--user", "ann", "--project", "small", "--role", "admin").stdout.strip()
    with secure.https(secret) as client:
        first = client.post("/vms", json={"spec": {"name": "one", "image": "tiny", "cpus": 1, "memory": "128M"}})
        assert first.status_code == 202, first.text
        before = _counts(client)
        for spec, quota in (({"name": "two", "image": "tiny", "memory": "64M"}, "max-vms"),):
            refused = client.post("/vms", json={"spec": spec})
            assert refused.status_code == 409, refused.text
            problem = refused.json()
            assert problem["type"] == "urn:corral:error:quota-exceeded" and quota in problem["detail"], problem
        secure.cli("project", "set", "small", "--max-vms", "none")
        for spec, quota in (
            ({"name": "two", "image": "tiny", "cpus": 2, "memory": "64M"}, "max-vcpus"),
            ({"name": "two", "image": "tiny", "memory": "192M"}, "max-memory"),
            ({"name": "two", "image": "tiny", "memory": "64M", "disks": [{"size": "2G"}]}, "max-disk"),
        ):
            refused = client.post("/vms", json={"spec": spec})
            assert refused.status_code == 409 and quota in refused.json()["detail"], refused.text
        volume = client.post("/volumes", json={"name": "big", "size": "2G"})
        assert volume.status_code == 409 and "max-disk" in volume.json()["detail"], volume.text
        assert _counts(client) == before  # nothing was made by any refused request
        fits = client.post("/vms", json={"spec": {"name": "two", "image": "tiny", "memory": "64M"}})
        assert fits.status_code == 202, fits.text
    shown = secure.cli_json("project", "show", "small")
    assert shown["usage"]["vms"] == 2 and shown["max_vms"] is None and shown["max_vcpus"] == 2
    cli = secure.cli("--project", "small", "vm", "create", "three", "--image", "tiny", "--cpus", "1", check=False)
    assert cli.returncode != 0 and "quota max-vcpus" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1


def test_project_input_errors(secure) -> None:  # type: ignore[no-untyped-def]
    for args, words in (
        (("project", "create", "Bad_Name"), "invalid project name"),
        (("project", "create", "q1", "--max-memory", "lots"), "invalid size"),
        (("project", "create", "q2", "--max-vms", "-3"), "max-vms"),
        (("project", "delete", "default"), "cannot be deleted"),
        (("project", "set", "ghost", "--max-vms", "1"), "project 'ghost' not found"),
    ):
        result = secure.cli(*args, check=False)
        assert result.returncode != 0 and words in result.stderr, (args, result.stderr)
    assert "q1" not in [p["name"] for p in secure.cli_json("project", "list")]


# -- TLS -------------------------------------------------------------------------------------------------------


def test_https_only_with_the_pinned_certificate(secure, team) -> None:  # type: ignore[no-untyped-def]
    with secure.https(team.tokens["alpha-viewer"]) as pinned:
        assert pinned.get("/vms").status_code == 200
        assert pinned.get("/health").json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{secure.url}/health")  # the system's CAs do not know a self-signed certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{secure.port}/health")  # no plain HTTP on the network listener
    from corral.api.tls import fingerprint_of_pem

    assert fingerprint_of_pem(secure.certificate) in secure.log.read_text()  # printed at start
    assert oct((secure.home / "corral.sock").stat().st_mode & 0o777) == "0o600"
    assert oct((secure.home / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"


def test_cli_through_a_remote_with_a_pinned_certificate(secure, team, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    from tests.conftest import Daemon

    user = Daemon(secure.home, env)  # the CLI of someone whose config lives in tmp_path
    added = user.cli("remote", "add", "lab", secure.url, "--token", team.tokens["beta-admin"], "--switch")
    from corral.api.tls import fingerprint_of_pem

    assert fingerprint_of_pem(secure.certificate) in added.stdout
    user.env.pop("CORRAL_HOME")
    user.env["HOME"] = str(tmp_path)  # no socket there: every command must go through the remote
    assert [vm["name"] for vm in user.cli_json("vm", "list")] == ["b-vm"]
    assert {r["name"] for r in user.cli_json("remote", "list")["remotes"]} == {"local", "lab"}
    wrong = user.cli("remote", "add", "bad", secure.url, "--fingerprint", "AA" * 32, check=False)
    assert wrong.returncode != 0 and "fingerprint" in wrong.stderr
    # The environment alone works too, with CORRAL_INSECURE for a URL no remote pins.
    user.cli("remote", "remove", "lab")
    user.env.update(CORRAL_URL=secure.url, CORRAL_TOKEN=team.tokens["alpha-viewer"])
    refused = user.cli("vm", "list", check=False)
    assert refused.returncode != 0 and "not trusted" in refused.stderr
    assert user.cli("--insecure", "vm", "list", "--json").returncode == 0
    denied = user.cli("--insecure", "vm", "delete", "ghost", check=False)
    assert denied.returncode == 4 and "needs the admin role" in denied.stderr


# -- audit -----------------------------------------------------------------------------------------------------


def test_audit_records_who_what_when_and_result(secure, team) -> None:  # type: ignore[no-untyped-def]
    with secure.https() as anonymous:
        assert anonymous.post("/vms/ghost-vm/start").status_code == 401
    with team.client("alpha-viewer") as viewer:
        assert viewer.post("/vms/ghost-vm/start").status_code == 403
        assert viewer.get("/audit").status_code == 403  # the log is for admins
    with team.client("alpha-admin") as admin:
        assert admin.post("/volumes", json={"name": "audited", "size": "8M"}).status_code == 202
        entries = admin.get("/audit").json()
    assert all(entry["project"] == "alpha" for entry in entries)
    refused = next(e for e in entries if e["path"] == "/vms/ghost-vm/start")
    assert refused["user"] == "ann" and refused["status"] == 403 and "needs the operator role" in refused["result"]
    made = next(e for e in entries if e["path"] == "/volumes" and e["status"] == 202)
    assert made["action"] == "POST /volumes" and made["result"] == "ok" and made["token_id"]
    everything = secure.cli_json("audit", "--all-projects", "--limit", "1000")
    assert any(
        e["action"] == "POST /projects" and e["user"] == "root" and e["source"] == "unix socket" for e in everything
    )
    assert any(e["user"] == "anonymous" and e["status"] == 401 for e in everything)
    assert any(e["action"] == "POST /tokens" and e["project"] is None for e in everything)  # cluster-wide changes
    assert "ACTION" in secure.cli("audit", "--all-projects").stdout
