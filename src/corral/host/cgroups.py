"""Per-VM cgroups: CPU quota and weight, a memory limit and block I/O throttles, on cgroup v2 or v1.

Each VM's QEMU lives in a cgroup of its own under one parent (``corral.slice`` on v2, ``corral`` in every v1
hierarchy), so a runaway guest can only burn its own quota and, when it outgrows its memory limit, the kernel's
OOM killer picks that QEMU and nothing else. Most distributions mount v2 (unified) at /sys/fs/cgroup; some hosts,
this one included, still run v1 with one mount per controller, so both are supported behind one ``CgroupDriver``.

The drivers only read and write files under their mount points, which lets the unit tests run them against a
fake cgroupfs in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.errors import EngineError, InvalidInput

MiB = 1024 * 1024
CPU_PERIOD_US = 100_000  # the kernel's default CFS period; quota = cores x period
DEFAULT_CPU_WEIGHT = 100  # v2's default weight, the same as v1's 1024 shares
V1_SHARES_DEFAULT = 1024
V1_SHARES_MIN, V1_SHARES_MAX = 2, 262_144
V1_UNLIMITED = "-1"

# QEMU's own memory next to the guest's RAM, measured with QEMU 7.2 under TCG (docs/isolation.md): ~50 MiB for
# the binary's heap, device models and block layer whatever the RAM size, a few MiB per GiB of RAM (page tables,
# dirty bitmaps), and the TCG translation buffer, which fills up to its size (-accel tcg,tb-size=N; 7.2's default
# is 1 GiB, far too loose to bound, so the launcher should pass tb-size=TCG_TB_SIZE_MIB).
OVERHEAD_FIXED = 64 * MiB
OVERHEAD_PER_GIB = 4 * MiB
OVERHEAD_SCALING_MAX = 256 * MiB
TCG_TB_SIZE_MIB = 64
V2_PARENT = "corral.slice"
V1_PARENT = "corral"
V2_CONTROLLERS = ("cpu", "memory")  # required; "io" only when I/O limits are asked for
V1_CONTROLLERS = ("cpu", "cpuacct", "memory")  # required; "blkio" only when I/O limits are asked for

_DEVICE = re.compile(r"^\d+:\d+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")

Bps = Annotated[int, Field(gt=0)]


class CgroupError(EngineError):
    """A cgroup could not be created, configured or removed; the message names the file and the reason."""


class Limits(BaseModel):
    """What one VM may use. ``None`` means unlimited; setting a limit back to ``None`` lifts it."""

    model_config = ConfigDict(frozen=True)

    cpus: float | None = Field(default=None, gt=0, le=4096)  # a quota in cores: 0.5 = half of one CPU
    cpu_weight: int = Field(default=DEFAULT_CPU_WEIGHT, ge=1, le=10_000)  # relative share under contention
    memory: int | None = Field(default=None, ge=16 * MiB)  # bytes, QEMU's whole footprint (see memory_limit_for)
    io_read_bps: dict[str, Bps] = {}  # "major:minor" -> bytes per second
    io_write_bps: dict[str, Bps] = {}

    @field_validator("io_read_bps", "io_write_bps")
    @classmethod
    def _devices(cls, value: dict[str, int]) -> dict[str, int]:
        for device in value:
            if not _DEVICE.match(device):
                raise ValueError(f"device {device!r} is not major:minor (see lsblk's MAJ:MIN column)")
        return value

    @property
    def io_devices(self) -> set[str]:
        return set(self.io_read_bps) | set(self.io_write_bps)

    @classmethod
    def for_vm(
        cls,
        vcpus: int,
        guest_ram: int,
        cpus: float | None = None,
        cpu_weight: int = DEFAULT_CPU_WEIGHT,
        tb_size: int = TCG_TB_SIZE_MIB * MiB,
    ) -> Limits:
        """The default for a VM: as many cores as it has vCPUs (or an explicit quota) and RAM plus overhead."""
        quota = cpus if cpus is not None else float(vcpus)
        return cls(cpus=quota, cpu_weight=cpu_weight, memory=memory_limit_for(guest_ram, tb_size))


def memory_limit_for(guest_ram: int, tb_size: int = TCG_TB_SIZE_MIB * MiB) -> int:
    """Guest RAM + 64 MiB + 4 MiB per GiB of RAM (at most 256 MiB) + the TCG translation buffer (0 under KVM).

    Too tight and a guest that touches all its RAM gets its QEMU OOM-killed; too loose and the limit stops
    protecting the host. Measured peaks beyond RAM after a guest filled its memory: ~46-49 MiB plus whatever the
    translation buffer had filled (70 MiB of the default 1 GiB after a short run, all 64 MiB with tb-size=64), so
    a 256 MiB guest gets 385 MiB (peak seen ~360) and a 1 GiB guest 1156 MiB (peak seen 1109).
    """
    if guest_ram <= 0:
        raise InvalidInput(f"guest RAM must be positive, got {guest_ram}")
    if tb_size < 0:
        raise InvalidInput(f"the TCG translation buffer size cannot be negative, got {tb_size}")
    scaling = min(OVERHEAD_PER_GIB * guest_ram // (1024 * MiB), OVERHEAD_SCALING_MAX)
    return guest_ram + OVERHEAD_FIXED + scaling + tb_size


def weight_to_shares(weight: int) -> int:
    """v2 cpu.weight (1..10000, default 100) to v1 cpu.shares (2..262144, default 1024), linearly like systemd."""
    if not 1 <= weight <= 10_000:
        raise InvalidInput(f"CPU weight must be between 1 and 10000, got {weight}")
    return max(V1_SHARES_MIN, min(V1_SHARES_MAX, weight * V1_SHARES_DEFAULT // DEFAULT_CPU_WEIGHT))


def quota_us(cpus: float, period_us: int = CPU_PERIOD_US) -> int:
    """CFS quota for ``cpus`` cores per period; the kernel refuses less than 1 ms."""
    return max(1000, round(cpus * period_us))


# --- file helpers ---------------------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    """One write per call, as cgroupfs expects; the kernel's errno becomes a message naming the file."""
    try:
        with path.open("w") as handle:
            handle.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None or not text.strip() or text.strip() == "max":
        return None
    return int(text.split()[0])


