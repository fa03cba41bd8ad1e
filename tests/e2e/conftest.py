"""A daemon serving HTTPS as well as its socket, with two projects and a token for every role, shared by the
access-control tests. Everything talks to the real daemon: the unix socket as local root, HTTPS with tokens."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon, new_home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SecureDaemon(Daemon):
    """`corral serve --listen 127.0.0.1:PORT`: the socket for root, HTTPS for everyone else."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral", "serve", "--log-level", "info", "--listen", f"127.0.0.1:{self.port}"],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            if (self.home / "tls" / "server.crt").exists() and self.cli("host", "list", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("daemon did not answer")

    @property
    def certificate(self) -> str:
        return (self.home / "tls" / "server.crt").read_text()

    def https(self, token: str | None = None, timeout: float = 60) -> httpx.Client:
        """An HTTPS client that trusts exactly the daemon's certificate (pinned, as `corral remote add` does)."""
        from corral.client.remotes import pinned_context

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url, verify=pinned_context(self.certificate), headers=headers, timeout=timeout
        )


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
