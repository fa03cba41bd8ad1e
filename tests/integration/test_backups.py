"""Backups (full and incremental, live and offline), restore, export and import on real VMs and qcow2 files."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import unique

pytestmark = pytest.mark.integration


def _exec(daemon, vm: str, script: str) -> str:  # type: ignore[no-untyped-def]
    return daemon.cli("vm", "exec", vm, "--", "sh", "-c", script).stdout


def _markers(daemon, vm: str) -> set[str]:  # type: ignore[no-untyped-def]
    out = _exec(daemon, vm, "cat /root/m1 /root/m2 /root/m3 2>/dev/null; true")
    return set(out.split())


def _check_disks(daemon, vm: str) -> None:  # type: ignore[no-untyped-def]
    pool = daemon.home / "pools" / "default"
    for disk in daemon.cli_json("vm", "show", vm)["disks"]:
        path = pool / disk["path"]
        result = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
            ).stdout
        )
        assert "backing-filename" not in info, "a restored disk stands alone"


def _boots_with(daemon, vm: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    daemon.cli("vm", "start", vm, "--wait", timeout=180)
    try:
        assert _markers(daemon, vm) == expected
    finally:
        daemon.cli("vm", "delete", vm, "--force", check=False)


def _vm_names(daemon) -> set[str]:  # type: ignore[no-untyped-def]
    return {v["name"] for v in daemon.cli_json("vm", "list")}


def _no_leftovers(daemon) -> None:  # type: ignore[no-untyped-def]
    assert not [j for j in daemon.cli_json("job", "list") if j["state"] in ("queued", "running")]
    backups = daemon.home / "backups"
    assert not [p for p in backups.glob(".*")] if backups.exists() else True
    assert not list((daemon.home / "pools" / "default").glob("*.restoring"))


@pytest.fixture(scope="module")
def vm(daemon, tiny):  # type: ignore[no-untyped-def]
    name = unique("bk")
    daemon.cli("vm", "run", name)
    yield name
    daemon.cli("vm", "delete", name, "--force", check=False)


@pytest.fixture(scope="module")
def chain(daemon, vm):  # type: ignore[no-untyped-def]
    """m1, a live full backup, m2, a live incremental one, then m3 (in no backup)."""
    _exec(daemon, vm, "echo one > /root/m1; sync")
    full = daemon.cli_json("backup", "create", vm, "--name", "full1")
    assert full["result"]["live"] and full["result"]["kind"] == "full"
    _exec(daemon, vm, "echo two > /root/m2; sync")
    inc = daemon.cli_json("backup", "create", vm, "--incremental", "--name", "inc1")
    assert inc["result"]["kind"] == "incremental"
    _exec(daemon, vm, "echo three > /root/m3; sync")
    return full["result"], inc["result"]


def test_incremental_backup_holds_only_the_changes(daemon, vm, chain):
    full, inc = chain
    assert inc["bytes"] < full["bytes"] / 4, (full, inc)
    rows = {r["name"]: r for r in daemon.cli_json("backup", "list", vm)}
    assert rows["inc1"]["parent"] == "full1" and rows["inc1"]["chain"] == ["full1", "inc1"]
    shown = daemon.cli_json("backup", "show", vm, "inc1")
    assert shown["spec"]["name"] == vm
    backups = daemon.home / "backups"
    assert backups.stat().st_mode & 0o777 == 0o700
    for disk in shown["disks"]:  # the chain: the incremental's backing file is the full backup's disk
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(backups / disk["file"])],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["backing-filename"].startswith("../")


def test_restore_full_and_incremental_into_new_vms(daemon, vm, chain):
    r_full, r_inc = unique("rfull"), unique("rinc")
    daemon.cli("backup", "restore", vm, "full1", "--as", r_full)
    daemon.cli("backup", "restore", vm, "inc1", "--as", r_inc)
    _check_disks(daemon, r_full)
    _check_disks(daemon, r_inc)
    _boots_with(daemon, r_full, {"one"})
    _boots_with(daemon, r_inc, {"one", "two"})


def test_deleting_a_backup_in_the_middle_of_a_chain_is_refused(daemon, vm, chain):
    result = daemon.cli("backup", "delete", vm, "full1", check=False)
    assert result.returncode != 0 and "is the base of inc1" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # refused before any job: one line


def test_offline_incremental_and_restore_over_the_stopped_vm(daemon, vm, chain):
    daemon.cli("vm", "stop", vm)
    try:
        offline = daemon.cli_json("backup", "create", vm, "--incremental", "--name", "inc2")
        assert not offline["result"]["live"]
        # The stopped VM carries m1..m3; go back to inc1 (m1, m2) over its own disks.
        daemon.cli("backup", "restore", vm, "inc1")
        _check_disks(daemon, vm)
        daemon.cli("vm", "start", vm, "--wait", timeout=180)
        assert _markers(daemon, vm) == {"one", "two"}
        # Its disks were replaced, so the change record is gone: an incremental backup must say so.
        result = daemon.cli("backup", "create", vm, "--incremental", check=False)
        assert result.returncode != 0 and "take a full backup" in result.stderr, result.stderr
        daemon.cli("backup", "delete", vm, "inc2")
        restored = unique("rinc2")
        daemon.cli("backup", "restore", vm, "inc1", "--as", restored)
        _check_disks(daemon, restored)
        daemon.cli("vm", "delete", restored, "--force")
    finally:
        daemon.cli("vm", "start", vm, "--wait", check=False, timeout=180)
    _no_leftovers(daemon)


def test_export_and_import_as_a_new_vm(daemon, vm, tmp_path):
    _exec(daemon, vm, "echo exported > /root/m3; sync")
    archive = tmp_path / "vm.tar"
    daemon.cli("vm", "export", vm, str(archive))  # from the running VM
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["disks/disk0.qcow2", "manifest.json"]
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest["vm"]["name"] == vm and manifest["disks"][0]["sha256"]
    copy = unique("imp")
    daemon.cli("vm", "import", str(archive), "--name", copy)
    _check_disks(daemon, copy)
    _boots_with(daemon, copy, {"one", "two", "exported"})


def _tampered(source: Path, target: Path, change: str) -> None:
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(target, "w") as out:
        for member, data in members:
            if change == "checksum" and member.name.startswith("disks/"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            out.addfile(member, io.BytesIO(data))
        if change == "traversal":
            evil = tarfile.TarInfo("../evil")
            evil.size = 4
            out.addfile(evil, io.BytesIO(b"evil"))


def test_bad_input_is_one_line_and_makes_nothing(daemon, vm, chain, tmp_path):
    archive = tmp_path / "good.tar"
    daemon.cli("vm", "export", vm, str(archive), "--compress")
    bad_sum, traversal, not_tar = tmp_path / "sum.tar", tmp_path / "trav.tar", tmp_path / "plain.tar"
    _tampered(archive, bad_sum, "checksum")
    _tampered(archive, traversal, "traversal")
    not_tar.write_bytes(hashlib.sha256(b"x").digest() * 100)
    before = _vm_names(daemon)
    cases = [
        (["backup", "create", "ghost-vm"], "not found"),
        (["backup", "restore", vm, "ghost"], "has no backup 'ghost'"),
        (["backup", "show", "ghost-vm", "full1"], "has no backup"),
        (["backup", "restore", vm, "full1"], "stop it first"),  # over a running VM
        (["backup", "restore", vm, "full1", "--as", vm], "already exists"),
        (["backup", "create", vm, "--name", "Bad Name"], "invalid backup name"),
        (["backup", "create", vm, "--name", "full1"], "already has a backup"),
        (["vm", "import", str(bad_sum), "--name", "bad-sum"], "does not match its checksum"),
        (["vm", "import", str(traversal), "--name", "bad-trav"], "points outside the archive"),
        (["vm", "import", str(not_tar), "--name", "bad-plain"], "is not a tar archive"),
        (["vm", "import", str(tmp_path / "missing.tar")], "does not exist"),
        (["vm", "export", vm, str(archive)], "already exists"),
        (["vm", "export", vm, str(tmp_path / "vm.zip")], "does not end with .tar"),
    ]
    for args, words in cases:
        result = daemon.cli(*args, check=False)
        assert result.returncode != 0 and words in result.stderr, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr  # progress, then one
    assert _vm_names(daemon) == before
    assert {r["name"] for r in daemon.cli_json("backup", "list", vm)} >= {"full1", "inc1"}
    assert not list((daemon.home / "pools" / "default").glob("bad-*"))
    _no_leftovers(daemon)
