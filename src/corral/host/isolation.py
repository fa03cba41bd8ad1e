"""Putting each VM's QEMU in its own box: a cgroup with CPU and memory limits, its own uid, seccomp.

The building blocks are in cgroups.py and sandbox.py (docs/isolation.md); this module decides, per launch,
which files are the VM's own and which are shared bases, and gives the launcher the Popen hook and the
extra QEMU options. Isolation needs root; without it (or with ``isolation = false``) VMs run as the daemon does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from corral.config import Settings
from corral.engine import qemu_img
from corral.engine.plan import LaunchPlan
from corral.errors import CorralError, InsufficientResources, NotFound
from corral.host import cgroups, sandbox, storage
from corral.host.layout import SEARCH_ONLY, HostLayout
from corral.spec.vm import VMSpec
from corral.store.db import Store
from corral.store.models import VM

log = logging.getLogger("corral.agent")
MiB = 1 << 20


UID_CLAIMS = Path("/var/lib/corral-uids")


def claims_directory() -> Path:
    """Where QEMU uids are claimed: one directory for the whole machine (``CORRAL_UID_CLAIMS`` moves it, for a
    machine whose /var/lib is not shared by all its installations)."""
    return Path(os.environ.get("CORRAL_UID_CLAIMS") or UID_CLAIMS)


HOME_ID_FILE = ".corral-home-id"


def home_identity(home: Path, create: bool = False) -> str:
    """A CORRAL_HOME's identity: a random id kept in the home, so a home deleted and made again at the same
    path (even on the same inode number) is another installation. Raises OSError when there is none."""
    path = home / HOME_ID_FILE
    if create and not path.exists():
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(uuid.uuid4().hex)
    text = path.read_text().strip()
    if not text:
        raise OSError(f"{path} is empty")
    return text


class UidClaims:
    """Machine-wide claims on VM uid slots: ``<directory>/<uid>`` holds the CORRAL_HOME and the VM that runs
    under that uid, created exclusively under a lock on the directory. Every installation on the machine (two
    CORRAL_HOMEs, a cluster demo's agents in network namespaces) allocates here, so no two VMs share a uid.

    A claim is stale, and taken over, when its home is gone (or is another directory now), or when its home is
    ours and the store no longer gives that VM that slot. Claims of another live home are never touched."""

    def __init__(self, directory: Path, home: Path) -> None:
        self.directory = directory
        self.home = home

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _record(self, vm_id: str) -> dict[str, str]:
        return {"home": str(self.home.resolve()), "home_id": home_identity(self.home, create=True), "vm": vm_id}

    def _mine(self, record: dict[str, str]) -> bool:
        try:
            return record.get("home_id") == home_identity(self.home)
        except OSError:
            return False

    def _read(self, slot: int) -> dict[str, str] | None:
        try:
            data = json.loads((self.directory / str(sandbox.uid_for_vm(slot))).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: stale
        return data if isinstance(data, dict) else {}

    def _stale(self, record: dict[str, str], slot: int, slots: dict[str, int | None]) -> bool:
        home = Path(record.get("home") or "/nonexistent-corral-home")
        try:
            same_home = home_identity(home) == record.get("home_id")
        except OSError:
            return True
        if not same_home:
            return True
        if not self._mine(record):
            return False  # another installation's live claim
        return slots.get(record.get("vm", "")) != slot

    def _write(self, slot: int, vm_id: str, exclusive: bool) -> bool:
        path = self.directory / str(sandbox.uid_for_vm(slot))
        text = json.dumps(self._record(vm_id))
        if exclusive:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            return True
        temp = path.with_name(f".{path.name}.{os.getpid()}")  # a stale claim is replaced whole, never edited
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, path)
        return True

    def claim(self, vm_id: str, wanted: int | None, slots: dict[str, int | None]) -> tuple[int, bool]:
        """The slot ``vm_id`` runs under, and whether it is new to the VM: ``wanted`` (its stored slot) if the
        VM holds that claim or can take it, else the lowest free one. ``slots``: every VM's stored slot in
        this store (slots of this store are never handed to another of its VMs, claimed or not)."""
        slots = {**slots, vm_id: wanted}
        taken = {slot for other, slot in slots.items() if other != vm_id and slot is not None}
        with self._locked():
            if wanted is not None:
                record = self._read(wanted)
                if record is None:
                    if self._write(wanted, vm_id, exclusive=True):
                        return wanted, True  # unclaimed until now (an older version): grants start afresh
                elif record.get("vm") == vm_id:
                    # The same VM, ours or moving here from another installation on this machine (a cluster
                    # demo's agents): it keeps its uid, so a shared pool's files stay readable by both copies.
                    if not self._mine(record):
                        self._write(wanted, vm_id, exclusive=False)
                    return wanted, False
                elif self._stale(record, wanted, slots):
                    self._write(wanted, vm_id, exclusive=False)
                    return wanted, True
            for slot in range(sandbox.VM_UID_COUNT):
                if slot in taken or slot == wanted:
                    continue
                try:
                    sandbox.uid_for_vm(slot)
                except CorralError:
                    continue  # a uid with a passwd entry
                if self._write(slot, vm_id, exclusive=True):
                    return slot, True
                record = self._read(slot)
                if record is not None and self._stale(record, slot, slots):
                    self._write(slot, vm_id, exclusive=False)
                    return slot, True
        raise InsufficientResources(
            f"all {sandbox.VM_UID_COUNT} VM uids of this machine are claimed",
            f"delete VMs, or remove stale claims from {self.directory}",
        )

    def release(self, vm_id: str) -> list[int]:
        """Drop this home's claims for ``vm_id``; returns their slots."""
        if not self.directory.is_dir():
            return []
        released = []
        with self._locked():
            for path in self.directory.iterdir():
                if not path.name.isdigit():
                    continue
                try:
                    record = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(record, dict) and record.get("vm") == vm_id and self._mine(record):
                    path.unlink(missing_ok=True)
                    released.append(int(path.name) - sandbox.VM_UID_BASE)
        return released


@dataclass
class Box:
    """What a launch gets: QEMU options, a hook run in the child before exec, and the cgroup to clean up."""

    extra_args: list[str]
    preexec: Callable[[], None] | None
    cgroup: cgroups.VMCgroup | None


class Isolation:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.layout = HostLayout(settings.home)
        self.claims = UidClaims(claims_directory(), settings.home)
        self.enabled = settings.isolation and os.geteuid() == 0
        self.driver: cgroups.CgroupDriver | None = None
        self.gid: int | None = None
        if not self.enabled:
            return
        try:
            self.driver = cgroups.detect()
        except CorralError as exc:
            log.warning("no cgroup limits for VMs: %s", exc)
        try:
            _, self.gid = sandbox.ensure_qemu_user()
        except (CorralError, OSError) as exc:
            log.warning("QEMU will not run under its own uid: %s", exc)
        try:  # images imported or built readable by all (0644) become root's; VMs read them through grants
            self.secure_shared()
        except OSError as exc:
            log.warning("shared images and bases not secured: %s", exc)

    def _uid(self, vm_id: str) -> int:
        """The VM's uid: a slot kept in the store and claimed machine-wide (``UidClaims``), so that no other VM,
        of this installation or another one on this machine, runs under it. A slot whose claim another VM holds
        now (an old store, or a restored one) is given up for a free one; launches chown the VM's files anew."""
        with self.store.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None:
                raise NotFound("the VM no longer exists")
            slots = dict(session.execute(select(VM.id, VM.uid_slot).where(VM.uid_slot.is_not(None))).tuples().all())
            slot, fresh = self.claims.claim(vm_id, vm.uid_slot, slots)
            vm.uid_slot = slot
        uid = sandbox.uid_for_vm(slot)
        if fresh:  # a uid new to this VM must not read what an earlier holder was granted
            self.revoke_everywhere(uid)
        return uid

    def forget(self, vm_id: str) -> None:
        """The VM left this host (deleted, discarded, moved away): free its uid and take back its grants."""
        if not self.enabled:
            return
        for slot in self.claims.release(vm_id):
            with contextlib.suppress(CorralError):
                self.revoke_everywhere(sandbox.uid_for_vm(slot))

    def shared_files(self) -> list[Path]:
        """Every file a VM may read but not own in this home: images, frozen bases, templates' disks."""
        roots = [
            self.layout.images,
            *(pool / storage.BASES for pool in self._pools()),
            *(pool / storage.TEMPLATES for pool in self._pools()),
        ]
        files = []
        for root in roots:
            for directory, _dirs, names in os.walk(root):
                files += [Path(directory) / name for name in names]
        return files

    def secure_shared(self) -> None:
        """Shared files nobody is granted lose group and other access; their directories become search-only
        (a QEMU reaches a base it was granted by its path, and lists nothing)."""
        self.revoke_everywhere(-1)
        for root in (
            self.layout.images,
            *(pool / name for pool in self._pools() for name in (storage.BASES, storage.TEMPLATES)),
        ):
            for directory, _dirs, _files in os.walk(root):
                path = Path(directory)
                if stat.S_IMODE(path.stat().st_mode) != SEARCH_ONLY:
                    path.chmod(SEARCH_ONLY)

    def _searchable(self, paths: list[Path]) -> None:
        """Let QEMU uids through the home's directories down to ``paths`` (search only, never listing): an
        image directory made 0700 since the agent started would otherwise stop the VM at the traversal check."""
        home = self.layout.home.resolve()
        for path in paths:
            for parent in path.parents:
                if parent == home or not parent.is_relative_to(home):
                    break
                current = stat.S_IMODE(parent.stat().st_mode)
                if current & 0o011 != 0o011:
                    parent.chmod((current | 0o011) & ~0o066)

    def _pools(self) -> list[Path]:
        pools = self.layout.home / "pools"
        return [entry for entry in pools.iterdir() if entry.is_dir()] if pools.is_dir() else []

    def revoke_everywhere(self, uid: int, keep: set[Path] = frozenset()) -> int:  # type: ignore[assignment]
        """Take ``uid``'s read grants off every shared file of this home but ``keep``; files nobody is granted
        lose any group or other access (an image imported 0644 becomes root's alone). Returns how many lost one."""
        return sum(sandbox.revoke_read(path, [uid]) for path in self.shared_files() if path not in keep)

    def vm_uid(self, vm_id: str) -> int | None:
        """The uid the VM's QEMU ends up running as, None when it keeps the daemon's."""
        return self._uid(vm_id) if self.enabled and self.gid is not None else None

    def _limits(self, vm_id: str, plan: LaunchPlan) -> cgroups.Limits:
        with self.store.reading() as session:
            vm = session.get(VM, vm_id)
            spec = VMSpec.model_validate(vm.spec) if vm is not None else None
        # The memory limit follows the balloon's target (spec.memory), not the RAM QEMU starts with: headroom
        # for live growth (max_memory) is not the VM's until `vm set --memory` gives it (see docs/resize.md).
        guest_ram = spec.memory if spec is not None else plan.memory_mib * MiB
        return cgroups.Limits.for_vm(
            plan.cpus,
            guest_ram,
            tb_size=(plan.tb_size_mib or 0) * MiB,
            cpus=spec.cpu_limit if spec else None,
            cpu_weight=spec.cpu_weight if spec and spec.cpu_weight else cgroups.DEFAULT_CPU_WEIGHT,
        )

    def prepare(self, vm_id: str, plan: LaunchPlan) -> Box:
        if not self.enabled:
            return Box([], None, None)
        cgroup = None
        if self.driver is not None:
            limits = self._limits(vm_id, plan)
            cgroup = cgroups.VMCgroup.create(self.driver, f"vm-{vm_id[:16]}", limits)
        args: list[str] = []
        if self.gid is not None:
            uid = self._uid(vm_id)
            own = [plan.run_dir, *(d.path for d in plan.disks if not d.read_only)]
            if plan.uefi is not None:
                own.append(plan.uefi.vars)  # the VM's own firmware variables; OVMF's code stays the package's
            if plan.ram_file is not None and plan.ram_shared:
                own.append(plan.ram_file)
            shared = [d.path for d in plan.disks if d.read_only] + self._backing_files(plan)
            shared = [p.resolve() for p in shared if p.exists()]
            # This VM reads exactly its own bases: a grant it kept from an earlier launch (a base it no longer
            # uses) is taken back, then its bases are granted (docs/isolation.md, "Users and file permissions").
            self.revoke_everywhere(uid, keep=set(shared))
            self._searchable(shared)
            sandbox.prepare_paths([p for p in own if p.exists()], shared, uid, self.gid)
            args = sandbox.sandbox_args(uid, self.gid)
        hook = cgroup.preexec() if cgroup is not None else None

        def enter() -> None:
            os.umask(0o077)  # what QEMU creates later is the VM's alone
            if hook is not None:
                hook()

        return Box(args, enter, cgroup)

    def _backing_files(self, plan: LaunchPlan) -> list[Path]:
        files: list[Path] = []
        for disk in plan.disks:
            if disk.format != "qcow2":
                continue
            facts = qemu_img.info(disk.path, self.settings.qemu_img_binary)
            backing = facts.get("full-backing-filename") or facts.get("backing-filename")
            while backing:
                path = Path(backing)
                files.append(path)
                facts = qemu_img.info(path, self.settings.qemu_img_binary)
                backing = facts.get("full-backing-filename") or facts.get("backing-filename")
        return files

    def release(self, vm_id: str) -> None:
        if self.driver is None:
            return
        try:
            cgroups.VMCgroup(self.driver, f"vm-{vm_id[:16]}", cgroups.Limits()).destroy(timeout=3.0, kill=False)
        except CorralError as exc:
            log.warning("VM %s: cgroup not removed: %s", vm_id, exc)
