"""A daemon serving HTTPS as well as its socket, with two projects and a token for every role, shared by the
access-control tests. Everything talks to the real daemon: the unix socket as local root, HTTPS with tokens."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import new_home
from tests.secure_daemon import SecureDaemon


@dataclass
class Team:
    """Projects alpha (the caller's) and beta (someone else's), and tokens by role."""

    daemon: SecureDaemon
    tokens: dict[str, str] = field(default_factory=dict)  # "alpha-viewer", ..., "cluster-admin", "cluster-viewer"
    beta: dict[str, str] = field(default_factory=dict)  # kind -> name of a resource that exists in beta

    def client(self, who: str) -> httpx.Client:
        return self.daemon.https(self.tokens[who])


@pytest.fixture(scope="session")
def secure(qemu_available) -> Iterator[SecureDaemon]:  # type: ignore[no-untyped-def]
    corral = SecureDaemon(new_home("corral-s-"))
    try:
        corral.start()
        yield corral
    finally:
        corral.cleanup()
        shutil.rmtree(corral.home, ignore_errors=True)


@pytest.fixture(scope="session")
def team(secure: SecureDaemon) -> Team:
    """Built through the CLI on the unix socket, as root would."""
    team = Team(secure)
    secure.cli("image", "build", "tiny", timeout=1800)
    for project in ("alpha", "beta"):
        secure.cli("project", "create", project)
    secure.cli("user", "create", "ann")  # alpha
    secure.cli("user", "create", "bob")  # beta
    secure.cli("user", "create", "root2", "--cluster-admin")
    for role in ("viewer", "operator", "admin"):
        team.tokens[f"alpha-{role}"] = secure.cli(
            "token", "create", "--user", "ann", "--project", "alpha", "--role", role
        ).stdout.strip()
    team.tokens["beta-admin"] = secure.cli(
        "token", "create", "--user", "bob", "--project", "beta", "--role", "admin"
    ).stdout.strip()
    for role in ("viewer", "admin"):
        team.tokens[f"cluster-{role}"] = secure.cli(
            "token", "create", "--user", "root2", "--project", "default", "--role", role
        ).stdout.strip()
    # Something of every kind in beta, so alpha's callers can try to reach it by name.
    with team.client("beta-admin") as beta:
        made = beta.post("/vms", json={"spec": {"name": "b-vm", "image": "tiny", "memory": "128M"}})
        assert made.status_code == 202, made.text
        volume = beta.post("/volumes", json={"name": "b-vol", "size": "16M"})
        assert volume.status_code == 202, volume.text
        for job_id in (made.json()["job"]["id"], volume.json()["job"]["id"]):
            final = beta.get(f"/jobs/{job_id}", params={"wait": 30, "version": 0}).json()
            while final["state"] in ("queued", "running"):
                final = beta.get(f"/jobs/{job_id}", params={"wait": 30, "version": final["version"]}).json()
            assert final["state"] == "succeeded", final
        team.beta = {"vm": "b-vm", "volume": "b-vol", "job": made.json()["job"]["id"], "project": "beta"}
    return team