def _keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file such as cpu.stat or memory.events: ``key value`` per line."""
    result: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            result[key] = int(value.split()[0])
    return result


def _pids(path: Path) -> list[int]:
    return [int(line) for line in (_read(path) or "").split()]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidInput(f"cgroup name {name!r} must be letters, digits, '_', '.', '@' or '-'")


# --- drivers --------------------------------------------------------------------------------------------------


class CgroupDriver(ABC):
    """One cgroup hierarchy layout (v1 or v2); VMCgroup talks to it by VM name only."""

    version: str

    @abstractmethod
    def directories(self, name: str) -> list[Path]:
        """Every directory that makes up the VM's cgroup (one on v2, one per mounted controller on v1)."""

    @abstractmethod
    def create(self, name: str, limits: Limits) -> None:
        """Make the directories (parents included) and enable what the limits need; idempotent."""

    @abstractmethod
    def apply(self, name: str, limits: Limits) -> None:
        """Write every limit, lifting the ones that are ``None`` or no longer listed."""

    @abstractmethod
    def stats(self, name: str) -> dict[str, int | None]:
        """Usage counters, with ``None`` for what this kernel does not report."""

    def procs_files(self, name: str) -> list[Path]:
        return [directory / "cgroup.procs" for directory in self.directories(name)]

    def pids(self, name: str) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files(name):
            found.update(_pids(procs))
        return sorted(found)

    def add(self, name: str, pid: int) -> None:
        for procs in self.procs_files(name):
            _write(procs, str(pid))

    def remove(self, name: str) -> None:
        for directory in self.directories(name):
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CgroupError(f"cannot remove cgroup {directory}: {exc.strerror or exc}") from exc


