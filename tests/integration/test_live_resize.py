"""Resizing a running VM with real QEMU and a real guest: the balloon, CPU hot-plug, disk hot-plug and removal,
a volume grown under a running guest, persistence across a restart, and bad input that changes nothing.

One tiny VM is shared by the module (booted once, ~3 s); the tests run in file order and each leaves it as the
next expects. Timings printed with -s are the figures in docs/resize.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Daemon, unique

pytestmark = [pytest.mark.integration]
MiB = 1 << 20


@pytest.fixture(scope="module")
def vm(daemon: Daemon, tiny: str) -> Iterator[str]:
    name = unique("rz")
    daemon.cli("vm", "run", name, "--image", tiny, "--memory", "256M", "--cpus", "1", "--max-cpus", "2", timeout=300)
    try:
        yield name
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)
        for volume in daemon.cli_json("volume", "list"):  # type: ignore[union-attr]
            if volume["name"].startswith(name) and volume["vm"] is None:
                daemon.cli("volume", "delete", volume["name"], check=False)


def guest(daemon: Daemon, vm: str, *command: str) -> str:
    return daemon.cli("vm", "exec", vm, "--", *command).stdout.strip()


def meminfo(daemon: Daemon, vm: str) -> dict[str, int]:
    lines = guest(daemon, vm, "cat", "/proc/meminfo").splitlines()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}


def timed_set(daemon: Daemon, vm: str, *args: str) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    answer = daemon.cli_json("vm", "set", vm, *args)
    seconds = time.monotonic() - began
    print(f"\nvm set {' '.join(args)}: {seconds:.2f} s, job result {answer['job']['result']}")  # type: ignore[index]
    return answer, seconds  # type: ignore[return-value]


def cgroup_memory_limit(daemon: Daemon, vm: str) -> int | None:
    """The VM's cgroup memory limit, where the daemon runs as root with cgroups (None elsewhere)."""
    from corral.errors import CorralError
    from corral.host import cgroups

    try:
        driver = cgroups.detect()
    except CorralError:
        return None
    vm_id = daemon.cli_json("vm", "show", vm)["id"]  # type: ignore[index]
    return cgroups.VMCgroup(driver, f"vm-{vm_id[:16]}", cgroups.Limits()).stats().get("memory_max")


def test_balloon_shrinks_memory_live_and_gives_it_back(daemon: Daemon, vm: str) -> None:
    before = meminfo(daemon, vm)
    limit_before = cgroup_memory_limit(daemon, vm)
    answer, _ = timed_set(daemon, vm, "--memory", "128M")
    limit_after = cgroup_memory_limit(daemon, vm)
    if limit_before is not None and limit_after is not None:
        assert limit_before - limit_after >= 128 * MiB, "the cgroup memory limit did not follow the balloon"
    assert answer["job"]["result"]["memory_actual"] == 128 * MiB
    assert answer["vm"]["spec"]["memory"] == 128 * MiB
    assert answer["vm"]["spec"]["max_memory"] == 256 * MiB, "shrinking must keep the boot size as the ceiling"
    assert answer["vm"]["memory_actual"] == 128 * MiB
    after = meminfo(daemon, vm)
    # deflate-on-oom keeps MemTotal as it was (Linux then does not adjust it); what the guest can use drops.
    assert after["MemAvailable"] < 128 * MiB < before["MemAvailable"], (before, after)

    answer, _ = timed_set(daemon, vm, "--memory", "256M")
    assert answer["job"]["result"]["memory_actual"] == 256 * MiB
    assert meminfo(daemon, vm)["MemAvailable"] > 140 * MiB
    assert cgroup_memory_limit(daemon, vm) == limit_before


def test_cpu_hot_add_comes_online_in_the_guest(daemon: Daemon, vm: str) -> None:
    assert guest(daemon, vm, "cat", "/sys/devices/system/cpu/online") == "0"
    answer, _ = timed_set(daemon, vm, "--cpus", "2")
    assert answer["job"]["result"]["cpus_online"] == 2
    assert guest(daemon, vm, "cat", "/sys/devices/system/cpu/online") == "0-1"
    assert guest(daemon, vm, "nproc") == "2"
    # Down to one: the guest takes the CPU offline at once (it stays plugged until the next start).
    answer, _ = timed_set(daemon, vm, "--cpus", "1")
    assert guest(daemon, vm, "cat", "/sys/devices/system/cpu/online") == "0"
    answer, _ = timed_set(daemon, vm, "--cpus", "2")
    assert guest(daemon, vm, "nproc") == "2"


