"""Isolation between real VMs run by the daemon: CPU limits, memory limits, crashes and disk access.

Two guests share the module. Needs root (cgroups, per-VM uids); skips loudly otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from corral.host.cgroups import detect
from tests.conftest import Daemon, require, unique

pytestmark = [pytest.mark.integration]

# Guest progress: how many shell loop iterations fit in a few seconds of the guest's (real-time) clock.
SPIN = "i=0; end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do i=$((i+1)); done; echo $i"


@pytest.fixture(scope="module")
def pair(daemon: Daemon, tiny: str) -> tuple[str, str]:
    require(os.geteuid() == 0, "VM isolation tests need root (cgroups, per-VM uids)")
    limited, free = unique("lim"), unique("free")
    daemon.cli("vm", "run", limited, "--image", tiny, "--cpu-limit", "0.2", timeout=300)
    daemon.cli("vm", "run", free, "--image", tiny, timeout=300)
    yield limited, free
    for name in (limited, free):
        daemon.cli("vm", "delete", name, "--force", check=False)


def vm(daemon: Daemon, name: str) -> dict[str, Any]:
    return daemon.cli_json("vm", "show", name)  # type: ignore[return-value]


def spin(daemon: Daemon, name: str, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral",
            "vm",
            "exec",
            name,
            "--timeout",
            str(seconds + 60),
            "--",
            "sh",
            "-c",
            SPIN.format(seconds=seconds),
        ],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cpu_limit_throttles_its_vm_while_the_neighbour_keeps_its_share(daemon: Daemon, pair: tuple[str, str]) -> None:
    limited, free = pair
    procs = [spin(daemon, limited, 8), spin(daemon, free, 8)]
    counts = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        counts.append(int(out.strip().splitlines()[-1]))
    limited_count, free_count = counts
    # 0.2 of a core against a whole one (both under TCG, on a shared host): the limited guest gets far less done.
    assert limited_count * 2.5 < free_count, f"limited {limited_count} vs free {free_count} loop iterations"


def _qemu_ids(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
    return uid, gid


def test_a_vms_qemu_cannot_open_another_vms_disk(daemon: Daemon, pair: tuple[str, str]) -> None:
    limited, free = pair
    uid, gid = _qemu_ids(vm(daemon, limited)["pid"])
    other_uid, _ = _qemu_ids(vm(daemon, free)["pid"])
    assert uid != 0 and uid != other_uid, "each VM's QEMU must run under a non-root uid of its own"
    # Disk files are named by volume id (issue 11): the root disk is the VM's first.
    other_disk = daemon.home / "pools" / "default" / vm(daemon, free)["disks"][0]["path"]
    own_disk = daemon.home / "pools" / "default" / vm(daemon, limited)["disks"][0]["path"]

    def open_as_qemu(path: Path) -> int:
        """0 if the VM's uid can read ``path``, 13 if the kernel refuses (checked in a forked child)."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                with open(path, "rb") as disk:
                    disk.read(1)
                code = 0
            except PermissionError:
                code = 13
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert open_as_qemu(own_disk) == 0, "the VM's own QEMU uid must be able to read its disk"
    assert open_as_qemu(other_disk) == 13, "a VM's QEMU uid could read another VM's disk"


def test_a_vm_over_its_memory_limit_is_the_only_one_to_die(daemon: Daemon, tiny: str) -> None:
    require(os.geteuid() == 0, "needs root (cgroups)")
    greedy, neighbour = unique("greedy"), unique("calm")
    daemon.cli("vm", "run", greedy, "--image", tiny, "--memory", "256M", timeout=300)
    daemon.cli("vm", "run", neighbour, "--image", tiny, timeout=300)
    try:
        pid = vm(daemon, greedy)["pid"]
        driver = detect()
        cgroup_dirs = [d for d in driver.directories(f"vm-{vm(daemon, greedy)['id'][:16]}") if d.exists()]
        memory_dir = next(
            d for d in cgroup_dirs if (d / "memory.limit_in_bytes").exists() or (d / "memory.max").exists()
        )
        procs = (memory_dir / "cgroup.procs").read_text().split()
        assert str(pid) in procs, "the VM's QEMU is not in its own cgroup"
        # Tighten the VM's limit to well under what a guest filling its RAM needs, then fill it.
        limit_file = memory_dir / (
            "memory.limit_in_bytes" if (memory_dir / "memory.limit_in_bytes").exists() else "memory.max"
        )
        current = int(
            (
                memory_dir / ("memory.usage_in_bytes" if limit_file.name.endswith("bytes") else "memory.current")
            ).read_text()
        )
        limit_file.write_text(str(current + (48 << 20)))
        daemon.cli(
            "vm",
            "exec",
            greedy,
            "--",
            "sh",
            "-c",
            "mkdir -p /mnt; mount -t tmpfs -o size=220m none /mnt; dd if=/dev/zero of=/mnt/fill bs=1M count=200",
            check=False,
            timeout=120,
        )
        deadline = time.monotonic() + 60
        while vm(daemon, greedy)["state"] != "crashed" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert vm(daemon, greedy)["state"] == "crashed"
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert vm(daemon, neighbour)["state"] == "running"
        assert daemon.cli("vm", "exec", neighbour, "--", "echo", "still-here").stdout.strip() == "still-here"
    finally:
        for name in (greedy, neighbour):
            daemon.cli("vm", "delete", name, "--force", check=False)


def test_a_killed_vm_leaves_its_neighbours_running(daemon: Daemon, pair: tuple[str, str], tiny: str) -> None:
    victim = unique("victim")
    daemon.cli("vm", "run", victim, "--image", tiny, timeout=300)
    try:
        os.kill(vm(daemon, victim)["pid"], 9)
        deadline = time.monotonic() + 30
        while vm(daemon, victim)["state"] != "crashed" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert vm(daemon, victim)["state"] == "crashed"
        for name in pair:
            assert vm(daemon, name)["state"] == "running"
            assert daemon.cli("vm", "exec", name, "--", "echo", "ok").stdout.strip() == "ok"
    finally:
        daemon.cli("vm", "delete", victim, "--force", check=False)


def test_disk_bandwidth_limit_is_enforced(daemon: Daemon, tiny: str) -> None:
    slow = unique("slowdisk")
    daemon.cli("vm", "run", slow, "--image", tiny, "--disk", "256M", "--disk-write-bps", "4M", timeout=300)
    try:
        started = time.monotonic()
        result = daemon.cli(
            "vm",
            "exec",
            slow,
            "--timeout",
            "120",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/vdb bs=1M count=16 conv=fsync 2>&1",
            timeout=180,
        )
        elapsed = time.monotonic() - started
        assert "16+0 records out" in result.stdout, result.stdout
        # 16 MiB at 4 MiB/s takes about 4 s (QEMU's throttling allows a short burst first).
        assert elapsed >= 2.5, f"16 MiB written in {elapsed:.1f} s despite a 4 MiB/s limit"
    finally:
        daemon.cli("vm", "delete", slow, "--force", check=False)
