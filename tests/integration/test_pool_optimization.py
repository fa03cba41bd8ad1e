"""Usage history, balancing and consolidation on a real pool (corral.localpool: a control plane and agents h1..h3
in network namespaces on PostgreSQL, real QEMU under TCG): the agents write usage points, busy guests packed on
one host are balanced over the others by live migrations and the imbalance score falls; consolidation empties a
host, which goes to standby, and a later create that finds no room elsewhere wakes it.

The three hosts share one storage pool (h2's and h3's pools directory is h1's), so moves send RAM only."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from corral.localpool import LocalPool
from corral.store.db import Store
from tests.conftest import new_home, require

BUSY = "setsid sh -c 'echo $$ > /tmp/busy; while :; do :; done' </dev/null >/dev/null 2>&1 &"


class Pool(LocalPool):
    def json(self, *argv: str, timeout: float = 300) -> Any:
        return json.loads(self.cli(*argv, "--json", timeout=timeout).stdout)

    def refused(self, *argv: str) -> str:
        result = self.cli(*argv, check=False)
        assert result.returncode != 0, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]

    def where(self) -> dict[str, str]:
        return {vm["name"]: vm["host"] for vm in self.json("vm", "list")}


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def pool(postgres, qemu_available) -> Iterator[Pool]:  # type: ignore[no-untyped-def]
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"opt_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={postgres.root}&port={postgres.port}"
    store = Store(url)
    try:
        store.migrate()
    finally:
        store.close()
    images = new_home("co-img-")
    pool = Pool(url, prefix="co", make_home=lambda host: new_home(f"co-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    try:
        pool.network()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", pools_of="h1", images=images)
        pool.add_host("h3", pools_of="h1", images=images)
        pool.wait_online(["h1", "h2", "h3"])
        pool.cli("image", "build", "tiny", timeout=1800)
        yield pool
    finally:
        pool.close()
        shutil.rmtree(images, ignore_errors=True)


def test_busy_guests_are_balanced_then_consolidated_onto_fewer_hosts(pool: Pool) -> None:
    for vm in ("b1", "b2", "b3"):
        pool.cli("vm", "run", vm, "--host", "h1", "--memory", "128M", timeout=400)
    for vm in ("b1", "b2"):
        pool.cli("vm", "exec", vm, "--", "/bin/sh", "-c", BUSY)

    # The agents' samples reach the history: rates need two samples, ten seconds apart.
    seen: list[Any] = []

    def busy_history() -> Any:
        stats = pool.json("vm", "stats", "b1", "--since", "10m")
        seen.append(stats)
        return stats if stats["points"] and (stats["average"]["cpu"] or 0) > 0.1 else None

    try:
        stats = until(busy_history, 120, "b1's busy CPU in its history")
    except AssertionError:
        tail = (pool.homes["h1"] / "agent.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"last: {seen[-1:]}\nh1's agent log: {tail}") from None
    assert stats["resolution"] == 0 and stats["average"]["memory"] > 0
    host = pool.json("host", "stats", "h1", "--since", "10m")
    assert host["points"] and host["average"]["cpu"] >= stats["average"]["cpu"] * 0.5
    assert "is not a duration" in pool.refused("vm", "stats", "b1", "--since", "soon")
    assert "out of range" in pool.refused("pool", "balance", "--threshold", "7")

    # Balancing: a recommendation first (nothing moves), then --apply runs it.
    plan = pool.json("pool", "balance", "--threshold", "4")
    assert plan["state"] == "recommended" and plan["moves"], plan
    assert plan["summary"]["score_after"] < plan["summary"]["score_before"]
    assert set(pool.where().values()) == {"h1"}
    applied = pool.json("pool", "balance", "--threshold", "4", "--apply", timeout=900)
    assert applied["state"] == "succeeded", applied
    assert all(move["state"] == "done" for move in applied["moves"]), applied["moves"]
    placed = pool.where()
    assert len(set(placed.values())) >= 2, placed
    assert pool.json("pool", "plan", "show", plan["id"])["state"] == "superseded"
    assert "superseded" in pool.refused("pool", "plan", "approve", plan["id"])

    for vm in ("b1", "b2"):  # quiet again: the machine is shared
        pool.cli("vm", "exec", vm, "--", "/bin/sh", "-c", "kill $(cat /tmp/busy)", check=False)

    # Consolidation: N+1 keeps two hosts awake for three small VMs; the third host is emptied and parked. One VM
    # on each host first, so that emptying one takes a move.
    empty = sorted({"h1", "h2", "h3"} - set(placed.values()))
    if empty:
        crowded = next(vm for vm, host in sorted(placed.items()) if list(placed.values()).count(host) > 1)
        pool.cli("vm", "migrate", crowded, "--to", empty[0], timeout=600)
    placed = pool.where()
    assert sorted(placed.values()) == ["h1", "h2", "h3"], placed
    assert "still has" in pool.refused("host", "standby", "h2")
    plan = pool.json("pool", "consolidate")
    summary = plan["summary"]
    assert summary["hosts_freed"] == 1 and summary["hosts_used"] == 2 and len(plan["moves"]) == 1, summary
    assert summary["optimum_hosts_used"] == 2 and summary["gap"] == 0.0, summary
    done = pool.json("pool", "plan", "approve", plan["id"], timeout=900)
    assert done["state"] == "succeeded", done
    parked = done["summary"]["standby"]
    assert parked == summary["freed"], done
    placed = pool.where()
    assert parked[0] not in placed.values() and len(set(placed.values())) == 2, placed
    hosts = {h["name"]: h for h in pool.json("host", "list")}
    assert all(pool.json("vm", "show", vm)["state"] == "running" for vm in placed)

    # Nothing awake has room (drained): the create wakes the standby host and lands there.
    awake = sorted(set(hosts) - set(parked))
    for name in awake:
        pool.cli("host", "drain", name, "--keep-vms")
    try:
        pool.cli("vm", "create", "late", "--memory", "128M")
        assert pool.json("vm", "show", "late")["host"] == parked[0]
        lines = pool.cli("events", "--type", "host.", "--all-projects", "-n", "100", "--json").stdout.splitlines()
        seen = [(event["type"], event["resource"]["name"]) for event in map(json.loads, lines)]
        assert ("host.standby", parked[0]) in seen and ("host.wake", parked[0]) in seen, seen
        plan = pool.json("pool", "plan", "list")
        assert {p["kind"] for p in plan} == {"balance", "consolidate"}
        assert "standby" in pool.cli("host", "standby", "--help").stdout
    finally:
        for name in awake:
            pool.cli("host", "undrain", name, check=False)
        pool.cli("vm", "delete", "late", "--force", check=False)


def test_one_host_on_sqlite_keeps_a_history_too(daemon, tiny) -> None:  # type: ignore[no-untyped-def]
    """The default setup (`corral serve`, its own agent, SQLite): points are written and read the same way."""
    name = f"hist-{uuid.uuid4().hex[:6]}"
    daemon.cli("vm", "run", name, "--memory", "128M", timeout=400)
    try:
        stats = until(lambda: (s := daemon.cli_json("vm", "stats", name))["points"] and s, 60, "the first points")
        assert stats["average"]["memory"] > 0 and stats["points"][0]["host"]
        host = stats["points"][0]["host"]
        assert daemon.cli_json("host", "stats", host, "--since", "5m")["points"]
        text = daemon.cli("vm", "stats", name).stdout
        assert "CPUS BUSY" in text and "average" in text
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)