def _wait_for(daemon: Daemon, vm: str, command: str, expect: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (daemon.cli("vm", "exec", vm, "--", "sh", "-c", command, check=False).returncode == 0) != expect:
        assert time.monotonic() < deadline, f"`{command}` never became {expect}"
        time.sleep(0.3)


def test_disk_hot_add_write_resize_and_hot_remove(daemon: Daemon, vm: str) -> None:
    began = time.monotonic()
    job = daemon.cli_json("vm", "disk", "add", vm, "--size", "64M")
    volume = job["result"]["volume"]  # type: ignore[index]
    _wait_for(daemon, vm, "test -b /dev/vdb", True)
    print(f"\ndisk hot-add to /dev/vdb seen by the guest: {time.monotonic() - began:.2f} s (job {job['result']})")
    assert int(guest(daemon, vm, "cat", "/sys/block/vdb/size")) * 512 == 64 * MiB
    guest(daemon, vm, "sh", "-c", "echo corral-disk > /dev/vdb && sync")
    assert guest(daemon, vm, "head", "-c", "11", "/dev/vdb") == "corral-disk"
    listed = {v["name"]: v for v in daemon.cli_json("volume", "list")}  # type: ignore[union-attr]
    assert listed[volume]["vm"] == vm

    # A volume resized while it is plugged in reaches the running guest (QMP block_resize on its node).
    daemon.cli("volume", "resize", volume, "96M")
    _wait_for(daemon, vm, f"test $(cat /sys/block/vdb/size) -eq {96 * MiB // 512}", True)

    began = time.monotonic()
    daemon.cli("vm", "disk", "remove", vm, volume)
    print(f"disk hot-remove: {time.monotonic() - began:.2f} s")
    _wait_for(daemon, vm, "test -e /dev/vdb", False)
    listed = {v["name"]: v for v in daemon.cli_json("volume", "list")}  # type: ignore[union-attr]
    assert listed[volume]["vm"] is None and listed[volume]["size"] == 96 * MiB

    # The freed volume goes back in, and the data written before is still there.
    daemon.cli("vm", "disk", "add", vm, "--volume", volume)
    _wait_for(daemon, vm, "test -b /dev/vdb", True)
    assert guest(daemon, vm, "head", "-c", "11", "/dev/vdb") == "corral-disk"


def test_bad_input_is_one_line_and_changes_nothing(daemon: Daemon, vm: str) -> None:
    shown = daemon.cli_json("vm", "show", vm)
    volumes = daemon.cli_json("volume", "list")
    cases = [
        (("vm", "set", vm, "--memory", "512M"), "above the maximum"),
        (("vm", "set", vm, "--cpus", "0"), "invalid CPU count 0"),
        (("vm", "set", vm, "--cpus", "3"), "more than the maximum of 2"),
        (("vm", "set", vm), "nothing to change"),
        (("vm", "disk", "remove", vm, f"{vm}-root"), "is the root disk"),
        (("vm", "disk", "add", vm, "--volume", f"{vm}-root"), f"in use by VM {vm}"),
        (("vm", "disk", "add", vm), "either --size or --volume"),
    ]
    for args, message in cases:
        result = daemon.cli(*args, check=False)
        assert result.returncode == 2 if "nothing" in message or "either" in message else result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) <= 2 and message in lines[0], (args, result.stderr)
    after = daemon.cli_json("vm", "show", vm)
    assert after["spec"] == shown["spec"]  # type: ignore[index]
    assert daemon.cli_json("volume", "list") == volumes
    assert not [job for job in daemon.cli_json("job", "list") if job["state"] in ("queued", "running")]  # type: ignore[union-attr]


def test_changes_persist_across_a_restart(daemon: Daemon, vm: str) -> None:
    daemon.cli("vm", "set", vm, "--memory", "192M")
    daemon.cli("vm", "restart", vm, "--wait", timeout=300)
    shown = daemon.cli_json("vm", "show", vm)
    assert shown["spec"]["memory"] == 192 * MiB and shown["spec"]["cpus"] == 2  # type: ignore[index]
    assert guest(daemon, vm, "cat", "/sys/devices/system/cpu/online") == "0-1"
    assert guest(daemon, vm, "test", "-b", "/dev/vdb") == ""
    # Started with 256M (its ceiling) and ballooned down to 192M at once; it can grow back live.
    deadline = time.monotonic() + 30
    while meminfo(daemon, vm)["MemAvailable"] > 192 * MiB:
        assert time.monotonic() < deadline, "the balloon did not inflate at start"
        time.sleep(0.5)
    answer, _ = timed_set(daemon, vm, "--memory", "256M")
    assert answer["job"]["result"]["memory_actual"] == 256 * MiB


def test_a_fork_of_a_resized_vm_resumes_with_its_cpus_balloon_and_disk(daemon: Daemon, tiny: str) -> None:
    """A fork moves device state like a migration: the child, started from the spec, must match the parent (a
    disk hot-plugged on its port, the balloon where it was). Hot-plugged vCPUs are refused until a restart."""
    parent = unique("rzf")
    child = f"{parent}-k"
    daemon.cli(
        "vm",
        "run",
        parent,
        "--image",
        tiny,
        "--forkable",
        "--memory",
        "192M",
        "--max-memory",
        "256M",
        "--max-cpus",
        "2",
        timeout=300,
    )
    try:
        daemon.cli("vm", "set", parent, "--cpus", "2")
        daemon.cli("vm", "disk", "add", parent, "--size", "32M")
        _wait_for(daemon, parent, "test -b /dev/vdb", True)
        # A hot-plugged vCPU cannot be carried to a fork child yet: refused, with the way out, nothing made.
        refused = daemon.cli("vm", "fork", parent, child, check=False)
        assert refused.returncode != 0 and "hot-plugged since it started" in refused.stderr, refused.stderr
        assert guest(daemon, parent, "nproc") == "2"
        assert child not in {vm["name"] for vm in daemon.cli_json("vm", "list")}  # type: ignore[union-attr]
        daemon.cli("vm", "restart", parent, "--wait", timeout=300)
        daemon.cli("vm", "fork", parent, child)
        assert guest(daemon, child, "cat", "/sys/devices/system/cpu/online") == "0-1"
        assert int(guest(daemon, child, "cat", "/sys/block/vdb/size")) * 512 == 32 * MiB
        assert meminfo(daemon, child)["MemAvailable"] < 192 * MiB
        assert guest(daemon, parent, "nproc") == "2", "the parent runs on"
    finally:
        for name in (child, parent):
            daemon.cli("vm", "delete", name, "--force", check=False)