class CgroupV2Driver(CgroupDriver):
    """The unified hierarchy: one directory per VM under ``<mount>/corral.slice`` with cpu, memory (and io)."""

    version = "v2"

    def __init__(self, mount: Path = Path("/sys/fs/cgroup"), parent: str = V2_PARENT) -> None:
        self.mount = mount
        self.parent = mount / parent

    def available(self) -> set[str]:
        return set((_read(self.mount / "cgroup.controllers") or "").split())

    def directories(self, name: str) -> list[Path]:
        _check_name(name)
        return [self.parent / name]

    def _enable(self, controllers: Iterable[str]) -> None:
        """Turn the controllers on for the parent's children, from the mount down (v2 delegates level by level)."""
        wanted = list(controllers)
        missing = [c for c in wanted if c not in self.available()]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {self.mount} lacks the {', '.join(missing)} controller(s)",
                "boot with a kernel that has them, or free them from cgroup v1 (systemd.unified_cgroup_hierarchy=1)",
            )
        self.parent.mkdir(parents=True, exist_ok=True)
        parts = self.parent.relative_to(self.mount).parts
        levels = [self.mount.joinpath(*parts[:depth]) for depth in range(len(parts) + 1)]  # mount .. parent
        for level in levels:
            enabled = set((_read(level / "cgroup.subtree_control") or "").split())
            todo = [c for c in wanted if c not in enabled]
            if todo:
                _write(level / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))

    def create(self, name: str, limits: Limits) -> None:
        controllers = list(V2_CONTROLLERS) + (["io"] if limits.io_devices else [])
        self._enable(controllers)
        for directory in self.directories(name):
            directory.mkdir(exist_ok=True)

    def apply(self, name: str, limits: Limits) -> None:
        if limits.io_devices and "io" not in self.available():
            raise CgroupError(f"cgroup v2 at {self.mount} has no io controller, so I/O limits cannot be set")
        (cg,) = self.directories(name)
        cpu_max = f"{quota_us(limits.cpus)} {CPU_PERIOD_US}" if limits.cpus else f"max {CPU_PERIOD_US}"
        _write(cg / "cpu.max", cpu_max)
        _write(cg / "cpu.weight", str(limits.cpu_weight))
        _write(cg / "memory.max", str(limits.memory) if limits.memory else "max")
        self._apply_io(cg, limits)

    def _apply_io(self, cg: Path, limits: Limits) -> None:
        io_max = cg / "io.max"
        current = {line.split()[0] for line in (_read(io_max) or "").splitlines() if line.strip()}
        for device in sorted(current | limits.io_devices):
            rbps = limits.io_read_bps.get(device, "max")
            wbps = limits.io_write_bps.get(device, "max")
            _write(io_max, f"{device} rbps={rbps} wbps={wbps}")

    def stats(self, name: str) -> dict[str, int | None]:
        (cg,) = self.directories(name)
        cpu = _keyed(cg / "cpu.stat")
        events = _keyed(cg / "memory.events")
        usage = cpu.get("usage_usec")
        throttled = cpu.get("throttled_usec")
        return {
            "cpu_usage_ns": usage * 1000 if usage is not None else None,
            "cpu_throttled_ns": throttled * 1000 if throttled is not None else None,
            "cpu_nr_throttled": cpu.get("nr_throttled"),
            "memory_current": _read_int(cg / "memory.current"),
            "memory_peak": _read_int(cg / "memory.peak"),  # kernel 5.19+
            "memory_max": _read_int(cg / "memory.max"),
            "oom_kills": events.get("oom_kill"),
        }


