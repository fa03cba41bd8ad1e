"""Finding 8 of issue 11: local file modes and QEMU uids.

``corral.db`` and its -wal/-shm were 0644 (token hashes and every VM readable by any user of the host); disks of
never-started VMs and free volumes were 0644; every tenant's QEMU uid could read every project's images and
bases; two daemons on one machine handed out the same QEMU uids. Each test looks at the host as a local user (or
as another tenant's QEMU uid, in a forked child) would."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

from corral.host import sandbox
from corral.host.isolation import claims_directory
from corral.store.db import Store
from corral.store.models import VM, Template
from tests.conftest import Daemon, new_home, require
from tests.security.conftest import Tenants
from tests.security.test_storage_identity import disk_files, run


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def qemu_ids(tenants_or_daemon: Tenants | Daemon, project: str, vm_name: str) -> tuple[int, int]:
    daemon = tenants_or_daemon.daemon if isinstance(tenants_or_daemon, Tenants) else tenants_or_daemon
    store = Store(f"sqlite:///{daemon.home / 'corral.db'}")
    try:
        with store.reading() as session:
            pid = session.query(VM.pid).filter(VM.project == project, VM.name == vm_name).scalar()
    finally:
        store.close()
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
    return uid, gid


def open_as(uid: int, gid: int, path: Path) -> int:
    """errno of opening ``path`` for reading as ``uid`` with only group ``gid`` (0: it opened), in a child."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            code = exc.errno or 1
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_the_store_and_state_files_are_root_only(tenants: Tenants) -> None:
    home = tenants.daemon.home
    run(tenants, "pa-admin", "vm", "list")  # the store has written through its WAL by now
    for name in ("corral.db", "corral.db-wal", "corral.db-shm", "corral.lock"):
        path = home / name
        if path.exists():
            assert mode(path) == 0o600, f"{name} is {oct(mode(path))}"
            assert path.stat().st_uid == 0
    assert mode(home / "logs") == 0o700
    for directory in (home / "images", home / "pools", home / "pools" / "default", home / "run"):
        assert mode(directory) == 0o711, f"{directory.name}: searchable by QEMU uids, listable by nobody"


def test_disks_of_a_never_started_vm_and_a_free_volume_are_root_0600(tenants: Tenants) -> None:
    run(tenants, "pa-admin", "vm", "create", "cold")
    run(tenants, "pa-admin", "volume", "create", "spare", "--size", "16M")
    try:
        store = Store(f"sqlite:///{tenants.daemon.home / 'corral.db'}")
        try:
            from corral.store.models import Volume

            with store.reading() as session:
                spare = session.query(Volume).filter(Volume.project == "pa", Volume.name == "spare").one()
                spare_file = tenants.daemon.home / "pools" / spare.pool / spare.path
        finally:
            store.close()
        for path in [*disk_files(tenants, "pa", "cold"), spare_file]:
            info = path.lstat()
            assert stat.S_ISREG(info.st_mode)
            assert (info.st_uid, mode(path)) == (0, 0o600), f"{path.name}: uid {info.st_uid} {oct(mode(path))}"
            assert open_as(0x6FFF_FFF0, 0x6FFF_FFF0, path) == errno.EACCES, "no other user reads it"
    finally:
        run(tenants, "pa-admin", "vm", "delete", "cold")
        run(tenants, "pa-admin", "volume", "delete", "spare")


def test_another_project_vm_cannot_read_pa_bases_and_a_deleted_vm_loses_its_grants(tenants: Tenants) -> None:
    """pa's template disk is read by pa's linked VM only: pb's QEMU uid gets EACCES (it had group read before)."""
    require(os.geteuid() == 0, "QEMU runs under its own uids only as root")
    run(tenants, "pa-admin", "vm", "create", "tsrc")
    run(tenants, "pa-admin", "template", "create", "tpl", "--from", "tsrc")
    run(tenants, "pa-admin", "vm", "create", "tv", "--template", "tpl", "--start", "--wait")
    run(tenants, "pb-admin", "vm", "run", "pv")
    try:
        store = Store(f"sqlite:///{tenants.daemon.home / 'corral.db'}")
        try:
            with store.reading() as session:
                template = session.query(Template).filter(Template.project == "pa", Template.name == "tpl").one()
                base = tenants.daemon.home / "pools" / "default" / template.disks[0]["path"]
        finally:
            store.close()
        pa_uid, gid = qemu_ids(tenants, "pa", "tv")
        pb_uid, pb_gid = qemu_ids(tenants, "pb", "pv")
        assert pa_uid != pb_uid
        assert open_as(pa_uid, gid, base) == 0, "pa's VM reads the base its disk is an overlay of"
        assert open_as(pb_uid, pb_gid, base) == errno.EACCES, "pb's VM must not read pa's template"
        assert base.stat().st_uid == 0 and mode(base) & 0o007 == 0
        assert sandbox.acl_readers(base) == {pa_uid}

        run(tenants, "pa-admin", "vm", "delete", "tv", "--force")
        assert pa_uid not in (sandbox.acl_readers(base) or set()), "a deleted VM's uid keeps no grant"
        assert not (claims_directory() / str(pa_uid)).exists(), "its uid claim is released"
        assert open_as(pa_uid, gid, base) == errno.EACCES
    finally:
        for who, vm in (("pa-admin", "tv"), ("pb-admin", "pv"), ("pa-admin", "tsrc")):
            tenants.cli_as(who, "vm", "delete", vm, "--force")
        tenants.cli_as("pa-admin", "template", "delete", "tpl")


def test_two_homes_on_one_machine_never_share_a_qemu_uid(tenants: Tenants) -> None:
    require(os.geteuid() == 0, "QEMU runs under its own uids only as root")
    other = Daemon(new_home("corral-sec2-"))
    try:
        other.start()
        other.cli("image", "build", "tiny", timeout=1800)
        run(tenants, "pa-admin", "vm", "run", "here")
        other.cli("vm", "run", "there")
        here_uid, _ = qemu_ids(tenants, "pa", "here")
        there_uid, _ = qemu_ids(other, "default", "there")
        assert here_uid != there_uid, "each installation's VMs run under uids of their own"
        for uid, home in ((here_uid, tenants.daemon.home), (there_uid, other.home)):
            claim = json.loads((claims_directory() / str(uid)).read_text())
            assert claim["home"] == str(home.resolve())
            assert mode(claims_directory() / str(uid)) == 0o600
        other.cli("vm", "delete", "there", "--force")
        assert not (claims_directory() / str(there_uid)).exists(), "deleting the VM releases its uid"
    finally:
        tenants.cli_as("pa-admin", "vm", "delete", "here", "--force")
        other.cleanup()
        shutil.rmtree(other.home, ignore_errors=True)
