"""Issue 11, findings 1 and 8, where the logic is pure or local: exclusive volume files, pool paths that never
resolve their last component, per-VM ACL grants, machine-wide uid claims and the 0010 migration of rows that
shared a file."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from corral.errors import Conflict, InvalidInput
from corral.host import sandbox, storage
from corral.host.isolation import UidClaims
from corral.host.layout import pool_file
from corral.store.models import VM, Volume, volume_file

# --- exclusive files ------------------------------------------------------------------------------------------


def test_a_claimed_file_is_new_empty_and_root_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = storage.claim(tmp_path / "pool" / "vol-1.qcow2")
    finally:
        os.umask(old)
    assert path.read_bytes() == b""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pool").stat().st_mode) == storage.DIR_MODE


@pytest.mark.parametrize("kind", ["file", "link", "dangling link", "directory"])
def test_claim_refuses_anything_already_there_and_leaves_it(tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "vol-1.qcow2"
    if kind == "file":
        path.write_bytes(b"someone else's")
    elif kind == "link":
        path.symlink_to(victim)
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.mkdir()
    with pytest.raises(Conflict) as refused:
        storage.claim(path, "volume web-root")
    assert "left untouched" in refused.value.message and str(tmp_path) not in refused.value.message
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "nowhere").exists(), "a dangling link is not followed to create its target"
    if kind == "file":
        assert path.read_bytes() == b"someone else's"


def _fake_agent(home: Path) -> SimpleNamespace:
    from corral.host.layout import HostLayout

    return SimpleNamespace(layout=HostLayout(home), settings=SimpleNamespace(qemu_img_binary="qemu-img"))


def test_materialize_never_overwrites_nor_removes_a_file_it_did_not_make(tmp_path: Path) -> None:
    import asyncio

    agent = _fake_agent(tmp_path)
    pool = agent.layout.pool()
    pool.mkdir(parents=True)
    other = pool / "other.qcow2"
    other.write_bytes(b"pa's disk")
    (pool / "vol-b.qcow2").symlink_to(other)
    volume = Volume(id="b", name="web-root", pool="default", path="vol-b.qcow2", size=1 << 20)
    with pytest.raises(Conflict):
        asyncio.run(storage.materialize(agent, volume, None))  # type: ignore[arg-type]
    assert other.read_bytes() == b"pa's disk" and (pool / "vol-b.qcow2").is_symlink()
    storage.remove(agent, volume)  # type: ignore[arg-type]  # the link is removed, never what it points at
    assert other.read_bytes() == b"pa's disk"


def test_pool_files_keep_their_last_component_and_stay_inside(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "vol-a.qcow2").symlink_to(tmp_path / "elsewhere")
    assert pool_file(tmp_path / "pool", "vol-a.qcow2") == tmp_path.resolve() / "pool" / "vol-a.qcow2"
    for bad in ("../x", "..", ".", "", "bases/../../x"):
        with pytest.raises(InvalidInput):
            pool_file(tmp_path / "pool", bad)


def test_new_volume_files_are_named_by_id() -> None:
    assert volume_file("abc") == "vol-abc.qcow2"


def test_two_projects_volumes_of_one_name_get_distinct_files(store, host) -> None:  # type: ignore[no-untyped-def]
    from corral.cluster.vm_rows import new_volume

    with store.session() as session:
        paths = []
        for project in ("pa", "pb"):
            vm = VM(name="web", project=project, spec={}, host=host)
            session.add(vm)
            session.flush()
            paths.append(new_volume(session, vm, "web-root", 1 << 20, 0, role="root").path)
    assert paths[0] != paths[1] and all(p.startswith("vol-") for p in paths)


# --- ACL grants -------------------------------------------------------------------------------------------------


def test_acl_encoding_round_trips() -> None:
    data = sandbox.encode_acl(0o6, [0x7000_0003, 0x7000_0001, 0x7000_0003])
    assert sandbox.decode_readers(data) == {0x7000_0001, 0x7000_0003}
    assert sandbox.decode_readers(b"") == set() and sandbox.decode_readers(b"\x01\x00\x00\x00") == set()


def test_grants_are_per_uid_and_revoked(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to root needs root")
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base")
    base.chmod(0o644)
    if sandbox.acl_readers(base) is None:
        pytest.skip("no POSIX ACLs on this filesystem")
    sandbox.grant_read(base, 0x7000_0001, 4242)
    sandbox.grant_read(base, 0x7000_0002, 4242)
    assert sandbox.acl_readers(base) == {0x7000_0001, 0x7000_0002}
    assert base.stat().st_mode & 0o007 == 0, "no access for others"
    assert sandbox.revoke_read(base, [0x7000_0001]) is True
    assert sandbox.acl_readers(base) == {0x7000_0002}
    assert sandbox.revoke_read(base, [0x7000_0002]) is True
    assert sandbox.acl_readers(base) == set() and stat.S_IMODE(base.stat().st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(base)
    assert sandbox.revoke_read(link, [1]) is False


# --- machine-wide uid claims --------------------------------------------------------------------------------


def test_two_homes_get_distinct_slots_and_stale_claims_are_taken_over(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    home_a.mkdir()
    home_b.mkdir()
    a, b = UidClaims(claims, home_a), UidClaims(claims, home_b)
    slot_a, fresh = a.claim("vm1", None, {})
    assert (slot_a, fresh) == (0, True)
    slot_b, _ = b.claim("vm9", None, {})
    assert slot_b != slot_a, "another installation never gets a claimed uid"
    assert a.claim("vm1", slot_a, {"vm1": slot_a}) == (slot_a, False), "a VM keeps its own claim"
    # The same VM moving to b (agents of one machine sharing a store) keeps its uid; the claim is b's now.
    assert b.claim("vm1", slot_a, {"vm1": slot_a}) == (slot_a, False)
    assert a.release("vm1") == [], "a's release after the move leaves b's claim"
    assert a.claim("vm1", slot_a, {"vm1": slot_a}) == (slot_a, False)  # and back again
    # b's store was restored with a's slot: b's VM is moved to a free slot, a's claim stays.
    moved, fresh = b.claim("vm8", slot_a, {"vm8": slot_a, "vm9": slot_b})
    assert moved not in (slot_a, slot_b) and fresh
    assert stat.S_IMODE((claims / str(sandbox.uid_for_vm(slot_a))).stat().st_mode) == 0o600
    # A home that is gone leaves stale claims: the next claimer takes the lowest one over.
    b_slots = {slot_b, moved}
    shutil.rmtree(home_b)
    taken, _ = a.claim("vm2", None, {"vm1": slot_a})
    assert taken in b_slots
    assert stat.S_IMODE((claims / str(sandbox.uid_for_vm(taken))).stat().st_mode) == 0o600
    # A claim of our own home whose VM the store no longer has is stale too.
    assert a.release("vm1") == [slot_a]
    assert not (claims / str(sandbox.uid_for_vm(slot_a))).exists()
    again, _ = a.claim("vm3", None, {"vm2": taken})
    assert again == slot_a


def test_a_claim_of_a_home_made_again_at_the_same_path_is_stale(tmp_path: Path) -> None:
    claims, home = tmp_path / "claims", tmp_path / "h"
    home.mkdir()
    slot, _ = UidClaims(claims, home).claim("old", None, {})
    shutil.rmtree(home)
    home.mkdir()  # a new directory (new inode) at the old path: not the installation that claimed
    other = tmp_path / "o"
    other.mkdir()
    assert UidClaims(claims, other).claim("new", None, {})[0] == slot


# --- the 0010 migration ---------------------------------------------------------------------------------------


def test_migration_0010_separates_rows_that_shared_a_file(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.exc import IntegrityError

    from corral.store.db import MIGRATIONS, Store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0009")
    store = Store(url)
    with store.engine.begin() as conn:
        for vol_id, project, created in (("pa1", "pa", "2026-01-01"), ("pb1", "pb", "2026-01-02")):
            conn.exec_driver_sql(
                "INSERT INTO volumes (id, name, project, pool, host, path, size, format, state, role, device_index, "
                f"created_at) VALUES ('{vol_id}', 'db-root', '{project}', 'default', 'h1', 'db-root.qcow2', 1, "
                f"'qcow2', 'ready', 'root', 0, '{created}')"
            )
    store.migrate()
    with store.session() as session:
        assert session.get(Volume, "pa1").path == "db-root.qcow2", "the oldest row keeps the file"
        assert session.get(Volume, "pa1").state == "ready"
        assert session.get(Volume, "pb1").path == "vol-pb1.qcow2"
        assert session.get(Volume, "pb1").state == "error"
    with pytest.raises(IntegrityError), store.session() as session:
        session.add(Volume(name="x", project="pc", pool="default", host="h1", path="db-root.qcow2", size=1))
    store.close()
