"""Run QEMU unprivileged and confined: one uid per VM, a shared group for read-only bases, and seccomp.

The model (see docs/isolation.md):

- Every VM's QEMU runs under a uid of its own, ``uid_for_vm(index)``, taken from a reserved range with no passwd
  entries. Its primary (and only) group is the shared ``corral-qemu`` group.
- A VM's own files (disks, its run directory with sockets and logs, its RAM file) belong to its uid with mode
  0600/0700, so no other VM's QEMU can open, list or connect to them. Read-only bases shared by many VMs
  (image backing files) belong to root with group ``corral-qemu`` and mode 0640/0750: every VM can read them,
  none can write them, and ordinary host users cannot read them.
- Distinct uids are what make this hold: with one shared uid, 0600 protects nothing between VMs, and one
  compromised QEMU could also signal or ptrace its neighbours. A per-VM group would add nothing on top, since a
  VM's files are not group-accessible at all.
- QEMU starts as root (so it opens its disks, sockets, taps and logs from the command line), installs its seccomp
  filter, and drops to the VM's uid with ``-runas uid:gid`` (QEMU 7.2 syntax; ``-run-with`` needs 8.1) just
  before the guest runs. From then on it has no capabilities and the kernel's permission checks apply to
  everything it opens: hotplugged disks, snapshot overlays, migration files, reopened backing files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from corral.errors import EngineError, InvalidInput

QEMU_USER = "corral-qemu"
# Just above systemd-nspawn's container range (524288..1879048191) and below 2^31 (tools with signed uids):
# far from distribution ranges (Debian's libvirt-qemu is 64055, systemd's DynamicUser 61184..65519).
VM_UID_BASE = 0x7000_0000
VM_UID_COUNT = 65_536

# obsolete: old syscalls; spawn: fork/exec (QEMU never needs them, exec: migration does, use fd:/tcp:/unix:);
# resourcecontrol: scheduler/affinity calls. elevateprivileges is left out on purpose: its filter also blocks
# setuid/setgid, which -runas calls *after* the filter is installed, so QEMU is killed by SIGSYS at start-up.
# Once -runas has dropped to a non-root uid QEMU has no capabilities, and spawn=deny already stops it from
# exec'ing a setuid binary, so that filter would add nothing.
SECCOMP_OPTIONS = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"

RW_FILE_MODE = 0o600
RW_DIR_MODE = 0o700
RO_FILE_MODE = 0o640
RO_DIR_MODE = 0o750


def ensure_qemu_user(name: str = QEMU_USER) -> tuple[int, int]:
    """The shared system user and group (uid, gid), created if missing: no home, no login shell.

    Its group is the one every VM's QEMU runs with (read access to image bases); the user itself serves QEMUs
    when per-VM uids are not wanted (weaker: see the module docstring).
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        _useradd(name)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _useradd(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    command = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
               "--shell", shell, "--comment", "Corral QEMU processes", name]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise EngineError("useradd not found, cannot create the QEMU user", "install the passwd package") from exc
    except subprocess.CalledProcessError as exc:
        if _user_exists(name):  # another agent created it concurrently
            return
        raise EngineError(f"useradd {name} failed: {exc.stderr.strip()}", "run the agent as root") from exc


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def uid_for_vm(index: int, base: int = VM_UID_BASE, count: int = VM_UID_COUNT) -> int:
    """The uid of the VM with host-local slot ``index`` (0..count-1, kept in the store with the VM).

    The slot must stay the VM's for as long as its files exist: the files are owned by this uid.
    """
    if not 0 <= index < count:
        raise InvalidInput(f"VM uid slot {index} is outside 0..{count - 1}")
    uid = base + index
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid
    raise EngineError(f"uid {uid} for VM slot {index} already belongs to user {owner!r}",
                      "choose another VM uid base (VM_UID_BASE)")  # fmt: skip


