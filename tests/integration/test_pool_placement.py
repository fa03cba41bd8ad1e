"""A pool's control plane on a real PostgreSQL: `corral serve --db ... --no-agent`, hosts registered in the store
with small capacities, and many creates at once through the API. No QEMU runs: the VMs are created stopped (or
their start jobs stay queued), which is all placement needs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import pytest

from corral.errors import CorralError, InsufficientResources
from corral.store.db import Store
from corral.store.models import VM, Host, Image
from tests.conftest import new_home

GIB = 1 << 30


@pytest.fixture
def pool_api(postgres):  # type: ignore[no-untyped-def]
    """A control plane without an agent on a fresh database; yields (store, client factory)."""
    url = postgres.create_database(f"pool_{uuid.uuid4().hex[:10]}")
    store = Store(url)
    store.migrate()
    home = new_home()
    env = {**os.environ, "CORRAL_HOME": str(home), "CORRAL_DB": url, "CORRAL_DEFAULT_NETWORK": "0"}
    env.pop("CORRAL_URL", None)
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--no-agent", "--log-level", "info"],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )

    from corral.client import Client

    def client() -> Client:
        return Client(home=home, timeout=60)

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (home / "serve.log").read_text()[-2000:]
            try:
                with client() as corral:
                    corral.health()
                break
            except CorralError:
                assert time.monotonic() < deadline, "the control plane did not answer"
                time.sleep(0.2)
        yield store, client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        store.close()
        subprocess.run(["rm", "-rf", str(home)], check=False)


def _register(store: Store, hosts: dict[str, dict[str, object]]) -> None:
    """Hosts as their agents would register them (fresh heartbeats), and a ready 1 GiB image."""
    with store.session() as session:
        for name, extra in hosts.items():
            values = {
                "cpus": 2,
                "memory": 4 * GIB,
                "storage_total": 3 * GIB,
                "storage_free": 3 * GIB,
                "qemu_version": "7.2.22",
                "cpu_overcommit": 1.0,
                "memory_overcommit": 1.0,
                "storage_overcommit": 1.0,
                "reserved_memory": 0,
                **extra,
            }
            session.add(Host(name=name, **values))
        session.add(Image(name="tiny", state="ready", kind="kernel", virtual_size=GIB))


def _create_all(client, names: list[str], **options: object) -> dict[str, BaseException | None]:  # type: ignore[no-untyped-def]
    """Every create at the same moment, each from its own thread and connection."""
    outcome: dict[str, BaseException | None] = {}
    barrier = threading.Barrier(len(names))

    def create(name: str) -> None:
        with client() as corral:
            barrier.wait()
            try:
                corral.create_vm({"name": name, "image": "tiny", "memory": "256M"}, **options)
                outcome[name] = None
            except BaseException as exc:
                outcome[name] = exc

    threads = [threading.Thread(target=create, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcome


def _hosts_of(store: Store) -> Counter[str]:
    with store.reading() as session:
        return Counter(vm.host for vm in session.query(VM))


def test_twenty_concurrent_creates_never_overbook_and_skip_the_drained_host(pool_api):
    store, client = pool_api
    # Five hosts with room for three 1 GiB disks each, and a large drained one that must never be chosen.
    _register(store, {**{f"h{i}": {} for i in range(5)}, "big": {"storage_total": 100 * GIB, "drained": True}})
    outcome = _create_all(client, [f"vm{i:02d}" for i in range(20)])
    made = [name for name, error in outcome.items() if error is None]
    refused = [error for error in outcome.values() if error is not None]
    assert len(made) == 15 and len(refused) == 5
    assert all(isinstance(error, InsufficientResources) for error in refused), refused
    per_host = _hosts_of(store)
    assert "big" not in per_host
    assert per_host == Counter({f"h{i}": 3 for i in range(5)})


def test_concurrent_running_creates_respect_cpu_capacity(pool_api):
    store, client = pool_api
    # 2 vCPUs per host, no overcommit: four hosts take eight running VMs, whatever the interleaving.
    _register(store, {f"h{i}": {"storage_total": 100 * GIB} for i in range(4)})
    outcome = _create_all(client, [f"vm{i:02d}" for i in range(12)], start=True)
    assert sum(error is None for error in outcome.values()) == 8
    assert _hosts_of(store) == Counter({f"h{i}": 2 for i in range(4)})


def test_concurrent_anti_affinity_members_land_on_different_hosts(pool_api):
    store, client = pool_api
    _register(store, {f"h{i}": {"storage_total": 100 * GIB} for i in range(4)})
    outcome = _create_all(client, [f"web{i}" for i in range(6)], group="web", policy="anti-affinity")
    made = [name for name, error in outcome.items() if error is None]
    assert len(made) == 4, outcome
    assert _hosts_of(store) == Counter({f"h{i}": 1 for i in range(4)})
    with client() as corral:
        plan = corral.create_vm({"name": "web9", "image": "tiny"}, group="web", dry_run=True)
    assert plan["chosen"] is None
    assert all("anti-affinity" in verdict["reason"] for verdict in plan["hosts"])


def test_host_commands_and_pool_totals(pool_api):
    store, client = pool_api
    _register(store, {"h0": {}, "h1": {}})
    with client() as corral:
        corral.create_vm({"name": "one", "image": "tiny"}, host="h0")
        corral.drain_host("h1")
        assert corral.host("h1")["drained"] is True
        pool = corral.pool()
        assert pool["hosts"] == 2 and pool["drained"] == 1 and pool["vms"] == 1
        assert pool["storage"]["allocated"] == GIB and pool["cpu"]["capacity"] == 4
        with pytest.raises(CorralError, match="still has 1 VM"):
            corral.remove_host("h0")
        with pytest.raises(CorralError, match="is online"):
            corral.remove_host("h1")
    with store.session() as session:
        session.query(Host).filter_by(name="h1").one().state = "offline"
    with client() as corral:
        corral.remove_host("h1")
        assert [h["name"] for h in corral.hosts()] == ["h0"]
