"""The attacker's bench: a real daemon served over HTTPS with two projects, pa and pb, attacked as a hostile
tenant would (a project admin of pa trying to reach pb, or the host).

Each test module gets a daemon of its own, so a module may configure it (override ``daemon_config`` with the
config.toml settings it needs) and may leave it in any state. Tokens are made through the CLI on the unix socket,
as the local root would."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import new_home
from tests.secure_daemon import SecureDaemon


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Tenants:
    """Projects pa (the attacker's) and pb (the victim's), tokens by ``project-role``, the local root's CLI."""

    daemon: SecureDaemon
    tokens: dict[str, str] = field(default_factory=dict)  # pa-admin, pa-operator, pa-viewer, pb-admin, cluster-admin

    def https(self, who: str | None, timeout: float = 60) -> httpx.Client:
        """An HTTPS client with ``who``'s token (None: no token at all)."""
        return self.daemon.https(self.tokens[who] if who else None, timeout=timeout)

    def cli_as(self, who: str, *args: str, check: bool = False, timeout: float = 300, input: str | None = None):  # type: ignore[no-untyped-def]
        """The CLI as a remote tenant: over HTTPS with ``who``'s token, trusting the daemon's certificate."""
        import subprocess
        import sys

        env = {**self.daemon.env, "CORRAL_URL": self.daemon.url, "CORRAL_TOKEN": self.tokens[who],
               "CORRAL_INSECURE": "1"}  # fmt: skip
        return subprocess.run([sys.executable, "-m", "corral", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, input=input)  # fmt: skip

    def wait(self, who: str, job_id: str, timeout: float = 120) -> dict:
        """Follow a job to its end with ``who``'s token; returns its final view."""
        import time

        deadline = time.monotonic() + timeout
        with self.https(who) as client:
            view = client.get(f"/jobs/{job_id}").json()
            while view["state"] in ("queued", "running"):
                assert time.monotonic() < deadline, f"job {job_id} still {view['state']}"
                view = client.get(f"/jobs/{job_id}", params={"wait": 10, "version": view["version"]}).json()
            return view


@pytest.fixture(scope="module")
def daemon_config() -> dict[str, object]:
    """config.toml settings for this module's daemon; a module overrides this fixture to set its own."""
    return {}


@pytest.fixture(scope="module")
def tenants(qemu_available, daemon_config: dict[str, object]) -> Iterator[Tenants]:  # type: ignore[no-untyped-def]
    home = new_home("corral-sec-")
    if daemon_config:
        (home / "config.toml").write_text(
            "".join(f"{key} = {toml_value(value)}\n" for key, value in daemon_config.items())
        )
    corral = SecureDaemon(home)
    try:
        corral.start()
        corral.cli("image", "build", "tiny", timeout=1800)  # the default project's catalog: every project boots it
        for project in ("pa", "pb"):
            corral.cli("project", "create", project)
        corral.cli("user", "create", "mallory")  # pa's members
        corral.cli("user", "create", "victor")  # pb's
        corral.cli("user", "create", "ops", "--cluster-admin")
        tenants = Tenants(corral)
        for role in ("viewer", "operator", "admin"):
            tenants.tokens[f"pa-{role}"] = corral.cli(
                "token", "create", "--user", "mallory", "--project", "pa", "--role", role
            ).stdout.strip()
        tenants.tokens["pb-admin"] = corral.cli(
            "token", "create", "--user", "victor", "--project", "pb", "--role", "admin"
        ).stdout.strip()
        tenants.tokens["cluster-admin"] = corral.cli(
            "token", "create", "--user", "ops", "--project", "default", "--role", "admin"
        ).stdout.strip()
        yield tenants
    finally:
        corral.cleanup()
        shutil.rmtree(home, ignore_errors=True)
