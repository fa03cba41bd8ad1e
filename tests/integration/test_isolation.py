"""Isolation on the real kernel: CPU quota, memory limit, and a sandboxed QEMU under its own uid in a cgroup.

Every process and cgroup a test creates is killed and removed in a finalizer. Needs root (cgroups, chown,
-runas); skips loudly otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.host.cgroups import CgroupDriver, Limits, MiB, VMCgroup, detect
from corral.host.sandbox import ensure_qemu_user, prepare_paths, sandbox_args, uid_for_vm
from corral.images.tiny import TinyImage, build_tiny_image
from tests.conftest import require
from tests.integration.test_tiny_image import Qmp, qemu_argv

pytestmark = [pytest.mark.integration]

BURN = "while True: pass"
READY_LINE = re.compile(rb"(?:^|\n)corral-guest-ready\r?\n")
GUEST_RAM = 256 * MiB
VM_SLOT, OTHER_VM_SLOT = 4000, 4001  # uid slots no real VM of this host uses during the test run


@pytest.fixture(scope="module")
def driver() -> CgroupDriver:
    require(os.geteuid() == 0, "isolation tests need root (cgroups, chown, QEMU -runas)")
    return detect()


Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def cgroup(driver: CgroupDriver) -> Iterator[Callable[[Limits], VMCgroup]]:
    """Make cgroups with unique names; kill what is left inside and remove them all afterwards."""
    made: list[VMCgroup] = []

    def make(limits: Limits) -> VMCgroup:
        made.append(VMCgroup.create(driver, f"test-{uuid.uuid4().hex[:8]}", limits))
        return made[-1]

    yield make
    for cg in made:
        cg.destroy(timeout=10, kill=True)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start processes (in a cgroup from their first instruction) and kill them all afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], cg: VMCgroup, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, preexec_fn=cg.preexec(), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def cpu_seconds(cg: VMCgroup) -> float:
    usage = cg.stats()["cpu_usage_ns"]
    assert usage is not None
    return usage / 1e9


def test_cpu_quota_throttles_only_its_cgroup(cgroup: Callable[[Limits], VMCgroup], spawn: Spawn) -> None:
    limited, neighbour, reference = cgroup(Limits(cpus=0.25)), cgroup(Limits()), cgroup(Limits())
    for cg in (limited, neighbour, reference):
        spawn([sys.executable, "-c", BURN], cg)
    time.sleep(0.5)  # past interpreter start-up
    groups = (limited, neighbour, reference)
    before = [cpu_seconds(cg) for cg in groups]
    started = time.monotonic()
    time.sleep(2.0)
    elapsed = time.monotonic() - started
    limited_share, neighbour_share, reference_share = (
        (cpu_seconds(cg) - used) / elapsed for cg, used in zip(groups, before, strict=True)
    )
    assert limited_share <= 0.30, f"limited burner used {limited_share:.0%} of a CPU"
    assert limited_share >= min(0.18, 0.8 * reference_share), f"limited burner only got {limited_share:.0%}"
    # A sibling VM cgroup without a quota shows what an unthrottled VM gets on this (possibly busy) machine.
    assert neighbour_share >= 0.7 * reference_share, (
        f"unlimited neighbour got {neighbour_share:.0%} of a CPU, an unlimited sibling {reference_share:.0%}"
    )
    stats = limited.stats()
    assert stats["cpu_nr_throttled"], stats


def test_memory_limit_kills_only_the_offender(cgroup: Callable[[Limits], VMCgroup], spawn: Spawn) -> None:
    hog_cg, neighbour_cg = cgroup(Limits(memory=64 * MiB)), cgroup(Limits(memory=256 * MiB))
    allocate = "import time; b = [bytearray({mib} << 20) for _ in range({n})]; print('ok', flush=True); time.sleep(60)"
    neighbour = spawn([sys.executable, "-c", allocate.format(mib=8, n=4)], neighbour_cg, stdout=subprocess.PIPE)
    assert neighbour.stdout is not None and neighbour.stdout.readline() == b"ok\n"
    hog = spawn([sys.executable, "-c", allocate.format(mib=16, n=16)], hog_cg, stdout=subprocess.DEVNULL)
    assert hog.wait(30) == -9, "the process beyond its memory limit must be OOM-killed"
    assert neighbour.poll() is None, "the neighbour must survive"
    stats = hog_cg.stats()
    assert stats["oom_kills"] in (None, 1), stats
    assert stats["memory_max"] == 64 * MiB


# --- a sandboxed QEMU -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> TinyImage:
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86 is not installed")
    cache = Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral"))
    return build_tiny_image(tmp_path_factory.mktemp("tiny-image"), cache)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A short base directory (socket paths) that unprivileged uids may pass through but not list."""
    base = Path(tempfile.mkdtemp(prefix="corral-iso-", dir="/tmp"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def layout(image: TinyImage, base: Path, uid: int, gid: int) -> tuple[TinyImage, Path, Path]:
    """(image with a private read-only base, this VM's directory, another VM's disk) with their permissions."""
    images, vmdir, other = base / "img", base / "vm", base / "other"
    for directory in (images, vmdir, other):
        directory.mkdir()
    rootfs = images / "rootfs.qcow2"
    shutil.copyfile(image.rootfs, rootfs)  # the cache's files are hard links: do not chown those
    disk = vmdir / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(rootfs), "-F", "qcow2", str(disk)],
                   check=True)  # fmt: skip
    other_disk = other / "root.qcow2"
    shutil.copyfile(disk, other_disk)
    prepare_paths([vmdir, disk], [images, rootfs], uid, gid)
    prepare_paths([other, other_disk], [], uid_for_vm(OTHER_VM_SLOT), gid)
    private = TinyImage(kernel=image.kernel, initrd=image.initrd, rootfs=rootfs, cmdline=image.cmdline,
                        recipe_hash=image.recipe_hash)  # fmt: skip
    return private, vmdir, other_disk


