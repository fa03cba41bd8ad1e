"""Separate agents on one PostgreSQL store: each `corral agent` registers its host with its address, heartbeats,
and goes offline when stopped; a control plane without an agent (`corral serve --no-agent`) marks a host whose
heartbeats stop as unreachable and places VMs only on live hosts. The VMs are created stopped: no QEMU runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from corral.store.db import Store
from corral.store.models import Image
from tests.conftest import new_home


class Proc:
    """A corral subprocess on its own CORRAL_HOME; stopped (then killed) at teardown."""

    def __init__(self, url: str, *argv: str) -> None:
        self.home = new_home()
        self.env = {
            **os.environ,
            "CORRAL_HOME": str(self.home),
            "CORRAL_DB": url,
            "CORRAL_ACCEL": "tcg",
            "CORRAL_HOST_TIMEOUT": "3",
            "CORRAL_DEFAULT_NETWORK": "0",
        }
        self.env.pop("CORRAL_URL", None)
        self.log = self.home / "out.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral", *argv], env=self.env, stdout=log, stderr=log, start_new_session=True
            )

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *argv], env=self.env, capture_output=True, text=True, timeout=120
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def pool(postgres):  # type: ignore[no-untyped-def]
    url = postgres.create_database(f"agents_{uuid.uuid4().hex[:10]}")
    procs: list[Proc] = []

    def start(*argv: str) -> Proc:
        proc = Proc(url, *argv)
        procs.append(proc)
        return proc

    yield url, start
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.cleanup()


def _until(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _hosts(control: Proc) -> dict[str, dict]:  # type: ignore[type-arg]
    import json

    result = control.cli("host", "list", "--json")
    return {h["name"]: h for h in json.loads(result.stdout)} if result.returncode == 0 else {}


def test_agents_register_heartbeat_and_go_offline_or_unreachable(pool):
    url, start = pool
    control = start("serve", "--no-agent")
    agents = {
        name: start("agent", "--name", name, "--address", f"10.99.0.{index + 1}")
        for index, name in enumerate(("h1", "h2", "h3"))
    }
    hosts = _until(lambda: (h := _hosts(control)) and len(h) == 3 and h)
    assert {name: h["address"] for name, h in hosts.items()} == {
        "h1": "10.99.0.1",
        "h2": "10.99.0.2",
        "h3": "10.99.0.3",
    }
    assert all(h["state"] == "online" and h["usage"]["memory_used"] > 0 for h in hosts.values())
    first_beat = hosts["h1"]["heartbeat_at"]
    _until(lambda: _hosts(control)["h1"]["heartbeat_at"] != first_beat, 15)

    # A second agent claiming a live host's name from another address is refused with one line.
    twin = start("agent", "--name", "h1", "--address", "10.99.0.9")
    assert twin.proc.wait(60) != 0
    assert "already registered from 10.99.0.1" in twin.log.read_text()

    # Stopped cleanly: offline at once. Killed: unreachable once its heartbeat is older than the timeout.
    agents["h2"].stop()
    assert _hosts(control)["h2"]["state"] == "offline"
    agents["h3"].stop(signal.SIGKILL)
    # Its heartbeat goes silent (unreachable) and its lease runs out (fenced): either says it takes no work.
    _until(lambda: _hosts(control)["h3"]["state"] in ("unreachable", "fenced"), 30)

    store = Store(url)
    try:
        with store.session() as session:
            session.add(Image(name="tiny", state="ready", kind="kernel", virtual_size=64 << 20))
    finally:
        store.close()
    from corral.client import Client

    with Client(home=control.home) as corral:  # the jobs then fail on h1 (no image file there): not our concern
        placed = [corral.create_vm({"name": f"v{index}", "image": "tiny"})["job"]["host"] for index in range(3)]
    assert placed == ["h1", "h1", "h1"]
    import json

    plan = control.cli("vm", "create", "v9", "--dry-run")
    assert plan.returncode == 0 and "would choose h1" in plan.stdout
    killed = _hosts(control)["h3"]["state"]
    assert "host is offline" in plan.stdout and f"host is {killed}" in plan.stdout
    pool_view = json.loads(control.cli("pool", "show", "--json").stdout)
    assert (pool_view["hosts"], pool_view["online"], pool_view["unreachable"] + pool_view["fenced"]) == (3, 1, 1)


def test_an_agent_needs_a_store(tmp_path: Path):
    env = {**os.environ, "CORRAL_HOME": str(tmp_path)}
    env.pop("CORRAL_DB", None)
    result = subprocess.run(
        [sys.executable, "-m", "corral", "agent", "--name", "h1"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: an agent needs the pool's store (hint: pass --db postgresql://USER@HOST/DB (or set CORRAL_DB))"
    ]
