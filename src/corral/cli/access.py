"""`corral project|user|token|remote|audit|events`: who may do what, where the CLI connects, and what happened."""

from __future__ import annotations

import sys
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, fail, human_size, print_json, run, table

projects = typer.Typer(help="Projects (tenants) and their quotas.", no_args_is_help=True)
users = typer.Typer(help="Users who hold API tokens.", no_args_is_help=True)
tokens = typer.Typer(help="API tokens: one user, one project, one role.", no_args_is_help=True)
remotes = typer.Typer(help="Corral servers this CLI talks to (like `incus remote`).", no_args_is_help=True)

UNLIMITED = ("none", "unlimited", "-")


def register(app: typer.Typer) -> None:
    app.add_typer(projects, name="project")
    app.add_typer(users, name="user")
    app.add_typer(tokens, name="token")
    app.add_typer(remotes, name="remote")
    app.command("audit")(audit)
    app.command("events")(events)


# -- projects -------------------------------------------------------------------------------------------------


def _quota(value: str | None, what: str, size: bool) -> int | str | None:
    """None: not given; "clear": remove the quota; else the number of bytes or units."""
    if value is None:
        return None
    if value.strip().lower() in UNLIMITED:
        return "clear"
    if size:
        from corral.spec.sizes import parse_size

        return parse_size(value)
    if not value.isdigit():
        fail(f"invalid {what} {value!r}", f"give a whole number, or 'none' for no limit: --{what} 8")
    return int(value)


def _quotas(max_vcpus: str | None, max_memory: str | None, max_disk: str | None, max_vms: str | None) -> dict[str, Any]:
    values = {
        "max_vcpus": _quota(max_vcpus, "max-vcpus", False),
        "max_memory": _quota(max_memory, "max-memory", True),
        "max_disk": _quota(max_disk, "max-disk", True),
        "max_vms": _quota(max_vms, "max-vms", False),
    }
    return {key: (None if value == "clear" else value) for key, value in values.items() if value is not None}


def _limit(value: int | None, size: bool = False) -> str:
    if value is None:
        return "-"
    return human_size(value) if size else str(value)


def _show_project(p: dict[str, Any]) -> None:
    used = p["usage"]
    table(
        ["QUOTA", "USED", "LIMIT"],
        [
            ["vcpus", used["vcpus"], _limit(p["max_vcpus"])],
            ["memory", human_size(used["memory"]), _limit(p["max_memory"], True)],
            ["disk", human_size(used["disk"]), _limit(p["max_disk"], True)],
            ["vms", used["vms"], _limit(p["max_vms"])],
        ],
        title=f"project {p['name']}" + (f": {p['description']}" if p["description"] else ""),
    )


MAX_VCPUS = typer.Option(None, "--max-vcpus", help="vCPUs all the project's VMs may have together ('none': no limit).")
MAX_MEMORY = typer.Option(None, "--max-memory", help="Memory of all its VMs together, e.g. 16G ('none': no limit).")
MAX_DISK = typer.Option(None, "--max-disk", help="Size of all its disks and volumes together, e.g. 500G.")
MAX_VMS = typer.Option(None, "--max-vms", help="How many VMs it may have.")