def wait_ready(proc: subprocess.Popen[bytes], serial: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if READY_LINE.search(serial.read_bytes()):
                return
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited ({proc.returncode}) before the guest was ready")
        time.sleep(0.05)
    pytest.fail("the guest never printed corral-guest-ready")


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def open_as(uid: int, gid: int, path: Path) -> int:
    """errno of opening ``path`` for reading as ``uid``/``gid`` (0 on success), from a forked child."""
    pid = os.fork()
    if pid == 0:
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
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_sandboxed_qemu_in_its_cgroup(
    tiny_image: TinyImage, host_dir: Path, cgroup: Callable[[Limits], VMCgroup], spawn: Spawn
) -> None:
    _, gid = ensure_qemu_user()
    uid = uid_for_vm(VM_SLOT)
    image, vmdir, other_disk = layout(tiny_image, host_dir, uid, gid)
    limits = Limits.for_vm(vcpus=1, guest_ram=GUEST_RAM)
    cg = cgroup(limits)
    argv = qemu_argv("iso", image, vmdir)
    argv[argv.index("q35,accel=tcg")] = "q35"
    argv += ["-accel", "tcg,tb-size=64", *sandbox_args(uid, gid)]
    with (vmdir / "qemu.log").open("wb") as log:
        qemu = spawn(argv, cg, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wait_ready(qemu, vmdir / "serial.log")

    status = status_fields(qemu.pid)
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Seccomp"] == "2"
    assert int(status["CapEff"], 16) == 0
    assert qemu.pid in cg.pids()

    assert open_as(uid, gid, other_disk) == errno.EACCES
    assert open_as(uid, gid, image.rootfs) == 0  # the shared base is readable through the group
    qmp = Qmp(vmdir / "qmp.sock")
    try:
        with pytest.raises(RuntimeError, match="Permission denied"):
            qmp.command("blockdev-add", {"driver": "file", "filename": str(other_disk), "node-name": "steal"})
        qmp.command("blockdev-add", {"driver": "file", "filename": str(image.rootfs), "node-name": "base",
                                     "read-only": True})  # fmt: skip
    finally:
        qmp.close()

    stats = cg.stats()
    assert limits.memory is not None and stats["memory_current"] is not None
    assert stats["memory_current"] < limits.memory
    assert stats["memory_peak"] is None or stats["memory_peak"] < limits.memory
    assert stats["oom_kills"] in (None, 0)
