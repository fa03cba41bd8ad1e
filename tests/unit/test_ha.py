"""HA decisions on a real PostgreSQL store (corral.cluster.ha) and an agent's lease and self-fence
(corral.host.lease), without QEMU: the "VMs" the watchdog kills are plain processes."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from corral.cluster import ha
from corral.cluster.resize import VMResize, resize
from corral.cluster.vm_rows import check_ha
from corral.errors import InvalidInput
from corral.host.lease import Lease
from corral.spec.job import JobKind
from corral.spec.vm import VMSpec
from corral.store.db import Store
from corral.store.models import VM, Event, Host, Job, Volume

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MARGIN = timedelta(seconds=5)


def test_a_host_expired_past_the_margin_is_taken_over() -> None:
    leases = {"h1": NOW - timedelta(seconds=6), "h2": NOW + timedelta(seconds=8), "h3": NOW + timedelta(seconds=9)}
    decision = ha.decide(leases, NOW, MARGIN)
    assert decision.take_over == ["h1"] and not decision.suspended


def test_a_lease_within_its_margin_is_left_alone() -> None:
    leases = {"h1": NOW - timedelta(seconds=4), "h2": NOW + timedelta(seconds=8)}
    assert ha.decide(leases, NOW, MARGIN).take_over == []


def test_most_hosts_expiring_at_once_restarts_nothing() -> None:
    gone = NOW - timedelta(seconds=30)
    decision = ha.decide({"h1": gone, "h2": gone, "h3": NOW + timedelta(seconds=5)}, NOW, MARGIN)
    assert decision.suspended and decision.take_over == [] and decision.expired == ["h1", "h2"]
    # A lone host cannot tell its own death from the store's: nothing either.
    assert ha.decide({"h1": gone}, NOW, MARGIN).suspended
    # Half is not most: one of two is taken over.
    assert ha.decide({"h1": gone, "h2": NOW}, NOW, MARGIN).take_over == ["h1"]


def test_ha_is_refused_on_sqlite(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'one.db'}")
    store.migrate()
    try:
        with store.session() as session, pytest.raises(InvalidInput, match="HA needs a pool"):
            check_ha(session, VMSpec(name="a", image="tiny", ha=True))
        with store.session() as session:
            check_ha(session, VMSpec(name="a", image="tiny"))  # no HA asked: fine
            session.add(VM(name="a", spec=VMSpec(name="a", image="tiny").model_dump(mode="json"), host="h1"))
        # `vm set --ha` goes through the same check, and changes nothing.
        with store.session() as session, pytest.raises(InvalidInput, match="HA needs a pool"):
            resize(session, "a", VMResize(ha=True))
        with store.reading() as session:
            assert session.scalars(select(VM.spec)).one()["ha"] is False
    finally:
        store.close()


@pytest.fixture
def pg(pg_template: Any) -> Any:
    store = Store(pg_template.create_database(f"t_{uuid.uuid4().hex[:12]}", template="corral_template"))
    store.migrate()
    yield store
    store.close()


def _host(name: str, pool_id: str, lease_in: float | None) -> Host:
    return Host(
        name=name,
        cpus=4,
        memory=8 << 30,
        storage_total=100 << 30,
        storage_free=90 << 30,
        qemu_version="7.2",
        usage={"pool_id": pool_id},
        state="online",
        lease_expires_at=None if lease_in is None else datetime.now(UTC) + timedelta(seconds=lease_in),
    )


def _vm(session: Any, name: str, host: str, running: bool = True, **spec: Any) -> VM:
    vm = VM(
        name=name,
        spec=VMSpec(name=name, image="tiny", memory=128 << 20, **spec).model_dump(mode="json"),
        host=host,
        desired_state="running" if running else "stopped",
        observed_state="running" if running else "stopped",
    )
    session.add(vm)
    session.flush()
    session.add(
        Volume(
            name=f"{name}-root", host=host, path=f"{vm.id}.qcow2", size=1 << 30, state="ready", role="root", vm_id=vm.id
        )
    )
    return vm


def test_takeover_restarts_ha_vms_by_priority_where_their_disks_are(pg: Store) -> None:
    with pg.session() as session:
        # h1 and h2 share a storage pool, h3 has its own; h1's lease ran out 20 s ago.
        session.add_all([_host("h1", "shared", -20), _host("h2", "shared", 10), _host("h3", "own", 10)])
        session.flush()
        _vm(session, "low", "h1", ha=True, ha_priority=1)
        _vm(session, "high", "h1", ha=True, ha_priority=9)
        _vm(session, "plain", "h1")
        _vm(session, "off", "h1", running=False, ha=True)
        _vm(session, "elsewhere", "h3", ha=True)
    with pg.session() as session:
        decision, done = ha.watch(session, 10.0)
    assert decision.take_over == ["h1"] and [t.host for t in done] == ["h1"]
    with pg.reading() as session:
        host = session.scalars(select(Host).where(Host.name == "h1")).one()
        assert (host.state, host.epoch) == ("dead", 1)
        vms = {vm.name: vm for vm in session.scalars(select(VM))}
        # Only h2 reaches h1's disks (the same pool): both HA VMs go there, with their disks.
        assert vms["high"].host == vms["low"].host == "h2"
        assert {v.host for v in session.scalars(select(Volume).where(Volume.vm_id == vms["high"].id))} == {"h2"}
        starts = list(session.scalars(select(Job).where(Job.kind == JobKind.VM_START).order_by(Job.created_at)))
        assert [(j.target_name, j.host) for j in starts] == [("high", "h2"), ("low", "h2")]
        assert vms["plain"].host == "h1" and vms["plain"].observed_state == "lost"
        assert "host h1 died" in vms["plain"].status_message and "not HA" in vms["plain"].status_message
        assert vms["off"].observed_state == "stopped" and vms["off"].host == "h1"
        assert vms["elsewhere"].host == "h3"
        types = {e.type for e in session.scalars(select(Event))}
        assert {"host.takeover", "vm.ha_restart"} <= types
    # A second pass finds nothing more to do (h1 is dead now, not a lease holder).
    with pg.session() as session:
        assert ha.watch(session, 10.0)[1] == []


def test_an_ha_vm_no_survivor_can_reach_is_recorded_lost(pg: Store) -> None:
    with pg.session() as session:
        session.add_all([_host("h1", "a", -20), _host("h2", "b", 10), _host("h3", "c", 10)])
        session.flush()
        _vm(session, "solo", "h1", ha=True)
    with pg.session() as session:
        ha.watch(session, 10.0)
    with pg.reading() as session:
        vm = session.scalars(select(VM).where(VM.name == "solo")).one()
        assert vm.host == "h1" and vm.observed_state == "lost"
        assert "no surviving host" in vm.status_message, vm.status_message


def test_a_host_with_nothing_to_recover_is_left_fenced(pg: Store) -> None:
    with pg.session() as session:
        session.add_all([_host("h1", "s", -20), _host("h2", "s", 10), _host("h3", "s", 10)])
        session.flush()
        _vm(session, "off", "h1", running=False, ha=True)
    with pg.session() as session:
        assert ha.watch(session, 10.0)[1] == []
    with pg.reading() as session:
        host = session.scalars(select(Host).where(Host.name == "h1")).one()
        assert (host.state, host.epoch) == ("fenced", 0)


def test_an_expired_lease_shows_fenced_until_the_takeover_or_a_renewal(pg: Store) -> None:
    """`host list` says "fenced" from the lease's expiry (database clock) until the takeover makes the host
    "dead"; a renewal in between makes it "online" again; placement never picks it meanwhile."""
    from corral.cluster import hosts, placement

    with pg.session() as session:
        # h1 expired 2 s ago: within the 5 s margin (lease time 10 s), so not taken over yet.
        session.add_all([_host("h1", "s", -2), _host("h2", "s", 10), _host("h3", "s", 10)])
        session.flush()
        _vm(session, "a", "h1", ha=True)
    with pg.session() as session:
        assert ha.watch(session, 10.0)[1] == []
    with pg.reading() as session:
        states = {name: state for name, state in session.execute(select(Host.name, Host.state))}
        assert states == {"h1": "fenced", "h2": "online", "h3": "online"}
        assert "h1" not in {h.name for h in placement.online_hosts(session)}
        assert (hosts.pool(session).online, hosts.pool(session).fenced) == (2, 1)
    # Its agent renews (the store answered again in time): online again, under the same epoch.
    lease = Lease(_agent(pg, 10.0), list)
    lease.epoch = 0
    assert lease.renew()
    with pg.reading() as session:
        assert session.scalars(select(Host.state).where(Host.name == "h1")).one() == "online"
    # It expires again, this time past the margin: fenced never stands in the way of the takeover.
    with pg.session() as session:
        session.execute(
            update(Host).where(Host.name == "h1").values(lease_expires_at=func.now() - timedelta(seconds=3))
        )
    with pg.session() as session:
        ha.watch(session, 10.0)
    with pg.reading() as session:
        assert session.scalars(select(Host.state).where(Host.name == "h1")).one() == "fenced"
    with pg.session() as session:
        session.execute(
            update(Host).where(Host.name == "h1").values(lease_expires_at=func.now() - timedelta(seconds=20))
        )
    with pg.session() as session:
        assert [t.host for t in ha.watch(session, 10.0)[1]] == ["h1"]
    with pg.reading() as session:
        host = session.scalars(select(Host).where(Host.name == "h1")).one()
        assert (host.state, host.epoch) == ("dead", 1)
        assert session.scalars(select(VM.host).where(VM.name == "a")).one() == "h2"


def test_a_store_wide_expiry_takes_nothing_over(pg: Store) -> None:
    with pg.session() as session:
        session.add_all([_host("h1", "s", -20), _host("h2", "s", -20), _host("h3", "s", 10)])
        session.flush()
        _vm(session, "a", "h1", ha=True)
    with pg.session() as session:
        decision, done = ha.watch(session, 10.0)
    assert decision.suspended and done == []
    with pg.reading() as session:
        assert session.scalars(select(VM.host)).one() == "h1"
        # Both expired hosts show what they did (fenced themselves); nothing was taken over.
        assert {name: state for name, state in session.execute(select(Host.name, Host.state))} == {
            "h1": "fenced",
            "h2": "fenced",
            "h3": "online",
        }
        assert "pool.ha_suspended" in set(session.scalars(select(Event.type)))


def _agent(store: Store, lease_time: float) -> Any:
    return SimpleNamespace(store=store, host_name="h1", settings=SimpleNamespace(lease_time=lease_time))


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def test_the_watchdog_fences_while_the_store_hangs(pg: Store) -> None:
    """The renewal blocks on a row lock held elsewhere (a store that hangs): the watchdog, which never touches
    the store, kills the HA VM's process before the lease runs out and spares the non-HA one."""
    with pg.session() as session:
        session.add(_host("h1", "s", 0))
        session.flush()
        ha_vm, plain = _vm(session, "a", "h1", ha=True), _vm(session, "b", "h1")
        ids = (ha_vm.id, plain.id)
    procs = {ids[0]: _sleeper(), ids[1]: _sleeper()}
    expected: list[str] = []
    lease = Lease(
        _agent(pg, 2.0), lambda: [(vm_id, p.pid, lambda v=vm_id: expected.append(v)) for vm_id, p in procs.items()]
    )
    blocker = pg.engine.connect()
    try:
        lease.acquire()
        with pg.reading() as session:
            expiry = session.scalar(select(Host.lease_expires_at))
        lease.start()
        time.sleep(1.0)
        assert lease.valid()
        transaction = blocker.begin()
        blocker.execute(text("SELECT id FROM hosts WHERE name = 'h1' FOR UPDATE"))
        blocked_at = time.monotonic()
        procs[ids[0]].wait(5)
        fenced_after = time.monotonic() - blocked_at
        assert procs[ids[1]].poll() is None, "a non-HA VM is not fenced"
        assert expected == [ids[0]] and lease.fenced and not lease.valid()
        with pg.reading() as session:
            db_now = session.scalar(select(func.now()))
        # The last renewal started at most 0.4 s before the block; the fence came before the lease ran out.
        assert fenced_after < 2.0, fenced_after
        assert db_now < session_expiry(pg, expiry), "fenced before the database's expiry"
        transaction.rollback()  # the store answers again: renewals succeed, the fence lifts
        deadline = time.monotonic() + 5
        while not lease.valid() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.valid() and not lease.taken_over and lease.killed == {ids[0]}
    finally:
        blocker.close()
        lease.release()
        for proc in procs.values():
            proc.kill()
            proc.wait()


