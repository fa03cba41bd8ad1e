"""Usage of running VMs, sampled by the agent and written to the store for /metrics.

The API never asks QEMU or the cgroup filesystem itself (it may run on another machine); it reads what the
agent last saw. Counters come from the VM's cgroup (CPU time, memory) and from QMP (disk I/O per device).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError
from corral.host import cgroups
from corral.store.models import VM

if TYPE_CHECKING:
    from corral.host.agent import Agent, RunningVM

SAMPLE_INTERVAL = 10.0


async def _sample(agent: Agent, running: RunningVM) -> dict[str, Any]:
    stats: dict[str, Any] = {"sampled_at": time.time()}
    driver = agent.isolation.driver
    if driver is not None:
        try:
            usage = cgroups.VMCgroup(driver, f"vm-{running.vm_id[:16]}", cgroups.Limits()).stats()
            if usage.get("cpu_usage_ns") is not None:
                stats["cpu_seconds"] = usage["cpu_usage_ns"] / 1e9
            if usage.get("memory_current") is not None:
                stats["memory_bytes"] = usage["memory_current"]
            if usage.get("oom_kills") is not None:
                stats["oom_kills"] = usage["oom_kills"]
        except (CorralError, OSError):
            pass
    if "memory_bytes" not in stats:
        stats["memory_bytes"] = _rss(running.proc.pid)
    # No balloon device (a VM started before it existed) leaves the figure out.
    with contextlib.suppress(CorralError, KeyError, TypeError):
        stats["balloon_bytes"] = int((await running.proc.execute("query-balloon"))["actual"])
    try:
        blockstats = await running.proc.execute("query-blockstats", {"query-nodes": False})
    except CorralError:
        blockstats = []
    stats["disks"] = {
        (entry.get("qdev") or entry.get("device") or "?").split("/")[-1]: {
            "read_bytes": entry["stats"].get("rd_bytes", 0),
            "write_bytes": entry["stats"].get("wr_bytes", 0),
            "read_ops": entry["stats"].get("rd_operations", 0),
            "write_ops": entry["stats"].get("wr_operations", 0),
        }
        for entry in blockstats
        if "stats" in entry
    }
    return stats


def _rss(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):  # noqa: SIM115 - tiny file, read once
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def sample_all(agent: Agent) -> None:
    now = time.monotonic()
    for vm_id, running in list(agent.vms.items()):
        if running.proc.exited or now - running.stats_sampled < SAMPLE_INTERVAL:
            continue
        running.stats_sampled = now
        stats = await _sample(agent, running)
        with agent.store.session() as session:
            vm = session.get(VM, vm_id)
            if vm is not None:
                vm.stats = stats
