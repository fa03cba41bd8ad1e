"""Usage of running VMs, sampled by the agent and written to the store for /metrics.

The API never asks QEMU or the cgroup filesystem itself (it may run on another machine); it reads what the
agent last saw. Counters come from the VM's cgroup (CPU time, memory), from QMP (disk I/O per device) and from
the kernel's counters of the VM's TAPs (network I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from corral.errors import CorralError
from corral.host import cgroups
from corral.store import usage
from corral.store.models import VM

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.vm_lifecycle import RunningVM

SAMPLE_INTERVAL = 10.0
log = logging.getLogger("corral.agent")


async def _sample(agent: Agent, running: RunningVM) -> dict[str, Any]:
    stats: dict[str, Any] = {"sampled_at": time.time()}
    driver = agent.isolation.driver
    if driver is not None:
        try:
            usage = cgroups.VMCgroup(driver, f"vm-{running.vm_id[:16]}", cgroups.Limits()).stats()
            cpu_usage_ns = usage.get("cpu_usage_ns")
            if cpu_usage_ns is not None:
                stats["cpu_seconds"] = cpu_usage_ns / 1e9
            if usage.get("memory_current") is not None:
                stats["memory_bytes"] = usage["memory_current"]
            if usage.get("oom_kills") is not None:
                stats["oom_kills"] = usage["oom_kills"]
        except (CorralError, OSError):
            pass
    if "memory_bytes" not in stats:
        stats["memory_bytes"] = _rss(running.proc.pid)
    if "cpu_seconds" not in stats:  # no cgroup (isolation off): QEMU's own CPU time says the same
        cpu = _cpu_seconds(running.proc.pid)
        if cpu is not None:
            stats["cpu_seconds"] = cpu
    # No balloon device (a VM started before it existed) leaves the figure out.
    with contextlib.suppress(CorralError, KeyError, TypeError):
        stats["balloon_bytes"] = int((await running.proc.execute("query-balloon"))["actual"])
    try:
        blockstats = await running.proc.execute("query-blockstats", {"query-nodes": False})
    except CorralError:
        blockstats = []
    stats["disks"] = {
        disk_label(entry.get("qdev") or entry.get("device") or "?"): {
            "read_bytes": entry["stats"].get("rd_bytes", 0),
            "write_bytes": entry["stats"].get("wr_bytes", 0),
            "read_ops": entry["stats"].get("rd_operations", 0),
            "write_ops": entry["stats"].get("wr_operations", 0),
        }
        for entry in blockstats
        if "stats" in entry
    }
    stats["nics"] = _tap_counters(agent, running.vm_id)
    return stats


def disk_label(qdev: str) -> str:
    """The disk's device id from its QOM path: ``/machine/peripheral/disk0/virtio-backend`` is ``disk0`` (the
    path's last part is the same for every virtio disk, which would fold them all into one)."""
    parts = [part for part in qdev.split("/") if part]
    if "peripheral" in parts and parts.index("peripheral") + 1 < len(parts):
        return parts[parts.index("peripheral") + 1]
    return parts[-1] if parts else qdev