def session_expiry(store: Store, first: datetime) -> datetime:
    """The latest lease expiry the renewer wrote (renewals before the block moved it past ``first``)."""
    with store.reading() as session:
        latest = session.scalar(select(Host.lease_expires_at))
    return max(first, latest)


def test_a_renewal_under_a_stale_epoch_fences_and_reports_the_takeover(pg: Store) -> None:
    with pg.session() as session:
        session.add(_host("h1", "s", 0))
        session.flush()
        vm_id = _vm(session, "a", "h1", ha=True).id
    proc = _sleeper()
    lease = Lease(_agent(pg, 10.0), lambda: [(vm_id, proc.pid, lambda: None)])
    try:
        lease.acquire()
        assert lease.renew() and lease.valid()
        with pg.session() as session:
            session.execute(update(Host).where(Host.name == "h1").values(epoch=Host.epoch + 1))
        assert not lease.renew()
        assert lease.taken_over and not lease.valid()
        proc.wait(5)
        lease.acquire()  # the agent rejoins under the new epoch
        assert lease.epoch == 1 and lease.valid() and lease.renew()
    finally:
        lease.release()
        proc.kill()
        proc.wait()


def test_release_gives_the_lease_up(pg: Store) -> None:
    with pg.session() as session:
        session.add(_host("h1", "s", 0))
    lease = Lease(_agent(pg, 10.0), list)
    lease.acquire()
    lease.start()
    lease.release()
    with pg.reading() as session:
        assert session.scalar(select(Host.lease_expires_at)) is None
    assert not any(t.is_alive() for t in threading.enumerate() if t.name in ("corral-lease", "corral-watchdog"))


