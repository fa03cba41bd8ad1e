"""cgroup drivers against a fake cgroupfs in tmp_path: which files get which values on v1 and v2, the weight to
shares mapping, the memory limit rule, detection from mountinfo, and the pure helpers of the sandbox."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.errors import InvalidInput
from corral.host import cgroups
from corral.host.cgroups import (
    CgroupError,
    CgroupV1Driver,
    CgroupV2Driver,
    Limits,
    MiB,
    VMCgroup,
    detect,
    memory_limit_for,
    parse_mountinfo,
    quota_us,
    weight_to_shares,
)
from corral.host.sandbox import VM_UID_BASE, may_traverse, sandbox_args, uid_for_vm

GiB = 1024 * MiB

Writes = list[tuple[Path, str]]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """Every cgroupfs write in order (a plain file only keeps the last one; the kernel applies each)."""
    log: Writes = []
    real = cgroups._write

    def record(path: Path, value: str) -> None:
        log.append((path, value))
        real(path, value)

    monkeypatch.setattr(cgroups, "_write", record)
    return log


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory pids") -> CgroupV2Driver:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    return CgroupV2Driver(root)


def fake_v1(root: Path, controllers: tuple[str, ...] = ("cpu", "cpuacct", "memory", "blkio")) -> CgroupV1Driver:
    mounts = {}
    for controller in controllers:
        (root / controller).mkdir(parents=True, exist_ok=True)
        mounts[controller] = root / controller
    return CgroupV1Driver(mounts)


class RmtreeV2(CgroupV2Driver):
    """cgroupfs lets rmdir remove a directory full of control files; a real tmp directory needs rmtree."""

    def remove(self, name: str) -> None:
        import shutil

        for directory in self.directories(name):
            shutil.rmtree(directory, ignore_errors=True)


# --- rules ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weight", "shares"), [(100, 1024), (1, 10), (50, 512), (200, 2048), (10_000, 102_400)])
def test_weight_to_shares_is_linear_around_the_defaults(weight: int, shares: int) -> None:
    assert weight_to_shares(weight) == shares


@pytest.mark.parametrize("weight", [0, 10_001, -5])
def test_weight_out_of_range_is_refused(weight: int) -> None:
    with pytest.raises(InvalidInput):
        weight_to_shares(weight)


def test_quota_is_cores_times_period_with_the_kernel_minimum() -> None:
    assert quota_us(0.25) == 25_000
    assert quota_us(2) == 200_000
    assert quota_us(0.001) == 1000


def test_memory_limit_rule() -> None:
    assert memory_limit_for(256 * MiB) == (256 + 64 + 1 + 64) * MiB
    assert memory_limit_for(1 * GiB) == (1024 + 64 + 4 + 64) * MiB
    assert memory_limit_for(1 * GiB, tb_size=0) == (1024 + 64 + 4) * MiB  # KVM: no translation buffer
    huge = 512 * GiB
    assert memory_limit_for(huge) - huge == (64 + 256 + 64) * MiB  # the scaling part is capped
    with pytest.raises(InvalidInput):
        memory_limit_for(0)


def test_limits_for_vm_and_validation() -> None:
    limits = Limits.for_vm(vcpus=2, guest_ram=512 * MiB)
    assert limits.cpus == 2.0 and limits.memory == memory_limit_for(512 * MiB) and limits.cpu_weight == 100
    assert Limits.for_vm(vcpus=4, guest_ram=GiB, cpus=0.5).cpus == 0.5
    for bad in ({"cpu_weight": 0}, {"cpus": 0}, {"memory": 1024}, {"io_read_bps": {"sda": 1}}):
        with pytest.raises(ValidationError):
            Limits(**bad)


# --- v2 -------------------------------------------------------------------------------------------------------


def test_v2_create_enables_controllers_and_writes_limits(tmp_path: Path, writes: Writes) -> None:
    driver = fake_v2(tmp_path)
    limits = Limits(cpus=1.5, cpu_weight=300, memory=400 * MiB, io_read_bps={"254:0": 10 * MiB})
    cg = VMCgroup.create(driver, "vm1", limits)
    leaf = tmp_path / "corral.slice" / "vm1"
    assert cg.directories == [leaf]
    assert (tmp_path / "cgroup.subtree_control", "+cpu +memory +io") in writes
    assert (tmp_path / "corral.slice" / "cgroup.subtree_control", "+cpu +memory +io") in writes
    assert (leaf / "cpu.max").read_text() == "150000 100000"
    assert (leaf / "cpu.weight").read_text() == "300"
    assert (leaf / "memory.max").read_text() == str(400 * MiB)
    assert (leaf / "io.max").read_text() == "254:0 rbps=10485760 wbps=max"


def test_v2_lifting_limits_writes_max_and_clears_old_devices(tmp_path: Path, writes: Writes) -> None:
    driver = fake_v2(tmp_path)
    cg = VMCgroup.create(driver, "vm1", Limits(cpus=1, memory=300 * MiB, io_write_bps={"8:0": MiB}))
    leaf = cg.directories[0]
    (leaf / "io.max").write_text("8:0 rbps=max wbps=1048576 riops=max wiops=max\n")
    writes.clear()
    cg.set_limits(Limits())
    assert (leaf / "cpu.max").read_text() == "max 100000"
    assert (leaf / "memory.max").read_text() == "max"
    assert (leaf / "io.max", "8:0 rbps=max wbps=max") in writes
    assert cg.limits == Limits()


def test_v2_without_memory_controller_is_a_clear_error(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, controllers="cpu io pids")
    with pytest.raises(CgroupError, match="memory"):
        VMCgroup.create(driver, "vm1", Limits())


def test_v2_io_limits_need_the_io_controller(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, controllers="cpu memory")
    VMCgroup.create(driver, "vm1", Limits())  # fine without I/O limits
    with pytest.raises(CgroupError, match="io"):
        VMCgroup.create(driver, "vm2", Limits(io_read_bps={"8:0": 1}))


def test_v2_stats(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path)
    cg = VMCgroup.create(driver, "vm1", Limits(memory=300 * MiB))
    leaf = cg.directories[0]
    (leaf / "cpu.stat").write_text("usage_usec 2500\nuser_usec 2000\nnr_throttled 7\nthrottled_usec 300\n")
    (leaf / "memory.current").write_text("1000\n")
    (leaf / "memory.peak").write_text("2000\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.stats() == {
        "cpu_usage_ns": 2_500_000,
        "cpu_throttled_ns": 300_000,
        "cpu_nr_throttled": 7,
        "memory_current": 1000,
        "memory_peak": 2000,
        "memory_max": 300 * MiB,
        "oom_kills": 1,
    }


# --- v1 -------------------------------------------------------------------------------------------------------


def test_v1_writes_every_controller(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path)
    limits = Limits(cpus=0.25, cpu_weight=50, memory=385 * MiB, io_write_bps={"254:0": 5 * MiB})
    cg = VMCgroup.create(driver, "vm1", limits)
    assert cg.directories == [tmp_path / c / "corral" / "vm1" for c in ("cpu", "cpuacct", "memory", "blkio")]
    cpu = tmp_path / "cpu/corral/vm1"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cpu / "cpu.shares").read_text() == "512"
    assert (tmp_path / "memory/corral/vm1/memory.limit_in_bytes").read_text() == str(385 * MiB)
    assert (tmp_path / "blkio/corral/vm1/blkio.throttle.write_bps_device").read_text() == "254:0 5242880"


def test_v1_lifting_limits(tmp_path: Path, writes: Writes) -> None:
    driver = fake_v1(tmp_path)
    cg = VMCgroup.create(driver, "vm1", Limits(cpus=1, memory=300 * MiB, io_read_bps={"8:0": MiB, "8:16": MiB}))
    read_bps = tmp_path / "blkio/corral/vm1/blkio.throttle.read_bps_device"
    read_bps.write_text("8:0 1048576\n8:16 1048576\n")
    writes.clear()
    cg.set_limits(Limits(io_read_bps={"8:16": 2 * MiB}))
    assert (tmp_path / "cpu/corral/vm1/cpu.cfs_quota_us").read_text() == "-1"
    assert (tmp_path / "memory/corral/vm1/memory.limit_in_bytes").read_text() == "-1"
    assert [(p.name, v) for p, v in writes if p == read_bps] == [
        ("blkio.throttle.read_bps_device", "8:0 0"),
        ("blkio.throttle.read_bps_device", "8:16 2097152"),
    ]


def test_v1_comounted_cpu_and_cpuacct_share_a_directory(tmp_path: Path) -> None:
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "memory").mkdir()
    both = tmp_path / "cpu,cpuacct"
    driver = CgroupV1Driver({"cpu": both, "cpuacct": both, "memory": tmp_path / "memory"})
    cg = VMCgroup.create(driver, "vm1", Limits())
    assert cg.directories == [both / "corral/vm1", tmp_path / "memory/corral/vm1"]


def test_v1_missing_controllers_are_named(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="memory"):
        VMCgroup.create(fake_v1(tmp_path / "a", ("cpu", "cpuacct")), "vm1", Limits())
    with pytest.raises(CgroupError, match="blkio"):
        VMCgroup.create(fake_v1(tmp_path / "b", ("cpu", "cpuacct", "memory")), "vm1", Limits(io_read_bps={"8:0": 1}))


def test_v1_stats_and_unlimited_memory(tmp_path: Path) -> None:
    cg = VMCgroup.create(fake_v1(tmp_path), "vm1", Limits())
    (tmp_path / "cpuacct/corral/vm1/cpuacct.usage").write_text("123456789\n")
    (tmp_path / "cpu/corral/vm1/cpu.stat").write_text("nr_periods 10\nnr_throttled 4\nthrottled_time 5000\n")
    memory = tmp_path / "memory/corral/vm1"
    (memory / "memory.usage_in_bytes").write_text("4096\n")
    (memory / "memory.max_usage_in_bytes").write_text("8192\n")
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.stats() == {
        "cpu_usage_ns": 123456789,
        "cpu_throttled_ns": 5000,
        "cpu_nr_throttled": 4,
        "memory_current": 4096,
        "memory_peak": 8192,
        "memory_max": None,
        "oom_kills": 2,
    }


# --- the handle -----------------------------------------------------------------------------------------------


def test_create_is_idempotent_and_add_writes_every_procs_file(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path)
    VMCgroup.create(driver, "vm1", Limits(cpus=1))
    cg = VMCgroup.create(driver, "vm1", Limits(cpus=2))
    assert (tmp_path / "cpu/corral/vm1/cpu.cfs_quota_us").read_text() == "200000"
    cg.add(4242)
    for directory in cg.directories:
        assert (directory / "cgroup.procs").read_text() == "4242"


def test_preexec_writes_the_callers_pid(tmp_path: Path) -> None:
    import os

    cg = VMCgroup.create(fake_v2(tmp_path), "vm1", Limits())
    (cg.directories[0] / "cgroup.procs").write_text("")
    cg.preexec()()
    assert (cg.directories[0] / "cgroup.procs").read_text() == str(os.getpid())


def test_destroy_waits_for_the_cgroup_to_empty(tmp_path: Path) -> None:
    cg = VMCgroup.create(RmtreeV2(fake_v2(tmp_path).mount), "vm1", Limits())
    procs = cg.directories[0] / "cgroup.procs"
    procs.write_text("999999\n")
    with pytest.raises(CgroupError, match="still holds"):
        cg.destroy(timeout=0.05)
    procs.write_text("")
    cg.destroy()
    assert not cg.directories[0].exists()


def test_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        VMCgroup.create(fake_v2(tmp_path), "../escape", Limits())


# --- detection ------------------------------------------------------------------------------------------------

V1_HOST = """\
25 24 0:22 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
26 24 0:23 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct
27 24 0:24 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
28 24 0:25 / /sys/fs/cgroup/blkio rw,relatime shared:12 - cgroup cgroup rw,blkio
29 24 0:26 / /sys/fs/cgroup/systemd rw,relatime shared:13 - cgroup cgroup rw,name=systemd
30 24 0:27 / {v2} rw,relatime shared:14 - cgroup2 cgroup2 rw
"""


def test_parse_mountinfo() -> None:
    v2, v1 = parse_mountinfo(V1_HOST.format(v2="/sys/fs/cgroup/unified"))
    assert v2 == [Path("/sys/fs/cgroup/unified")]
    assert v1 == {c: Path(f"/sys/fs/cgroup/{c}") for c in ("cpu", "cpuacct", "memory", "blkio")}
    _, comounted = parse_mountinfo("40 24 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
    assert comounted == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"), "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct")}


def test_detect_prefers_v2_only_when_it_has_the_controllers(tmp_path: Path) -> None:
    fake_v2(tmp_path / "hugetlb-only", controllers="hugetlb")
    driver = detect(V1_HOST.format(v2=tmp_path / "hugetlb-only"))
    assert isinstance(driver, CgroupV1Driver) and driver.version == "v1"
    fake_v2(tmp_path / "full")
    driver = detect(V1_HOST.format(v2=tmp_path / "full"))
    assert isinstance(driver, CgroupV2Driver) and driver.parent == tmp_path / "full" / "corral.slice"


def test_detect_without_any_hierarchy_names_what_it_found(tmp_path: Path) -> None:
    fake_v2(tmp_path, controllers="hugetlb")
    with pytest.raises(CgroupError, match="hugetlb"):
        detect(f"30 24 0:27 / {tmp_path} rw - cgroup2 cgroup2 rw\n")


# --- sandbox helpers ------------------------------------------------------------------------------------------


def test_sandbox_args() -> None:
    assert sandbox_args(VM_UID_BASE + 3, 999) == [
        "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny", "-runas", f"{VM_UID_BASE + 3}:999",
    ]  # fmt: skip
    with pytest.raises(InvalidInput):
        sandbox_args(0, 0)


def test_uid_for_vm_range() -> None:
    assert uid_for_vm(0) == VM_UID_BASE
    assert uid_for_vm(41) == VM_UID_BASE + 41
    with pytest.raises(InvalidInput):
        uid_for_vm(-1)
    with pytest.raises(InvalidInput):
        uid_for_vm(65_536)


def test_may_traverse_uses_the_right_permission_class() -> None:
    d = stat.S_IFDIR
    assert may_traverse(d | 0o700, owner=5, group=0, uid=5, gid=9)
    assert not may_traverse(d | 0o700, owner=0, group=0, uid=5, gid=9)
    assert may_traverse(d | 0o750, owner=0, group=9, uid=5, gid=9)
    assert may_traverse(d | 0o711, owner=0, group=0, uid=5, gid=9)
    assert not may_traverse(d | 0o075, owner=5, group=9, uid=5, gid=9)  # owner bits win, as in the kernel