@projects.command("create")
def project_create(
    name: str,
    max_vcpus: str = MAX_VCPUS,
    max_memory: str = MAX_MEMORY,
    max_disk: str = MAX_DISK,
    max_vms: str = MAX_VMS,
    description: str = typer.Option("", "--description"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a project (cluster admins only)."""

    def action() -> None:
        with client() as corral:
            project = corral.create_project(name, description, **_quotas(max_vcpus, max_memory, max_disk, max_vms))
        if as_json:
            print_json(project)
        else:
            print(f"project {name} created")

    run(action)


@projects.command("list")
def project_list(as_json: bool = JSON_OPTION) -> None:
    """Projects you can act in, with their usage and quotas."""

    def action() -> None:
        with client() as corral:
            rows = corral.projects()
        if as_json:
            print_json(rows)
            return
        table(
            ["NAME", "VMS", "VCPUS", "MEMORY", "DISK", "DESCRIPTION"],
            [
                [
                    p["name"],
                    f"{p['usage']['vms']}/{_limit(p['max_vms'])}",
                    f"{p['usage']['vcpus']}/{_limit(p['max_vcpus'])}",
                    f"{human_size(p['usage']['memory'])}/{_limit(p['max_memory'], True)}",
                    f"{human_size(p['usage']['disk'])}/{_limit(p['max_disk'], True)}",
                    p["description"],
                ]
                for p in rows
            ],
        )

    run(action)


@projects.command("show")
def project_show(name: str, as_json: bool = JSON_OPTION) -> None:
    """A project's quotas and what it uses of them."""

    def action() -> None:
        with client() as corral:
            project = corral.project_info(name)
        print_json(project) if as_json else _show_project(project)

    run(action)


@projects.command("set")
def project_set(
    name: str,
    max_vcpus: str = MAX_VCPUS,
    max_memory: str = MAX_MEMORY,
    max_disk: str = MAX_DISK,
    max_vms: str = MAX_VMS,
    description: str = typer.Option(None, "--description"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a project's quotas ('none' removes one) or description."""
    changes = _quotas(max_vcpus, max_memory, max_disk, max_vms)
    if description is not None:
        changes["description"] = description
    if not changes:
        fail("nothing to change", "give at least one of --max-vcpus, --max-memory, --max-disk, --max-vms")

    def action() -> None:
        with client() as corral:
            project = corral.update_project(name, **changes)
        print_json(project) if as_json else _show_project(project)

    run(action)


@projects.command("delete")
def project_delete(name: str) -> None:
    """Delete an empty project and its tokens."""

    def action() -> None:
        with client() as corral:
            corral.delete_project(name)
        print(f"project {name} deleted")

    run(action)


# -- users ----------------------------------------------------------------------------------------------------


@users.command("create")
def user_create(
    name: str,
    cluster_admin: bool = typer.Option(
        False, "--cluster-admin", help="Its tokens' role applies in every project; admin tokens manage the cluster."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a user (cluster admins only). Give it access with `corral token create`."""

    def action() -> None:
        with client() as corral:
            user = corral.create_user(name, cluster_admin)
        print_json(user) if as_json else print(f"user {name} created")

    run(action)


@users.command("list")
def user_list(as_json: bool = JSON_OPTION) -> None:
    """Users and how many tokens each holds."""

    def action() -> None:
        with client() as corral:
            rows = corral.users()
        if as_json:
            print_json(rows)
            return
        table(
            ["NAME", "CLUSTER ADMIN", "TOKENS", "CREATED"],
            [[u["name"], "yes" if u["cluster_admin"] else "", u["tokens"], u["created_at"][:19]] for u in rows],
        )

    run(action)


@users.command("delete")
def user_delete(name: str) -> None:
    """Delete a user; its tokens stop working at once."""

    def action() -> None:
        with client() as corral:
            corral.delete_user(name)
        print(f"user {name} deleted")

    run(action)


# -- tokens ---------------------------------------------------------------------------------------------------


@tokens.command("create")
def token_create(
    user: str = typer.Option(..., "--user", help="Who the token stands for."),
    project: str = typer.Option(..., "--project", help="The project it acts in."),
    role: str = typer.Option(..., "--role", help="admin, operator or viewer."),
    expires: str = typer.Option(None, "--expires", help="Lifetime such as 30d, 12h or 15m (default: never)."),
    description: str = typer.Option("", "--description"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a token and print it; it is shown this once and stored only as a hash."""

    def action() -> None:
        with client() as corral:
            token = corral.create_token(user, project, role, expires, description)
        if as_json:
            print_json(token)
            return
        print(token["secret"])
        until = f", expires {token['expires_at'][:19]} UTC" if token["expires_at"] else ""
        print(
            f"token {token['id']} for {user}: {role} in project {project}{until}. "
            "Store it now: it cannot be shown again.",
            file=sys.stderr,
        )

    run(action)


@tokens.command("list")
def token_list(
    user: str = typer.Option(None, "--user", help="Only this user's."),
    of_project: str = typer.Option(None, "--of-project", help="Only tokens for this project."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Tokens (never their secrets)."""

    def action() -> None:
        with client() as corral:
            rows = corral.tokens(user=user, project=of_project)
        if as_json:
            print_json(rows)
            return
        table(
            ["ID", "USER", "PROJECT", "ROLE", "EXPIRES", "STATE", "DESCRIPTION"],
            [
                [
                    t["id"],
                    t["user"],
                    t["project"],
                    t["role"],
                    (t["expires_at"] or "never")[:19],
                    "revoked" if t["revoked"] else "active",
                    t["description"],
                ]
                for t in rows
            ],
        )

    run(action)


@tokens.command("revoke")
def token_revoke(token_id: str) -> None:
    """Revoke a token: requests with it fail from now on."""

    def action() -> None:
        with client() as corral:
            corral.revoke_token(token_id)
        print(f"token {token_id} revoked")

    run(action)


# -- remotes --------------------------------------------------------------------------------------------------


@remotes.command("add")
def remote_add(
    name: str,
    url: str,
    token: str = typer.Option(None, "--token", help="The API token to use (default: CORRAL_TOKEN at call time)."),
    project: str = typer.Option(None, "--project", help="The project commands act in by default."),
    fingerprint: str = typer.Option(
        None, "--fingerprint", help="The SHA-256 the daemon printed; the certificate must match it."
    ),
    switch_to: bool = typer.Option(False, "--switch", help="Also make it the current remote."),
) -> None:
    """Add a server and pin its certificate (shown by fingerprint; compare it with what the daemon printed)."""
    from corral.client import remotes as config
    from corral.tlsutil import fingerprint_of_pem, normalize_fingerprint

    def action() -> None:
        certificate = config.fetch_certificate(url)
        seen = fingerprint_of_pem(certificate)
        if fingerprint is not None and normalize_fingerprint(fingerprint) != seen:
            fail(
                f"the certificate of {url} has fingerprint {seen}, not the one given",
                "someone may be in the middle; check the daemon's log for its fingerprint",
            )
        config.add(name, url, token, certificate, seen, project)
        if switch_to:
            config.switch(name)
        print(f"remote {name} added: {url}")
        print(f"certificate SHA-256 fingerprint: {seen}")
        if fingerprint is None:
            print("compare it with the one `corral serve` printed before trusting this remote", file=sys.stderr)

    run(action)


@remotes.command("list")
def remote_list(as_json: bool = JSON_OPTION) -> None:
    """Configured remotes; the current one is marked."""
    from corral.client import remotes as config

    def action() -> None:
        data = config.load()
        current = data.get("current", config.LOCAL)
        rows: list[dict[str, Any]] = [
            {"name": config.LOCAL, "url": "unix socket", "project": None, "fingerprint": None}
        ]
        rows += [
            {
                "name": name,
                **{k: v for k, v in r.items() if k not in ("token", "certificate")},
                "token": bool(r.get("token")),
            }
            for name, r in data["remotes"].items()
        ]
        if as_json:
            print_json({"current": current, "remotes": rows})
            return
        table(
            ["", "NAME", "URL", "PROJECT", "FINGERPRINT"],
            [
                [
                    "*" if r["name"] == current else "",
                    r["name"],
                    r["url"],
                    r.get("project") or "",
                    (r.get("fingerprint") or "")[:23],
                ]
                for r in rows
            ],
        )

    run(action)


@remotes.command("switch")
def remote_switch(name: str) -> None:
    """Make NAME the remote commands talk to (`local`: this host's unix socket)."""
    from corral.client import remotes as config

    run(lambda: config.switch(name))
    print(f"current remote: {name}")


@remotes.command("remove")
def remote_remove(name: str) -> None:
    """Forget a remote."""
    from corral.client import remotes as config

    run(lambda: config.remove(name))
    print(f"remote {name} removed")


# -- audit and events -----------------------------------------------------------------------------------------


def audit(
    limit: int = typer.Option(50, "--limit", "-n"),
    all_projects: bool = typer.Option(
        False, "--all-projects", help="Cluster admins: every project, and cluster changes."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """The audit log: who changed what, when, and how it ended (newest first)."""

    def action() -> None:
        with client() as corral:
            rows = corral.audit(limit=limit, all_projects=all_projects)
        if as_json:
            print_json(rows)
            return
        table(
            ["WHEN", "USER", "PROJECT", "ACTION", "PATH", "STATUS", "RESULT"],
            [
                [e["at"][:19], e["user"], e["project"] or "", e["action"], e["path"], e["status"], e["result"][:60]]
                for e in rows
            ],
        )

    run(action)


def events(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events as they happen."),
    kind: str = typer.Option(None, "--kind", help="Only this kind of resource: vm, job, volume, image, ..."),
    resource: str = typer.Option(None, "--resource", help="Only this resource (name or id)."),
    types: list[str] = typer.Option(None, "--type", help="Only this type (repeatable); 'vm.' matches a prefix."),
    limit: int = typer.Option(20, "--limit", "-n", help="How many past events to show first."),
    all_projects: bool = typer.Option(False, "--all-projects", help="Cluster-wide callers: every project."),
    as_json: bool = JSON_OPTION,
) -> None:
    """State changes and job steps; with --follow, as they happen (one JSON object a line with --json)."""
    import json

    def show(event: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(event), flush=True)
            return
        data = event["data"]
        if event["type"].startswith("job."):
            detail = f"{data.get('state')} {data.get('progress', 0):.0%} {data.get('message', '')}"
        elif "to" in data:
            detail = f"{data.get('from')} -> {data.get('to')}"
        else:
            detail = ", ".join(f"{k}={v}" for k, v in data.items())
        resource_text = f"{event['resource']['kind']}/{event['resource']['name']}"
        print(
            f"{event['at'][:23]}  {event['project'] or '-':<12} {event['type']:<18} {resource_text:<28} {detail}",
            flush=True,
        )

    def action() -> None:
        with client() as corral:
            last = 0  # an empty backlog means no matching event exists yet: following from 0 misses nothing
            for event in corral.events(
                kind=kind, resource=resource, types=types or None, limit=limit, all_projects=all_projects
            ):
                show(event)
                last = event["id"]
            if follow:
                for event in corral.events(
                    follow=True,
                    kind=kind,
                    resource=resource,
                    types=types or None,
                    after=last,
                    all_projects=all_projects,
                ):
                    show(event)

    run(action)