def _tap_counters(agent: Agent, vm_id: str) -> dict[str, dict[str, int]]:
    """Bytes through the VM's TAPs, from the guest's point of view (what the TAP receives, the guest sent).
    User-mode NICs have no counters QEMU 7.2 reports."""
    taps = agent.layout.vm_run_dir(vm_id) / "taps"
    counters: dict[str, dict[str, int]] = {}
    with contextlib.suppress(OSError):
        for tap in taps.read_text().split():
            base = Path("/sys/class/net", tap, "statistics")
            with contextlib.suppress(OSError, ValueError):
                counters[tap] = {
                    "receive_bytes": int((base / "tx_bytes").read_text()),
                    "transmit_bytes": int((base / "rx_bytes").read_text()),
                }
    return counters


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of a process and its finished children (/proc/PID/stat fields 14-17)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _rss(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):  # noqa: SIM115 - tiny file, read once
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rotate_serial_log(run_dir: Path, limit: int) -> bool:
    """Keep a VM's serial log under ``limit`` bytes: past it, its last ``limit`` bytes become ``serial.log.1``
    (the one previous part kept) and the log is truncated in place. What the guest prints is data it controls,
    so it must not grow without end. QEMU opens the log with O_APPEND (logappend=on), so its next write lands at
    the new end rather than leaving a hole; a rename would not do, QEMU would go on writing to the old file.

    The run directory belongs to the VM's QEMU user: nothing in it is followed (a link planted there could
    otherwise make root truncate or overwrite another file)."""
    try:
        directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            log_fd = os.open("serial.log", os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
        except OSError:
            return False
        with os.fdopen(log_fd, "r+b") as log:
            info = os.fstat(log.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size <= limit:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink("serial.log.1.tmp", dir_fd=directory)
            part_fd = os.open("serial.log.1.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                              dir_fd=directory)  # fmt: skip
            with os.fdopen(part_fd, "wb") as part:
                log.seek(max(0, info.st_size - limit))
                left = limit
                while left > 0 and (chunk := log.read(min(left, 1 << 20))):
                    part.write(chunk)
                    left -= len(chunk)
            os.replace("serial.log.1.tmp", "serial.log.1", src_dir_fd=directory, dst_dir_fd=directory)
            log.truncate(0)
        return True
    finally:
        os.close(directory)


_serial_logs: dict[str, dict[str, str]] = {}  # host name -> vm_id -> the path of the VM's serial log


def _over(serial_log: str, limit: int) -> bool:
    """Whether the serial log may be past ``limit``: one lstat, no file opened. It never follows a link, and a link
    or anything else that is no regular file is left to :func:`rotate_serial_log`, which refuses it."""
    try:
        info = os.lstat(serial_log)
    except OSError:
        return False
    return not stat.S_ISREG(info.st_mode) or info.st_size > limit


def logs_to_rotate(agent: Agent) -> list[str]:
    """The running VMs whose serial log needs :func:`rotate_serial_log`: an lstat each, cheap enough for the event
    loop, so a pass with nothing to rotate (nearly all of them) hands nothing to a thread. Each VM's path is made
    once (building 30 Paths every 2 s cost more than the lstats)."""
    limit = agent.settings.serial_log_max
    vm_ids = list(agent.vms)
    paths = _serial_logs.setdefault(agent.host_name, {})
    if len(paths) > 2 * len(vm_ids) + 64:  # VMs long gone
        paths.clear()
    due = []
    for vm_id in vm_ids:
        path = paths.get(vm_id)
        if path is None:
            path = paths[vm_id] = os.fspath(agent.layout.vm_run_dir(vm_id) / "serial.log")
        if _over(path, limit):
            due.append(vm_id)
    return due


def rotate_serial_logs(agent: Agent, vm_ids: list[str] | None = None) -> None:
    """Rotate the serial log of every running VM (or of ``vm_ids``) past ``serial_log_max``."""
    for vm_id in list(agent.vms) if vm_ids is None else vm_ids:
        try:
            if rotate_serial_log(agent.layout.vm_run_dir(vm_id), agent.settings.serial_log_max):
                log.info("rotated the serial log of VM %s", vm_id)
        except OSError as exc:
            log.warning("cannot rotate the serial log of VM %s: %s", vm_id, exc)


# When each host last wrote its own usage point and rolled its history up (monotonic seconds), by host name.
_host_sampled: dict[str, float] = {}
_history_kept: dict[str, float] = {}


async def sample_all(agent: Agent) -> None:
    """Sample each running VM (every SAMPLE_INTERVAL), keep its last stats for /metrics and write the usage
    history (corral.cluster.usage): a point per VM and one for the host, roll-ups about once a minute.

    Serial logs are checked on every pass (cheap: a guest printing without end must not get far past the cap);
    the round's stats are written in one transaction: one per VM was a large part of an idle agent's CPU with
    30 VMs (benchmarks/idle.py, docs/performance.md)."""
    rotate = logs_to_rotate(agent)
    if rotate:
        await asyncio.to_thread(rotate_serial_logs, agent, rotate)
    now = time.monotonic()
    host = agent.host_name
    # One round for every VM at once, so that the host's point sums the same moment of each of its VMs; a VM
    # never sampled yet is sampled at once (its metrics appear without waiting for the round).
    due = now - _host_sampled.get(host, -SAMPLE_INTERVAL) >= SAMPLE_INTERVAL
    if due:
        _host_sampled[host] = now
    sampled: dict[str, dict[str, Any]] = {}
    for vm_id, running in list(agent.vms.items()):
        if running.proc.exited or (not due and running.stats_sampled):
            continue
        running.stats_sampled = now
        sampled[vm_id] = await _sample(agent, running)
    before: dict[str, dict[str, Any] | None] = {}
    if sampled:  # the round's stats in one transaction, not one per VM: two statements whatever their number
        with agent.store.session(notify=False) as session:
            before = dict(session.execute(select(VM.id, VM.stats).where(VM.id.in_(list(sampled)))).tuples().all())
            if before:
                session.execute(update(VM), [{"id": vm_id, "stats": sampled[vm_id]} for vm_id in before])
    if not due:
        return
    samples = [(vm_id, stats, sampled[vm_id]) for vm_id, stats in before.items()]
    try:
        with agent.store.session(notify=False) as session:
            usage.record(session, host, samples, load=round(os.getloadavg()[0], 2))
            if now - _history_kept.get(host, -60.0) >= 60.0:
                _history_kept[host] = now
                usage.maintain(session, host)
    except Exception:  # history is for people and planners: its trouble must not stop the agent's loop
        log.exception("cannot write the usage history of host %s", host)
