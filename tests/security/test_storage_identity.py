"""Finding 1 of issue 11: disks were shared between projects that used the same VM name.

A volume's file was ``pools/default/{NAME}-root.qcow2`` while names are unique only per project: pb creating
``web`` failed on pa's file and its clean-up deleted it; ``vm clone`` in pb overwrote pa's ``db``. Files are now
named by volume id, created exclusively, and a job removes only what it made. Each test attacks as pb (or pa)
over HTTPS and checks the refusal or the separation, and that the other project's files are as they were."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from corral.store.db import Store
from corral.store.models import VM, Volume
from tests.security.conftest import Tenants


def _store(tenants: Tenants) -> Store:
    return Store(f"sqlite:///{tenants.daemon.home / 'corral.db'}")


def disk_files(tenants: Tenants, project: str, vm_name: str) -> list[Path]:
    """The VM's disk files, from the store (as the host sees them, whatever the API shows a tenant)."""
    store = _store(tenants)
    try:
        with store.reading() as session:
            vm = session.query(VM).filter(VM.project == project, VM.name == vm_name).one()
            volumes = sorted(vm.volumes, key=lambda v: v.device_index)
            return [tenants.daemon.home / "pools" / v.pool / v.path for v in volumes]
    finally:
        store.close()


def pool_entries(tenants: Tenants) -> dict[str, tuple[int, int, str]]:
    """Every file of the pool: (inode, size, sha256) by name, to show nothing else changed."""
    pool = tenants.daemon.home / "pools" / "default"
    entries = {}
    for path in sorted(pool.iterdir()):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            entries[path.name] = (info.st_ino, info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def run(tenants: Tenants, who: str, *args: str, ok: bool = True):  # type: ignore[no-untyped-def]
    result = tenants.cli_as(who, *args)
    if ok:
        assert result.returncode == 0, f"{who}: corral {' '.join(args)}: {result.stderr}"
    return result


def guest(tenants: Tenants, who: str, vm: str, script: str) -> str:
    return run(tenants, who, "vm", "exec", vm, "--", "sh", "-c", script).stdout


def test_two_projects_with_a_vm_named_web_each_have_their_own_disk(tenants: Tenants) -> None:
    run(tenants, "pa-admin", "vm", "run", "web")
    run(tenants, "pb-admin", "vm", "run", "web")  # failed before, and its clean-up deleted pa's disk
    pa_disks, pb_disks = disk_files(tenants, "pa", "web"), disk_files(tenants, "pb", "web")
    assert not set(pa_disks) & set(pb_disks), "two projects' VMs must never share a disk file"
    assert all(p.name.startswith("vol-") for p in pa_disks + pb_disks), "files are named by volume id"

    guest(tenants, "pa-admin", "web", "echo pa-secret > /root/marker; sync")
    guest(tenants, "pb-admin", "web", "echo pb-secret > /root/marker; sync")
    assert guest(tenants, "pa-admin", "web", "cat /root/marker").strip() == "pa-secret"
    assert guest(tenants, "pb-admin", "web", "cat /root/marker").strip() == "pb-secret"

    run(tenants, "pa-admin", "vm", "delete", "web", "--force")
    assert not any(p.exists() for p in pa_disks), "pa's own disk goes with its VM"
    assert all(p.exists() for p in pb_disks), "deleting pa's web must leave pb's disk alone"
    assert guest(tenants, "pb-admin", "web", "cat /root/marker").strip() == "pb-secret"
    run(tenants, "pb-admin", "vm", "delete", "web", "--force")


def test_a_clone_in_pb_named_like_pa_vm_never_touches_pa_disk(tenants: Tenants) -> None:
    run(tenants, "pa-admin", "vm", "create", "db")
    run(tenants, "pb-admin", "vm", "create", "src")
    pa_db = disk_files(tenants, "pa", "db")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in pa_db}

    run(tenants, "pb-admin", "vm", "clone", "src", "db")  # overwrote pa's db-root.qcow2 before
    pb_db = disk_files(tenants, "pb", "db")
    assert not set(pb_db) & set(pa_db)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in pa_db} == before

    run(tenants, "pb-admin", "vm", "clone", "src", "db-linked", "--linked")
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in pa_db} == before
    for who, vm in (("pb-admin", "db-linked"), ("pb-admin", "db"), ("pb-admin", "src"), ("pa-admin", "db")):
        run(tenants, who, "vm", "delete", vm)


@pytest.mark.parametrize(
    ("name", "words"),
    [("DB", "invalid"), ("db" + "x" * 298, "invalid"), ("../db", "invalid"), ("db/../../etc", "invalid")],
)
def test_names_that_would_collide_or_escape_after_normalisation_are_refused(
    tenants: Tenants, name: str, words: str
) -> None:
    run(tenants, "pa-admin", "vm", "create", "db")
    run(tenants, "pb-admin", "vm", "create", "src")
    try:
        before = pool_entries(tenants)
        with tenants.https("pb-admin") as client:
            answer = client.post("/vms/src/clone", json={"name": name})
        assert answer.status_code in (400, 404, 422), answer.text
        assert words in answer.text.lower(), answer.text
        assert str(tenants.daemon.home) not in answer.text, "no host path in a refusal"
        assert pool_entries(tenants) == before, "a refused clone changes no file"
    finally:
        run(tenants, "pb-admin", "vm", "delete", "src")
        run(tenants, "pa-admin", "vm", "delete", "db")


def test_a_link_planted_where_a_restore_stages_its_copy_is_refused_not_followed(tenants: Tenants) -> None:
    """``backup restore`` over a stopped VM stages each disk beside it (``vol-<id>.restoring``). A link planted
    there (at pb's disk, here) must be refused: not written through, not deleted, and the VM left as it was."""
    run(tenants, "pa-admin", "vm", "create", "rs")
    run(tenants, "pb-admin", "vm", "create", "victim")
    run(tenants, "pa-admin", "backup", "create", "rs", "--name", "b1")
    (disk,) = disk_files(tenants, "pa", "rs")
    (victim,) = disk_files(tenants, "pb", "victim")
    planted = disk.with_suffix(".restoring")
    os.symlink(victim, planted)
    try:
        before = pool_entries(tenants)
        result = run(tenants, "pa-admin", "backup", "restore", "rs", "b1", ok=False)
        assert result.returncode != 0
        assert "already" in result.stderr and "left untouched" in result.stderr, result.stderr
        assert str(tenants.daemon.home) not in result.stderr, "no host path in the refusal"
        assert planted.is_symlink() and os.readlink(planted) == str(victim), "the planted link stays as it was"
        assert pool_entries(tenants) == before, "neither pb's disk nor pa's was written or removed"
    finally:
        planted.unlink(missing_ok=True)
        run(tenants, "pa-admin", "vm", "delete", "rs")
        run(tenants, "pb-admin", "vm", "delete", "victim")


def test_volume_rows_cannot_share_a_file(tenants: Tenants) -> None:
    """The store itself refuses a second row for one file (unique key on host, pool and path)."""
    from sqlalchemy.exc import IntegrityError

    run(tenants, "pa-admin", "volume", "create", "solo", "--size", "16M")
    store = Store(f"sqlite:///{tenants.daemon.home / 'corral.db'}")
    try:
        with store.reading() as session:
            row = session.query(Volume).filter(Volume.project == "pa", Volume.name == "solo").one()
            host, path = row.host, row.path
        with pytest.raises(IntegrityError), store.session() as session:
            session.add(Volume(name="solo", project="pb", pool="default", host=host, path=path, size=1))
    finally:
        store.close()
        run(tenants, "pa-admin", "volume", "delete", "solo")
