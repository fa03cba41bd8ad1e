"""Backup schedules, retention, verify and a backup directory outside CORRAL_HOME, on a real daemon and VM."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from corral.localpool import LocalPool
from tests.conftest import Daemon, new_home, require, unique

pytestmark = pytest.mark.integration

EVERY = 3.0  # the test schedule's interval; the daemon allows down to 1 s (backup_min_interval)


@pytest.fixture(scope="module")
def bench(qemu_available):  # type: ignore[no-untyped-def]
    """A daemon of this module's own: schedules of seconds, and backups in a directory outside its home."""
    backup_dir = Path(tempfile.mkdtemp(prefix="corral-bkdir-", dir="/tmp")) / "store"
    corral = Daemon(new_home(), {"CORRAL_BACKUP_MIN_INTERVAL": "1", "CORRAL_BACKUP_DIR": str(backup_dir)})
    try:
        corral.start()
        corral.cli("image", "build", "tiny", timeout=1800)
        yield corral, backup_dir
    finally:
        corral.cleanup()
        shutil.rmtree(corral.home, ignore_errors=True)
        shutil.rmtree(backup_dir.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(bench):  # type: ignore[no-untyped-def]
    daemon, _ = bench
    name = unique("sch")
    daemon.cli("vm", "run", name)
    daemon.cli("vm", "exec", name, "--", "sh", "-c", "echo kept > /root/marker; sync")
    yield name
    daemon.cli("backup", "schedule", "rm", name, check=False)
    daemon.cli("vm", "delete", name, "--force", check=False)


def _backups(daemon: Daemon, vm: str) -> list[dict]:  # type: ignore[type-arg]
    return daemon.cli_json("backup", "list", vm)  # type: ignore[return-value]


def _idle(daemon: Daemon, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while [j for j in daemon.cli_json("job", "list") if j["state"] in ("queued", "running")]:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.5)


def _metric(daemon: Daemon, name: str, vm: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with daemon.client() as corral:
        families = {f.name: f for f in text_string_to_metric_families(corral.metrics())}
    return next(s.value for s in families[name].samples if s.labels["vm"] == vm)


def _assert_chains_whole(rows: list[dict]) -> None:  # type: ignore[type-arg]
    """Every listed backup restores through a chain that starts with a full backup still listed."""
    names = {r["name"] for r in rows}
    for row in rows:
        assert row["chain"][-1] == row["name"]
        assert set(row["chain"]) <= names, f"{row['name']} lost part of its chain {row['chain']}"
        first = next(r for r in rows if r["name"] == row["chain"][0])
        assert first["kind"] == "full", f"{row['name']}'s chain starts with {first['kind']} {first['name']}"


def test_bad_schedules_change_nothing(bench, vm):  # type: ignore[no-untyped-def]
    daemon, _ = bench
    cases = [
        (["backup", "schedule", vm, "--every", "0s"], 2, "out of range"),
        (["backup", "schedule", vm, "--every", "0.5s"], 2, "shorter than the minimum"),
        (["backup", "schedule", vm, "--every", "soon"], 2, "not a duration"),
        (
            ["backup", "schedule", vm, "--every", "1h", "--keep-last", "0", "--keep-daily", "0", "--keep-weekly", "0"],
            2,
            "keeps nothing",
        ),
        (["backup", "schedule", "no-such-vm", "--every", "1h"], 1, "no-such-vm"),
        (["backup", "schedule", vm], 2, "--every"),
        (["backup", "schedule", "rm", "no-such-vm"], 1, "no backup schedule"),
        (["backup", "verify", vm, "no-such-backup"], 1, "no backup"),
    ]
    for args, code, message in cases:
        result = daemon.cli(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) <= 2, result.stderr  # one line and its hint
    assert daemon.cli_json("backup", "schedule", "list") == []
    assert _backups(daemon, vm) == []


def test_a_schedule_backs_up_on_time_and_prunes_without_breaking_a_chain(bench, vm):  # type: ignore[no-untyped-def]
    daemon, backup_dir = bench
    row = daemon.cli_json(
        "backup",
        "schedule",
        vm,
        "--every",
        f"{EVERY:g}s",
        "--keep-last",
        "2",
        "--keep-daily",
        "0",
        "--keep-weekly",
        "0",
        "--incremental-every",
        "2",
    )
    assert row["every"] == EVERY and row["keep_last"] == 2
    listed = daemon.cli_json("backup", "schedule", "list")
    assert [s["vm"] for s in listed] == [vm]  # type: ignore[union-attr]
    seen: dict[str, dict] = {}  # type: ignore[type-arg]
    deadline = time.monotonic() + 150
    while len(seen) < 7:
        assert time.monotonic() < deadline, f"only {len(seen)} scheduled backups in time"
        rows = _backups(daemon, vm)
        _assert_chains_whole(rows)  # sampled all along: pruning never leaves a backup without its base
        for r in rows:
            assert r["scheduled"]
            seen.setdefault(r["name"], r)
        time.sleep(0.5)
    daemon.cli("backup", "schedule", "rm", vm)
    assert daemon.cli_json("backup", "schedule", "list") == []
    _idle(daemon)

    # On time: one about every EVERY seconds (the runner passes once a second; the host is busy under TCG).
    times = sorted(datetime.fromisoformat(r["created_at"]) for r in seen.values())
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    # A backup still running when the next is due delays that one by at most RETRY_AFTER (5 s).
    assert all(EVERY - 1.5 <= gap <= EVERY + 6 for gap in gaps), gaps
    # Two incrementals after each full.
    kinds = [r["kind"] for r in sorted(seen.values(), key=lambda r: r["created_at"])]
    assert kinds[:6] == ["full", "incremental", "incremental"] * 2, kinds

    # Pruned to the two newest and what they build on, nothing else, files included.
    rows = [r for r in _backups(daemon, vm) if r["state"] == "ready"]
    _assert_chains_whole(rows)
    newest = sorted(rows, key=lambda r: r["created_at"])[-2:]
    expected = {name for r in newest for name in r["chain"]}
    assert {r["name"] for r in rows} == expected
    assert len(seen) > len(expected)  # something was pruned
    ids = {p.name for p in backup_dir.iterdir() if p.is_dir()}
    assert len(ids) == len(expected), ids
    assert not (daemon.home / "backups").exists() or not any((daemon.home / "backups").iterdir())


def test_verify_reads_back_and_catches_a_corrupted_file(bench, vm):  # type: ignore[no-untyped-def]
    daemon, backup_dir = bench
    daemon.cli("backup", "create", vm, "--name", "vfull")
    daemon.cli("backup", "create", vm, "--incremental", "--name", "vinc")
    ok = daemon.cli_json("backup", "verify", vm, "vinc", "--boot")  # with the restore test into a scratch VM
    assert ok["result"]["state"] == "ok" and ok["result"]["chain"] == ["vfull", "vinc"]  # type: ignore[index]
    assert ok["result"]["boot"]["ok"]  # type: ignore[index]
    assert {v["name"] for v in daemon.cli_json("vm", "list")} == {vm}  # type: ignore[attr-defined]
    shown = daemon.cli_json("backup", "show", vm, "vinc")
    assert shown["verify_state"] == "ok" and shown["verified_at"]  # type: ignore[index]
    assert all(len(d["sha256"]) == 64 for d in shown["disks"])  # type: ignore[index]
    assert _metric(daemon, "corral_backup_last_verified_timestamp_seconds", vm) >= time.time() - 120
    assert _metric(daemon, "corral_backups_corrupt", vm) == 0

    # Flip bytes inside the full backup's data (its qcow2 metadata stays valid: only the checksum can tell).
    full = daemon.cli_json("backup", "show", vm, "vfull")
    path = backup_dir / full["disks"][0]["file"]  # type: ignore[index]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    path.chmod(0o400)
    assert subprocess.run(["qemu-img", "check", str(path)], capture_output=True).returncode == 0

    bad = daemon.cli("backup", "verify", vm, "vinc", check=False)
    assert bad.returncode != 0
    assert "corrupt" in bad.stderr and "vfull" in bad.stderr, bad.stderr
    shown = daemon.cli_json("backup", "show", vm, "vinc")
    assert shown["verify_state"] == "corrupt" and "SHA-256" in shown["verify_error"]  # type: ignore[index]
    listing = daemon.cli("backup", "list", vm).stdout
    assert "CORRUPT" in listing
    lines = daemon.cli("events", "--type", "backup.verified", "--resource", "vinc", "--json").stdout.splitlines()
    assert [json.loads(line)["data"]["state"] for line in lines] == ["ok", "corrupt"]
    assert _metric(daemon, "corral_backups_corrupt", vm) == 1
    _idle(daemon)
    daemon.cli("backup", "delete", vm, "vinc")
    daemon.cli("backup", "delete", vm, "vfull")


def test_restore_from_a_backup_dir_outside_the_home(bench, vm):  # type: ignore[no-untyped-def]
    daemon, backup_dir = bench
    rows = [r for r in _backups(daemon, vm) if r["kind"] == "incremental"]
    assert rows, "the schedule test left its newest chain"
    source = rows[-1]
    assert (backup_dir / source["disks"][0]["file"]).is_file()
    copy = unique("rst")
    daemon.cli("backup", "restore", vm, source["name"], "--as", copy)
    try:
        daemon.cli("vm", "start", copy, "--wait", timeout=180)
        out = daemon.cli("vm", "exec", copy, "--", "cat", "/root/marker").stdout
        assert out.strip() == "kept"
    finally:
        daemon.cli("vm", "delete", copy, "--force", check=False)
    # The host reports the backup directory's identity: another host that mounts it reports the same, and jobs
    # reading the backup may then run there (corral.cluster.backups.reader_host).
    host = daemon.cli_json("host", "list")[0]  # type: ignore[index]
    assert host["usage"]["backup_store"] == (backup_dir / "store-id").read_text().strip()
    shown = daemon.cli_json("backup", "show", vm, source["name"])
    assert shown["backup_store"] == host["usage"]["backup_store"]  # type: ignore[index]


# -- a pool: a backup on a shared directory outlives the host that made it ---------------------------------------


@pytest.fixture(scope="module")
def pool(postgres):  # type: ignore[no-untyped-def]
    """Two agents (own storage pools, one images directory) and a control plane on PostgreSQL, all writing backups
    to one directory, as hosts mounting one NFS export would."""
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"bks_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={postgres.root}&port={postgres.port}"  # the socket: no netns
    shared = Path(tempfile.mkdtemp(prefix="corral-bknfs-", dir="/tmp"))
    images = new_home("cs-img-")
    lab = LocalPool(
        url,
        prefix="cs",
        make_home=lambda host: new_home(f"cs-{host}-"),
        settings={"CORRAL_ACCEL": "tcg", "CORRAL_BACKUP_DIR": str(shared / "backups")},
    )
    try:
        lab.network()
        lab.start_control()
        lab.add_host("h1", images=images)
        lab.add_host("h2", images=images)
        lab.wait_online(["h1", "h2"])
        lab.cli("image", "build", "tiny", timeout=1800)
        yield lab
    finally:
        lab.close()
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_backup_restores_on_another_host_when_its_own_is_gone(pool):  # type: ignore[no-untyped-def]
    def cli_json(*argv: str) -> Any:
        return json.loads(pool.cli(*argv, "--json").stdout)

    name = unique("far")
    pool.cli("vm", "run", name, "--host", "h1")
    pool.cli("vm", "exec", name, "--", "sh", "-c", "echo far > /root/marker; sync")
    pool.cli("backup", "create", name, "--name", "b1")
    hosts = {h["name"]: h for h in cli_json("host", "list")}
    assert hosts["h1"]["usage"]["backup_store"] == hosts["h2"]["usage"]["backup_store"] is not None
    pool.cli("vm", "stop", name)
    pool.agents["h1"].stop()  # h1 is gone: its backups are still on the shared directory
    deadline = time.monotonic() + 30
    while {h["name"]: h["state"] for h in cli_json("host", "list")}["h1"] == "online":
        assert time.monotonic() < deadline, "h1 stayed online"
        time.sleep(0.5)
    try:
        verified = cli_json("backup", "verify", name, "b1")
        assert verified["host"] == "h2" and verified["result"]["state"] == "ok"
        copy = unique("near")
        restored = cli_json("backup", "restore", name, "b1", "--as", copy)
        assert restored["host"] == "h2"
        pool.cli("vm", "start", copy, "--wait", timeout=180)
        assert pool.cli("vm", "exec", copy, "--", "cat", "/root/marker").stdout.strip() == "far"
        pool.cli("vm", "delete", copy, "--force")
    finally:
        pool.agents["h1"].start()
        pool.wait_online(["h1", "h2"])
