"""A daemon that serves HTTPS as well as its unix socket: what the access-control and the security suites attack."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import Daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SecureDaemon(Daemon):
    """`corral serve --listen 127.0.0.1:PORT`: the socket for root, HTTPS for everyone else."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(home, extra_env)
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