def test_a_restarted_agent_removes_the_disk_copies_of_a_storage_move_it_was_running(pg: Store, tmp_path: Path) -> None:
    """Found by the migration chaos rounds: a source agent killed after the destination committed a storage move
    left the VM's old disk file behind for good. At start-up (its move job still marked running) it removes the
    copies of a VM the store now puts on a host with other storage, and keeps those on shared storage."""
    from corral.host.move_jobs import pool_identity, reclaim_moved
    from corral.layout import HostLayout

    layout = HostLayout(tmp_path / "h1")
    here = pool_identity(layout.pool())
    with pg.session() as session:
        session.add_all([_host("h1", here, 10), _host("h2", "other", 10), _host("h3", here, 10)])
        session.flush()
        moved, shared = _vm(session, "moved", "h2"), _vm(session, "shared", "h3")
        for vm, to in ((moved, "h2"), (shared, "h3")):
            session.add(
                Job(
                    kind=JobKind.VM_MIGRATE,
                    target_kind="vm",
                    target_name=vm.name,
                    target_id=vm.id,
                    host="h1",
                    state="running",
                    params={"to": to, "with_storage": True, "dest_job": "x"},
                )
            )
        files = {vm.name: layout.pool() / f"{vm.id}.qcow2" for vm in (moved, shared)}
    for path in files.values():
        path.write_bytes(b"disk")
    agent = SimpleNamespace(store=pg, host_name="h1", layout=layout, settings=SimpleNamespace())
    reclaim_moved(agent)  # type: ignore[arg-type]
    assert not files["moved"].exists(), "the moved VM's old copy is nobody's any more"
    assert files["shared"].exists(), "on shared storage the file is the one the VM uses"
