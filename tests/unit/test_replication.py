"""The pure parts of replication: intervals, what `vm show` says, and how a replica finishes a half-applied copy."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from corral.cluster import ha, replication
from corral.errors import Conflict, InvalidInput
from corral.host.replication_jobs import _files, recover
from corral.spec.job import JobKind
from corral.spec.vm import VMSpec
from corral.store import jobs
from corral.store.db import Store
from corral.store.models import VM, Event, Host, Job, Replica, Volume


@pytest.mark.parametrize("text", ["0s", "-5s", "2s", "9", "soon"])
def test_intervals_too_short_or_malformed_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        replication.check_interval(text)


def test_an_interval_is_seconds() -> None:
    assert replication.check_interval("90s") == 90
    assert replication.check_interval("5m") == 300


def test_describe_states_the_bound_and_the_age() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    row = Replica(
        vm_name="web",
        partner="h2",
        every=60.0,
        state="ready",
        copies=3,
        last_at=now - timedelta(seconds=42),
        last_kind="incremental",
        last_consistent=True,
        last_bytes=65536,
        next_at=now + timedelta(seconds=18),
    )
    shown = replication.describe(row, now)
    assert shown["age_seconds"] == 42 and shown["data_loss_bound_seconds"] == 60 and shown["partner"] == "h2"
    row.last_at = None
    assert replication.describe(row, now)["age_seconds"] is None


def _qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-utils is not installed")
def test_recover_commits_a_layer_being_applied_and_drops_one_being_received(tmp_path: Path) -> None:
    files = _files(tmp_path, 0)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(files["base"]), "4M"], check=True)
    _qemu_io(files["base"], "write -P 0x11 0 64k")
    for kind, pattern in (("applying", "0x22"), ("incoming", "0x33")):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk0.qcow2", "-F", "qcow2", str(files[kind]), "4M"],
            check=True,
            cwd=tmp_path,
        )
        _qemu_io(files[kind], f"write -P {pattern} 64k 64k")
    recover(tmp_path, 0, "qemu-img")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk0.qcow2"]
    _qemu_io(files["base"], "read -P 0x11 0 64k")  # the old copy's blocks stay
    _qemu_io(files["base"], "read -P 0x22 64k 64k")  # the applied layer's went in; the received one's did not


# -- the control plane on a real PostgreSQL store ----------------------------------------------------------------


@pytest.fixture
def pg(pg_template: Any) -> Any:
    store = Store(pg_template.create_database(f"t_{uuid.uuid4().hex[:12]}", template="corral_template"))
    store.migrate()
    yield store
    store.close()


def _host(name: str, lease_in: float) -> Host:
    return Host(
        name=name,
        cpus=4,
        memory=8 << 30,
        storage_total=100 << 30,
        storage_free=90 << 30,
        qemu_version="7.2",
        usage={"pool_id": f"pool-of-{name}"},  # every host its own storage
        state="online",
        lease_expires_at=datetime.now(UTC) + timedelta(seconds=lease_in),
    )


def _vm(session: Any, name: str, host: str, partner: str | None, running: bool = True, **spec: Any) -> VM:
    vm = VM(
        name=name,
        spec=VMSpec(name=name, image="tiny", memory=128 << 20, **spec).model_dump(mode="json"),
        host=host,
        desired_state="running" if running else "stopped",
        observed_state="running" if running else "stopped",
    )
    session.add(vm)
    session.flush()
    volume = Volume(
        name=f"{name}-root", host=host, path=f"vol-{vm.id}.qcow2", size=1 << 30, state="ready", role="root", vm_id=vm.id
    )
    session.add(volume)
    session.flush()
    if partner is not None:
        session.add(
            Replica(
                vm_name=name,
                vm_id=vm.id,
                partner=partner,
                every=60.0,
                state="ready",
                copies=2,
                last_at=datetime.now(UTC) - timedelta(seconds=30),
                disks=[{"index": 0, "volume_id": volume.id, "device_index": 0, "pool": "default", "size": 1 << 30}],
                next_at=datetime.now(UTC) + timedelta(seconds=30),
            )
        )
    return vm


def _jobs(session: Any, kind: str) -> list[tuple[str, str | None]]:
    return [(j.target_name, j.host) for j in session.scalars(select(Job).where(Job.kind == kind))]


def test_a_dead_hosts_ha_vm_restarts_from_its_replica(pg: Store) -> None:
    with pg.session() as session:
        session.add_all([_host("h1", -20), _host("h2", 10), _host("h3", 10)])
        session.flush()
        _vm(session, "rv", "h1", "h2", ha=True)
        _vm(session, "nv", "h1", "h3")
    with pg.session() as session:
        _, done = ha.watch(session, 10.0)
    assert done and done[0].restarted == [("rv", "h2")]
    with pg.reading() as session:
        vms = {vm.name: vm for vm in session.scalars(select(VM))}
        assert vms["rv"].host == "h2" and "from its replica" in vms["rv"].status_message
        assert {(v.host, v.state, v.backing_path) for v in vms["rv"].volumes} == {("h2", "pending", None)}
        assert _jobs(session, JobKind.VM_FAILOVER) == [("rv", "h2")]
        # Its stale disk on h1 goes when h1's agent comes back; h2 is never asked to start it from elsewhere.
        assert _jobs(session, JobKind.VM_REPLICA_REMOVE) == [("rv", "h1")]
        assert _jobs(session, JobKind.VM_START) == []
        assert vms["nv"].observed_state == "lost" and "corral vm failover nv" in vms["nv"].status_message


def test_failover_is_refused_while_the_vm_may_still_run(pg: Store) -> None:
    with pg.session() as session:
        session.add_all([_host("h1", 10), _host("h2", 10)])
        session.flush()
        _vm(session, "rv", "h1", "h2")
        _vm(session, "sv", "h1", "h2", running=False)
    with pg.session() as session, pytest.raises(Conflict, match="would run it twice"):
        replication.failover(session, "rv")
    with pg.session() as session, pytest.raises(InvalidInput, match="is on host h2, not h1"):
        replication.failover(session, "sv", to="h1")
    with pg.reading() as session:
        assert session.scalars(select(Job)).all() == []
    with pg.session() as session:  # a stopped VM may fail over while its host lives
        job = replication.failover(session, "sv")
        assert (job.kind, job.host) == (JobKind.VM_FAILOVER, "h2")


def test_the_runner_copies_running_vms_when_due(pg: Store) -> None:
    with pg.session() as session:
        session.add_all([_host("h1", 10), _host("h2", 10)])
        session.flush()
        _vm(session, "rv", "h1", "h2")
        _vm(session, "sv", "h1", "h2", running=False)
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert replication.run_once(pg, later) == 1
    with pg.reading() as session:
        assert _jobs(session, JobKind.VM_REPLICATE) == [("rv", "h1")]
        assert _jobs(session, JobKind.VM_REPLICA_RECEIVE) == [("rv", "h2")]
        stopped = session.scalars(select(Replica).where(Replica.vm_name == "sv")).one()
        assert stopped.next_at > later  # a stopped VM writes nothing: its copy waits a period
    # The copy still runs: the next pass refuses a second one and says why.
    assert replication.run_once(pg, later + timedelta(seconds=61)) == 0
    with pg.reading() as session:
        row = session.scalars(select(Replica).where(Replica.vm_name == "rv")).one()
        assert "busy with vm.re" in (row.last_error or ""), row.last_error
    with pg.session() as session, pytest.raises(Conflict, match="a copy of VM rv"):
        replication.remove(session, "rv")


def test_a_failed_failover_puts_the_replica_and_the_vm_back(pg: Store) -> None:
    """The failover job fails on the partner (here: a file in the way): the replica is no longer "promoting" but
    ready again with the error, the VM is back on its dead host with its disks' rows as they were, and a
    second `vm failover` is accepted."""
    with pg.session() as session:
        session.add_all([_host("h1", -20), _host("h2", 10), _host("h3", 10)])
        session.flush()
        vm = _vm(session, "rv", "h1", "h2", ha=True)
        vm.volumes[0].backing_path = "images/tiny.qcow2"
    with pg.session() as session:
        ha.watch(session, 10.0)
    with pg.reading() as session:
        assert session.scalars(select(Replica.state)).one() == "promoting"
        job_id = session.scalars(select(Job.id).where(Job.kind == JobKind.VM_FAILOVER)).one()
    jobs.finish(pg, job_id, error=Conflict("a file is already where disk rv-root belongs on h2"))
    replication.run_once(pg)
    with pg.reading() as session:
        row = session.scalars(select(Replica)).one()
        assert row.state == "ready" and "failover to h2 failed: a file is already" in (row.last_error or "")
        vm = session.scalars(select(VM).where(VM.name == "rv")).one()
        assert (vm.host, vm.observed_state) == ("h1", "lost") and "corral vm failover rv" in vm.status_message
        assert {(v.host, v.state, v.backing_path) for v in vm.volumes} == {("h1", "ready", "images/tiny.qcow2")}
        assert "vm.failover_failed" in set(session.scalars(select(Event.type)))
    with pg.session() as session:  # asked again: accepted, as before the failed try
        assert replication.failover(session, "rv").host == "h2"


def test_a_failover_its_agent_did_not_finish_is_settled_too(pg: Store) -> None:
    """The partner's agent died during the failover of a stopped VM: its restart fails the job, and the VM is
    stopped on its own host again, its replica ready."""
    with pg.session() as session:
        session.add_all([_host("h1", 10), _host("h2", 10)])
        session.flush()
        _vm(session, "sv", "h1", "h2", running=False)
    with pg.session() as session:
        replication.failover(session, "sv")
    assert jobs.claim(pg, "h2") is not None
    assert [j.kind for j in jobs.fail_orphans(pg, "h2")] == [JobKind.VM_FAILOVER]
    with pg.session() as session:
        assert replication.settle_failovers(session) == ["sv"]
    with pg.reading() as session:
        assert session.scalars(select(Replica.state)).one() == "ready"
        vm = session.scalars(select(VM).where(VM.name == "sv")).one()
        assert (vm.host, vm.desired_state, vm.observed_state) == ("h1", "stopped", "stopped")
        assert "the agent restarted while this job ran" in vm.status_message
    with pg.session() as session:  # nothing left to settle
        assert replication.settle_failovers(session) == []


def _storage_daemon(socket: Path) -> subprocess.Popen[bytes]:
    socket.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-storage-daemon", "--chardev", f"socket,id=qmp,path={socket},server=on,wait=off"]
    return subprocess.Popen([*argv, "--monitor", "chardev=qmp"], start_new_session=True)


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon is not installed")
def test_an_agent_that_starts_ends_the_storage_daemon_a_killed_receive_left(tmp_path: Path) -> None:
    """A partner agent SIGKILLed during a copy leaves its receive's qemu-storage-daemon running (an NBD export of
    a replica layer). The next agent on that home ends it at start-up; another installation's daemon is spared."""
    import asyncio
    from types import SimpleNamespace

    from corral.host.orphans import settle_unrecorded

    home, other = tmp_path / "home", tmp_path / "other"
    left = _storage_daemon(home / "run" / "rpl-0123456789ab.qmp")
    theirs = _storage_daemon(other / "run" / "rpl-0123456789ab.qmp")
    try:
        agent = SimpleNamespace(layout=SimpleNamespace(home=home))
        outcome = asyncio.run(settle_unrecorded(agent))  # type: ignore[arg-type]
        assert outcome["storage_daemons"] == [str(left.pid)]
        assert left.wait(10) == -9
        assert theirs.poll() is None, "another installation's daemon is not this agent's to end"
        # A second start finds nothing left.
        assert asyncio.run(settle_unrecorded(agent))["storage_daemons"] == []  # type: ignore[arg-type]
    finally:
        for proc in (left, theirs):
            proc.kill()
            proc.wait()