def sandbox_args(uid: int, gid: int) -> list[str]:
    """QEMU 7.2 options: seccomp filter, then drop to ``uid:gid`` (supplementary groups become just ``gid``)."""
    if uid <= 0 or gid <= 0:
        raise InvalidInput(f"QEMU must not run as root (uid {uid}, gid {gid})")
    return ["-sandbox", SECCOMP_OPTIONS, "-runas", f"{uid}:{gid}"]


def group_id(name: str = QEMU_USER) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError as exc:
        raise EngineError(f"group {name!r} does not exist", "call ensure_qemu_user() first") from exc


# --- file permissions -----------------------------------------------------------------------------------------


def prepare_paths(paths_rw: Iterable[Path], paths_ro: Iterable[Path], uid: int, gid: int) -> None:
    """Give a VM's QEMU (``uid``, group ``gid``) what it needs and nothing of its neighbours'.

    ``paths_rw``: the VM's own disks, RAM file and run directory (sockets, logs) -> uid:gid, 0600 / 0700.
    ``paths_ro``: the read-only bases this VM's disks use (image backing files, frozen bases, templates) ->
    root's with no group or other access, plus a POSIX ACL entry ``u:<uid>:r`` (``r-x`` on a directory): this
    VM reads them, the VMs of other projects (other uids) do not (see ``grant_read``). Hard links share one
    inode, so this also changes the other names of a base (e.g. the image cache's).
    Every parent directory must let ``uid`` through; if one does not, nothing is changed and the error names it.
    """
    rw, ro = [Path(p) for p in paths_rw], [Path(p) for p in paths_ro]
    prepared = {path.resolve() for path in rw + ro}  # these become passable whatever their mode is now
    for path in rw + ro:
        check_traversable(path.parent, uid, gid, prepared)
    for path in rw:
        _own(path, uid, gid, RW_DIR_MODE if path.is_dir() else RW_FILE_MODE)
    for path in ro:
        grant_read(path, uid, gid)


def _own(path: Path, uid: int, gid: int, mode: int) -> None:
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path} does not exist, cannot prepare it for QEMU") from exc
    except PermissionError as exc:
        raise EngineError(f"cannot chown {path}: {exc.strerror}", "the agent must run as root") from exc


def may_traverse(mode: int, owner: int, group: int, uid: int, gid: int) -> bool:
    """Whether a process with ``uid`` and only group ``gid`` may search a directory (owner, group, other bits)."""
    if owner == uid:
        return bool(mode & stat.S_IXUSR)
    if group == gid:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def check_traversable(directory: Path, uid: int, gid: int, skip: Iterable[Path] = ()) -> None:
    """Raise naming the first ancestor of ``directory`` the QEMU user could not pass through (``skip``: ones
    about to be prepared)."""
    directory, skipped = directory.resolve(), set(skip)
    for part in [*reversed(directory.parents), directory]:
        if part in skipped:
            continue
        info = part.stat()
        if not may_traverse(info.st_mode, info.st_uid, info.st_gid, uid, gid):
            raise InvalidInput(
                f"QEMU running as uid {uid} cannot reach files under {part} (mode {stat.filemode(info.st_mode)})",
                f"chmod o+x {part} (search only), or give it group {gid} with g+x",
            )


# --- per-VM read grants on shared bases (POSIX ACLs) ----------------------------------------------------------
#
# The kernel's own format of ``system.posix_acl_access`` (linux/posix_acl_xattr.h): a little-endian version
# word, then (tag, permissions, id) entries sorted by tag and id. Reading and writing it directly costs one
# syscall per file, where setfacl costs a process: launches grant a handful of files, sweeps look at every base.

ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_warned_no_acl: set[int] = set()
log = logging.getLogger("corral.agent")


def encode_acl(owner_perm: int, readers: Iterable[int], perm: int = 0o4) -> bytes:
    """An access ACL: the owner keeps ``owner_perm``, each uid of ``readers`` gets ``perm``, the owning group and
    everyone else nothing. The mask (what named entries may have at most) is ``perm``."""
    entries = [(_USER_OBJ, owner_perm, _NO_ID)]
    entries += [(_USER, perm, uid) for uid in sorted(set(readers))]
    entries += [(_GROUP_OBJ, 0, _NO_ID), (_MASK, perm, _NO_ID), (_OTHER, 0, _NO_ID)]
    return _ACL_HEADER.pack(_ACL_VERSION) + b"".join(_ACL_ENTRY.pack(*entry) for entry in entries)


