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
from corral.store.db import Store
from corral.store.models import VM, Host, Job, Replica, Volume


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