class CgroupV1Driver(CgroupDriver):
    """Legacy hierarchies: one directory per VM in every controller's mount (cpu, cpuacct, memory, blkio)."""

    version = "v1"

    def __init__(self, mounts: dict[str, Path], parent: str = V1_PARENT) -> None:
        self.mounts = mounts
        self.parent = parent

    def _dir(self, controller: str, name: str) -> Path:
        return self.mounts[controller] / self.parent / name

    def directories(self, name: str) -> list[Path]:
        _check_name(name)
        unique: dict[Path, None] = {}
        for controller in (*V1_CONTROLLERS, "blkio"):
            if controller in self.mounts:
                unique[self._dir(controller, name)] = None  # co-mounted controllers share one directory
        return list(unique)

    def create(self, name: str, limits: Limits) -> None:
        needed = list(V1_CONTROLLERS) + (["blkio"] if limits.io_devices else [])
        missing = [c for c in needed if c not in self.mounts]
        if missing:
            raise CgroupError(
                f"no cgroup v1 mount for the {', '.join(missing)} controller(s)",
                "mount them (mount -t cgroup -o <controller> cgroup /sys/fs/cgroup/<controller>) or use cgroup v2",
            )
        for directory in self.directories(name):
            directory.mkdir(parents=True, exist_ok=True)

    def apply(self, name: str, limits: Limits) -> None:
        cpu = self._dir("cpu", name)
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota_us(limits.cpus)) if limits.cpus else V1_UNLIMITED)
        _write(cpu / "cpu.shares", str(weight_to_shares(limits.cpu_weight)))
        _write(self._dir("memory", name) / "memory.limit_in_bytes", str(limits.memory or V1_UNLIMITED))
        if limits.io_devices or "blkio" in self.mounts:
            self._apply_io(name, limits)

    def _apply_io(self, name: str, limits: Limits) -> None:
        if "blkio" not in self.mounts:
            raise CgroupError("no cgroup v1 blkio mount, so I/O limits cannot be set")
        blkio = self._dir("blkio", name)
        for wanted, filename in ((limits.io_read_bps, "blkio.throttle.read_bps_device"),
                                 (limits.io_write_bps, "blkio.throttle.write_bps_device")):  # fmt: skip
            path = blkio / filename
            current = {line.split()[0] for line in (_read(path) or "").splitlines() if line.strip()}
            for device in sorted(current - set(wanted)):
                _write(path, f"{device} 0")  # 0 lifts the throttle
            for device, bps in sorted(wanted.items()):
                _write(path, f"{device} {bps}")

    def stats(self, name: str) -> dict[str, int | None]:
        cpu = _keyed(self._dir("cpu", name) / "cpu.stat")
        memory = self._dir("memory", name)
        limit = _read_int(memory / "memory.limit_in_bytes")
        return {
            "cpu_usage_ns": _read_int(self._dir("cpuacct", name) / "cpuacct.usage"),
            "cpu_throttled_ns": cpu.get("throttled_time"),
            "cpu_nr_throttled": cpu.get("nr_throttled"),
            "memory_current": _read_int(memory / "memory.usage_in_bytes"),
            "memory_peak": _read_int(memory / "memory.max_usage_in_bytes"),
            "memory_max": None if limit is None or limit >= 2**62 else limit,  # v1 reports "unlimited" as ~2^63
            "oom_kills": _keyed(memory / "memory.oom_control").get("oom_kill"),
        }


# --- detection ------------------------------------------------------------------------------------------------


def parse_mountinfo(text: str) -> tuple[list[Path], dict[str, Path]]:
    """cgroup2 mount points and the v1 controller -> mount point map, from /proc/self/mountinfo's text."""
    v2: list[Path] = []
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            v2.append(mount_point)
        elif tail[0] == "cgroup":
            for option in tail[2].split(","):
                if option in (*V1_CONTROLLERS, "blkio", "pids"):
                    v1.setdefault(option, mount_point)
    return v2, v1