def decode_readers(data: bytes) -> set[int]:
    """The uids with an entry of their own in an encoded access ACL (empty for anything unreadable)."""
    if len(data) < _ACL_HEADER.size or _ACL_HEADER.unpack_from(data)[0] != _ACL_VERSION:
        return set()
    readers = set()
    for offset in range(_ACL_HEADER.size, len(data) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size):
        tag, _perm, uid = _ACL_ENTRY.unpack_from(data, offset)
        if tag == _USER:
            readers.add(uid)
    return readers


def acl_readers(path: Path | int) -> set[int] | None:
    """The uids a base (a path or an open descriptor) is granted to: empty without an ACL, None where the
    filesystem has no ACLs."""
    try:
        if isinstance(path, int):
            return decode_readers(os.getxattr(path, ACL_XATTR))
        return decode_readers(os.getxattr(path, ACL_XATTR, follow_symlinks=False))
    except OSError as exc:
        return None if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP) else set()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The file open (never through a link) and flocked: grants are read-modify-write, and a base may be shared
    by hard links with other installations' images (the image cache), which grant their own VMs."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _write_readers(fd: int, readers: set[int], info: os.stat_result) -> None:
    owner_perm = (info.st_mode >> 6) & 0o7
    if readers:
        perm = 0o5 if stat.S_ISDIR(info.st_mode) else 0o4
        os.setxattr(fd, ACL_XATTR, encode_acl(owner_perm, readers, perm))
    else:
        with contextlib.suppress(OSError):
            os.removexattr(fd, ACL_XATTR)
        os.fchmod(fd, stat.S_IMODE(info.st_mode) & 0o700)


def grant_read(path: Path, uid: int, gid: int) -> None:
    """Let ``uid`` (one VM's QEMU) read the shared base ``path``, and nobody else but root and the uids already
    granted: root-owned, no group or other bits, an ACL entry per reading uid. On a filesystem without ACLs,
    falls back to the shared group (root:``gid`` 0640/0750: every VM may read the base) with a warning."""
    try:
        with _locked(path) as fd:
            info = os.fstat(fd)
            if info.st_uid != 0 or info.st_gid != 0:
                os.fchown(fd, 0, 0)
            readers = acl_readers(fd)
            if readers is None:
                raise OSError(errno.EOPNOTSUPP, "no ACLs")
            _write_readers(fd, readers | {uid}, info)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path} does not exist, cannot prepare it for QEMU") from exc
    except PermissionError as exc:
        raise EngineError(f"cannot change {path}: {exc.strerror}", "the agent must run as root") from exc
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        device = os.stat(path).st_dev
        if device not in _warned_no_acl:
            _warned_no_acl.add(device)
            log.warning("the filesystem of %s has no POSIX ACLs: shared bases there are readable by every VM's "
                        "QEMU (group %s)", path.parent, gid)  # fmt: skip
        _own(path, 0, gid, RO_DIR_MODE if path.is_dir() else RO_FILE_MODE)


def revoke_read(path: Path, uids: Iterable[int]) -> bool:
    """Take ``uids``' grants off ``path`` (and any group or other access when nobody is granted it); True if
    it had any of them. A link or a vanished file is left alone."""
    try:
        with _locked(path) as fd:
            info = os.fstat(fd)
            readers = acl_readers(fd)
            if readers is None:  # no ACLs here: the group fallback of grant_read is all there is
                return False
            dropped = readers & set(uids)
            if dropped or (info.st_mode & 0o077 and not readers):
                _write_readers(fd, readers - dropped, info)
            return bool(dropped)
    except (FileNotFoundError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP:
            return False
        raise
