"""User-mode networking (QEMU's slirp), what every VM without --nic gets and what a daemon without root falls back
to: port forwards added to a running guest, kept across restarts, and removed again; NIC hot-plug without a
bridge. No root needed.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest

from tests.conftest import Daemon, unique

pytestmark = [pytest.mark.integration]


def free_port() -> int:
    """A free host port in the default range for port forwards (port_forward_range, 20000-29999)."""
    for port in range(20000 + (os.getpid() * 7) % 9000, 30000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in the range for port forwards")


def fetch(port: int, timeout: float = 20) -> str:
    """The guest's page through the forward (retried briefly: the guest's httpd may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as reply:
                return reply.read().decode().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def serve_page(daemon: Daemon, vm: str) -> None:
    daemon.cli(
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo user-mode-ok > /tmp/www/index.html && httpd -p 80 -h /tmp/www",
    )


def test_port_forward_on_a_user_mode_nic_lives_and_survives_a_restart(daemon: Daemon, tiny: str) -> None:
    vm = unique("uf")
    daemon.cli("vm", "run", vm, "--image", tiny, timeout=300)
    try:
        serve_page(daemon, vm)
        port = free_port()
        daemon.cli("vm", "port-forward", vm, f"{port}:80")
        assert fetch(port) == "user-mode-ok"
        daemon.cli("vm", "restart", vm, "--wait", timeout=300)
        serve_page(daemon, vm)
        assert fetch(port) == "user-mode-ok", "the forward was not rebuilt at the next start"
        daemon.cli("vm", "port-forward", vm, "--remove", str(port))
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=3)
        bad = daemon.cli("vm", "port-forward", vm, "80:99999", check=False)
        assert bad.returncode != 0 and "invalid port" in bad.stderr
    finally:
        daemon.cli("vm", "delete", vm, "--force", check=False)


def test_user_mode_nic_hot_add_and_remove(daemon: Daemon, tiny: str) -> None:
    vm = unique("un")
    daemon.cli("vm", "run", vm, "--image", tiny, timeout=300)
    try:
        daemon.cli("vm", "nic", "add", vm, "--network", "user")
        nics = daemon.cli_json("vm", "show", vm)["nics"]  # type: ignore[index]
        assert len(nics) == 2 and nics[1]["slot"] == 1
        deadline = time.monotonic() + 30
        while "eth1" not in daemon.cli("vm", "exec", vm, "--", "ls", "/sys/class/net").stdout:
            assert time.monotonic() < deadline, "the guest never saw the hot-added NIC"
            time.sleep(0.5)
        mac = daemon.cli("vm", "exec", vm, "--", "cat", "/sys/class/net/eth1/address").stdout.strip()
        assert mac == nics[1]["mac"]
        daemon.cli("vm", "nic", "remove", vm, nics[1]["mac"])
        assert "eth1" not in daemon.cli("vm", "exec", vm, "--", "ls", "/sys/class/net").stdout
        missing = daemon.cli("vm", "nic", "remove", vm, "7", check=False)
        assert missing.returncode != 0 and "has no NIC '7'" in missing.stderr
    finally:
        daemon.cli("vm", "delete", vm, "--force", check=False)
