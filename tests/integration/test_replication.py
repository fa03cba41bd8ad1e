"""Replication and failover through the whole stack (docs/ha.md, "Replication and failover"): a control plane and
agents h1, h2 in network namespaces on a PostgreSQL server of this module's own (corral.localpool), each host with
its own storage pool, real QEMU running the tiny image, the default lease timings.

One HA VM on h1 is replicated to h2 with data written through its guest agent; a second copy is incremental; then
h1 crashes (every process of its namespace SIGKILLed) and the VM runs again on h2 from the replica, with exactly the
data of its last copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.localpool import LocalPool, namespace_pids
from corral.store.db import Store
from tests.conftest import new_home, require


class Pool(LocalPool):
    def json(self, *argv: str, timeout: float = 300) -> Any:
        return json.loads(self.cli(*argv, "--json", timeout=timeout).stdout)

    def vm(self, name: str) -> dict[str, Any]:
        return self.json("vm", "show", name)

    def sh(self, name: str, script: str, timeout: float = 60) -> str:
        return self.cli("vm", "exec", name, "--", "/bin/sh", "-c", script, timeout=timeout).stdout

    def replica_files(self, host: str) -> list[Path]:
        root = self.homes[host] / "pools" / "default" / ".replicas"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def until(check: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def pool(qemu_available: None) -> Iterator[Pool]:
    from corral.store.pgserver import PgServer, find_bin_dir

    require(find_bin_dir() is not None, "PostgreSQL is not installed (make setup installs it)")
    require(shutil.which("ip") is not None, "iproute2 is missing")
    require(os.geteuid() == 0, "network namespaces need root")
    images = new_home("cr-img-")
    pool = Pool("", prefix="cr", make_home=lambda host: new_home(f"cr-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    server: PgServer | None = None
    try:
        pool.network()
        server = PgServer()
        server.start()
        name = f"rp_{uuid.uuid4().hex[:10]}"
        server.create_database(name)
        pool.url = f"postgresql+psycopg://corral@/{name}?host={server.root}&port={server.port}"
        store = Store(pool.url)
        try:
            store.migrate()
        finally:
            store.close()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", images=images)
        pool.wait_online(["h1", "h2"])
        pool.cli("image", "build", "tiny", timeout=1800)
        yield pool
    finally:
        pool.close()
        if server is not None:
            server.stop()
        shutil.rmtree(images, ignore_errors=True)


def _refused(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_replication_is_refused_on_a_single_host(daemon: Any) -> None:
    line = _refused(daemon.cli("vm", "replicate", "solo", "--to", "other", check=False))
    assert "replication needs a pool of hosts on PostgreSQL" in line and "hint:" in line, line
    assert json.loads(daemon.cli("vm", "replication", "list", "--json").stdout) == []


def test_a_replicated_vm_restarts_from_its_replica_when_its_host_dies(pool: Pool) -> None:
    pool.cli("vm", "run", "rv", "--host", "h1", "--ha", "--memory", "192M", timeout=400)
    # Bad input: a clear one-line refusal each, and nothing recorded.
    assert "protects nothing" in _refused(pool.cli("vm", "replicate", "rv", "--to", "h1", check=False))
    assert "not in the pool" in _refused(pool.cli("vm", "replicate", "rv", "--to", "h9", check=False), 1)
    assert "out of range" in _refused(pool.cli("vm", "replicate", "rv", "--to", "h2", "--every", "0s", check=False))
    assert "shorter than the minimum" in _refused(
        pool.cli("vm", "replicate", "rv", "--to", "h2", "--every", "2s", check=False)
    )
    assert pool.json("vm", "replication", "list") == []

    pool.sh("rv", "echo first > /root/one && sync")
    first = pool.json("vm", "replicate", "rv", "--to", "h2", "--every", "1h")
    assert first["job"]["state"] == "succeeded", first["job"]
    assert first["replica"]["last_kind"] == "full" and first["replica"]["copies"] == 1
    full_bytes = first["replica"]["last_bytes"]
    assert first["replica"]["last_consistent"] is True, "the tiny guest's agent freezes its filesystems"
    assert [p.name for p in pool.replica_files("h2")] == ["disk0.qcow2"]
    # Removing a replica removes its files on the partner; replicating again starts with a full copy.
    removed = pool.json("vm", "replication", "remove", "rv")
    assert removed["job"]["state"] == "succeeded" and pool.replica_files("h2") == []
    again = pool.json("vm", "replicate", "rv", "--to", "h2", "--every", "1h")
    assert again["replica"]["last_kind"] == "full" and again["replica"]["copies"] == 1
    # Moving it onto its replica's host is refused; so is a failover while h1 is alive.
    assert "keeps the replica" in _refused(pool.cli("vm", "migrate", "rv", "--to", "h2", check=False), 1)
    assert "would run it twice" in _refused(pool.cli("vm", "failover", "rv", check=False), 1)

    pool.sh("rv", "echo second > /root/two && sync")
    second = pool.json("vm", "replicate", "rv", "--to", "h2", "--every", "10s")  # same partner: a copy now
    assert second["replica"]["last_kind"] == "incremental" and second["replica"]["copies"] == 2
    incremental_bytes = second["replica"]["last_bytes"]
    print(f"\nfull copy {full_bytes} bytes, incremental {incremental_bytes} bytes")
    assert 0 < incremental_bytes < full_bytes / 4, (incremental_bytes, full_bytes)
    shown = pool.vm("rv")["replica"]
    assert shown["partner"] == "h2" and shown["data_loss_bound_seconds"] == 10 and shown["age_seconds"] < 120
    assert "data loss bounded by 10 s" in pool.cli("vm", "show", "rv").stdout
    # The control plane takes the next copy by itself when it is due.
    pool.sh("rv", "echo third > /root/three && sync")
    with pool.client(60) as corral:
        scheduled = until(lambda: (r := corral.replica("rv"))["copies"] >= 3 and r, 40, "a scheduled copy")
    assert scheduled["last_kind"] == "incremental" and scheduled["state"] == "ready", scheduled
    # Written after the last copy: a failover loses it, by design (the bound above).
    pool.sh("rv", "echo fourth > /root/four && sync")

    pids = namespace_pids(pool.netns("h1"))
    crashed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with pool.client(60) as corral:
        until(lambda: corral.host("h1")["state"] == "dead", 60, "the takeover of h1")
        until(lambda: corral.vm("rv")["state"] == "running", 60, "the VM to run from its replica")
        answer = corral.exec_vm("rv", ["/bin/sh", "-c", "cat /root/one /root/two /root/three; ls /root"])
        recovered = time.monotonic() - crashed
    print(f"replicated VM answered on h2 {recovered:.1f} s after its host's crash")
    assert answer["stdout"].startswith("first\nsecond\nthird\n"), answer
    assert "four" not in answer["stdout"], "written after the last copy"
    vm = pool.vm("rv")
    assert vm["host"] == "h2" and vm["replica"] is None
    assert pool.json("vm", "replication", "list") == []
    assert pool.replica_files("h2") == [], "the replica became the VM's disk"
    assert recovered < 90
    # h1 comes back: its agent rejoins and removes the disk file the VM left there (it now runs from h2's).
    stale = list((pool.homes["h1"] / "pools" / "default").glob("vol-*.qcow2"))
    assert stale, "the crash left h1's copy of the disk"
    pool.agents["h1"].start()
    until(lambda: not any(path.exists() for path in stale), 90, "h1 to remove its stale disk file")
    assert pool.json("host", "show", "h1")["state"] == "online"
    assert pool.vm("rv")["host"] == "h2"
    pool.cli("vm", "delete", "rv", "--force")
