"""A pool on a PostgreSQL server of its own (corral.localpool: agents h1..h3 in network namespaces, a control plane
without an agent, real QEMU): placement honours the networks and storage a VM needs, and the whole pool survives
its database server being stopped and started again on the same port and data directory.

h1 and h2 share one storage pool (h2's pools directory is h1's), h3 has its own; a bridge exists only inside h3's
namespace. The server is this module's own, so restarting it disturbs no other test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from corral.localpool import LocalPool
from corral.store.db import Store
from tests.conftest import new_home, require


class Pool(LocalPool):
    def json(self, *argv: str, timeout: float = 300) -> Any:
        return json.loads(self.cli(*argv, "--json", timeout=timeout).stdout)

    def refused(self, *argv: str) -> str:
        result = self.cli(*argv, check=False)
        assert result.returncode != 0, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]

    def hosts(self) -> dict[str, dict[str, Any]]:
        listed = self.cli("host", "list", "--json", check=False)
        return {h["name"]: h for h in json.loads(listed.stdout)} if listed.returncode == 0 else {}


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pg(qemu_available) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    from corral.store.pgserver import PgServer, find_bin_dir

    require(find_bin_dir() is not None, "PostgreSQL is not installed (make setup installs it)")
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pool(pg) -> Iterator[Pool]:  # type: ignore[no-untyped-def]
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"res_{uuid.uuid4().hex[:10]}"
    pg.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={pg.root}&port={pg.port}"
    store = Store(url)
    try:
        store.migrate()
    finally:
        store.close()
    images = new_home("cq-img-")
    pool = Pool(url, prefix="cq", make_home=lambda host: new_home(f"cq-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    try:
        pool.network()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", pools_of="h1", images=images)
        pool.add_host("h3", images=images)
        pool.wait_online(["h1", "h2", "h3"])
        pool.cli("image", "build", "tiny", timeout=1800)
        yield pool
    finally:
        pool.close()
        shutil.rmtree(images, ignore_errors=True)


def _plan(pool: Pool, *argv: str) -> dict[str, Any]:
    result = pool.cli("vm", "create", *argv, "--dry-run", "--json", check=False)
    return json.loads(result.stdout)


def test_placement_follows_the_networks_and_storage_a_vm_needs(pool: Pool) -> None:
    # A free volume lives in h1's pool, which h2 mounts too: a VM taking it may go to h1 or h2, never h3.
    pool.cli("volume", "create", "data1", "--size", "64M")
    try:
        plan = _plan(pool, "n1", "--volume", "data1", "--memory", "192M")
        reasons = {v["host"]: v["reason"] for v in plan["hosts"]}
        assert plan["chosen"] in ("h1", "h2"), plan
        assert reasons["h3"] == "volume data1 is in storage pool default of host h1, not shared here", reasons
        assert "volume data1" in pool.refused("vm", "create", "n1", "--volume", "data1", "--host", "h3")

        # A bridge-mode network's uplink exists only in h3's namespace: once h3's heartbeat reported it, the
        # network is made there and its VMs go only there.
        subprocess.run(
            ["ip", "netns", "exec", pool.netns("h3"), "ip", "link", "add", "brup", "type", "bridge"], check=True
        )
        until(
            lambda: "brup" in pool.hosts().get("h3", {}).get("usage", {}).get("bridges", []),
            30,
            "h3's heartbeat to report its bridge",
        )
        assert "brup" not in pool.hosts()["h1"]["usage"]["bridges"]
        pool.cli("network", "create", "lan", "--mode", "bridge", "--uplink", "brup")
        assert pool.json("network", "show", "lan")["state"] == "ready"
        plan = _plan(pool, "n2", "--nic", "network=lan", "--memory", "192M")
        reasons = {v["host"]: v["reason"] for v in plan["hosts"]}
        assert plan["chosen"] == "h3", plan
        assert reasons["h1"] == reasons["h2"] == "no bridge brup here (the uplink of a bridge-mode network)"
        text = pool.cli("vm", "create", "n2", "--nic", "network=lan", "--dry-run").stdout
        assert "would choose h3" in text and "no bridge brup here" in text
        assert "no bridge brup" in pool.refused("vm", "create", "n2", "--nic", "network=lan", "--host", "h1")
        pool.cli("vm", "create", "n2", "--nic", "network=lan", "--memory", "192M")
        assert pool.json("vm", "show", "n2")["host"] == "h3"
        # Both needs at once: nowhere.
        plan = _plan(pool, "n3", "--nic", "network=lan", "--volume", "data1")
        assert plan["chosen"] is None and not any(v["fits"] for v in plan["hosts"]), plan
    finally:
        pool.cli("vm", "delete", "n2", "--force", check=False)
        pool.cli("network", "delete", "lan", check=False)
        pool.cli("volume", "delete", "data1", check=False)


def _listeners(pg: Any) -> int:
    """Backends whose last statement was LISTEN: one per corral process whose wake-ups work."""
    import psycopg

    with psycopg.connect(f"host={pg.root} port={pg.port} user=corral dbname=postgres", autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN corral'").fetchone()[0])


def test_the_pool_survives_a_postgresql_restart(pool: Pool, pg: Any) -> None:
    pool.cli("vm", "run", "r1", "--host", "h1", "--memory", "192M", timeout=400)
    try:
        assert _listeners(pg) == 4, "the control plane and three agents listen for wake-ups"
        stopped_at = datetime.now().astimezone()
        # Down for longer than the hosts' timeout (5 s): heartbeats, job claims and the host watch all fail.
        outage = threading.Thread(target=pg.restart, kwargs={"down_for": 8.0})
        outage.start()
        time.sleep(3.0)
        try:
            line = pool.refused("host", "list")
        finally:
            outage.join()
        restarted = time.monotonic()
        assert "cannot reach the store" in line, line

        def recovered() -> bool:
            hosts = pool.hosts()
            return len(hosts) == 3 and all(
                h["state"] == "online" and datetime.fromisoformat(h["heartbeat_at"]) > stopped_at
                for h in hosts.values()
            )

        until(recovered, 60, "every host to heartbeat again")
        until(lambda: _listeners(pg) == 4, 30, "every process to LISTEN again")
        back_after = time.monotonic() - restarted
        # A new VM on another host: its create and start jobs are claimed and run; the old one still answers.
        pool.cli("vm", "run", "r2", "--host", "h2", "--memory", "192M", timeout=400)
        assert pool.json("vm", "show", "r2")["state"] == "running"
        assert pool.cli("vm", "exec", "r1", "--", "echo", "alive").stdout == "alive\n"
        started = time.monotonic()
        pool.cli("vm", "stop", "r2", "--force")
        assert pool.json("vm", "show", "r2")["state"] == "stopped"
        print(
            f"\npool back {back_after:.1f} s after PostgreSQL restarted; a stop took {time.monotonic() - started:.2f} s"
        )
    finally:
        pool.cli("vm", "delete", "r1", "--force", check=False)
        pool.cli("vm", "delete", "r2", "--force", check=False)