def detect(mountinfo: str | None = None, v2_parent: str = V2_PARENT, v1_parent: str = V1_PARENT) -> CgroupDriver:
    """v2 when a unified mount offers cpu and memory, else v1 when cpu, cpuacct and memory are mounted.

    A host may mount both (v1 for the controllers and an empty v2 on the side, like this one): the driver goes
    where the controllers are.
    """
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    v2_mounts, v1_mounts = parse_mountinfo(mountinfo)
    for mount in v2_mounts:
        driver = CgroupV2Driver(mount, v2_parent)
        if set(V2_CONTROLLERS) <= driver.available():
            return driver
    if all(c in v1_mounts for c in V1_CONTROLLERS):
        return CgroupV1Driver(v1_mounts, v1_parent)
    raise CgroupError(
        f"no usable cgroup hierarchy: need v2 with cpu and memory, or v1 cpu, cpuacct and memory "
        f"(found {_describe(v2_mounts, v1_mounts)})",
        "mount cgroup2 at /sys/fs/cgroup, or the v1 controllers under /sys/fs/cgroup/<controller>",
    )


def _describe(v2_mounts: list[Path], v1_mounts: dict[str, Path]) -> str:
    parts = [f"v2 at {m} with {' '.join(sorted(CgroupV2Driver(m).available())) or 'no controllers'}" for m in v2_mounts]
    parts += [f"v1 {controller}" for controller in sorted(v1_mounts)]
    return ", ".join(parts) or "none"


# --- the per-VM handle ----------------------------------------------------------------------------------------


class VMCgroup:
    """One VM's cgroup. Create it before QEMU starts, put QEMU in it, destroy it after QEMU is gone."""

    def __init__(self, driver: CgroupDriver, name: str, limits: Limits) -> None:
        self.driver = driver
        self.name = name
        self.limits = limits

    @classmethod
    def create(cls, driver: CgroupDriver, name: str, limits: Limits) -> VMCgroup:
        """Make (or reuse, e.g. after a daemon restart) the cgroup and write ``limits``; idempotent."""
        driver.create(name, limits)
        cgroup = cls(driver, name, limits)
        cgroup.set_limits(limits)
        return cgroup

    @property
    def directories(self) -> list[Path]:
        return self.driver.directories(self.name)

    def set_limits(self, limits: Limits) -> None:
        """Change limits of a running VM; lowering memory below current use fails (EBUSY) rather than kill."""
        self.driver.create(self.name, limits)  # enables io if newly needed
        self.driver.apply(self.name, limits)
        self.limits = limits

    def add(self, pid: int) -> None:
        """Move a running process (all its threads) in. Memory it already holds stays charged where it was."""
        self.driver.add(self.name, pid)

    def preexec(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the forked child in before it execs QEMU, so every byte QEMU ever
        allocates is charged here. The paths are computed now; the child only does os.open/os.write."""
        files = [os.fsencode(path) for path in self.driver.procs_files(self.name)]

        def enter() -> None:
            pid = str(os.getpid()).encode()
            for path in files:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        return enter

    def pids(self) -> list[int]:
        return self.driver.pids(self.name)

    def stats(self) -> dict[str, int | None]:
        """cpu_usage_ns, cpu_throttled_ns, cpu_nr_throttled, memory_current/peak/max (bytes), oom_kills."""
        return self.driver.stats(self.name)

    def destroy(self, timeout: float = 5.0, kill: bool = False) -> None:
        """Remove the cgroup once it is empty (a QEMU that just exited may linger a moment as a zombie).

        With ``kill`` the processes still inside get SIGKILL first. Raises CgroupError if it stays busy.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            if kill:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if not left:
                try:
                    self.driver.remove(self.name)
                    return
                except CgroupError:
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {self.name} still holds processes {left} after {timeout:.0f} s",
                    "stop the VM's QEMU first, or destroy with kill=True",
                )
            time.sleep(0.02)
