"""What this host has to give: CPUs, memory, storage, the accelerator and the QEMU it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel

from corral.engine.accel import choose_accel


class Inventory(BaseModel):
    cpus: int
    memory: int
    storage_total: int
    storage_free: int
    accel: str
    qemu_version: str | None


def total_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def qemu_version(binary: str) -> str | None:
    """QEMU's version string, or None when the binary is missing (reported, not fatal: VMs just cannot start)."""
    if shutil.which(binary) is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.splitlines()[0] if out else ""
    return first.split("version", 1)[-1].strip().split()[0] if "version" in first else None


def read_usage(pool_dir: Path, meminfo: Path = Path("/proc/meminfo")) -> dict[str, float]:
    """What the host uses now, for `corral pool show`: memory in use (total minus available), the 1-minute load
    average (CPUs busy), and bytes used on the storage pool's filesystem."""
    fields = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            fields[key] = int(rest.split()[0]) * 1024
    usage = shutil.disk_usage(pool_dir)
    return {
        "memory_used": fields.get("MemTotal", 0) - fields.get("MemAvailable", 0),
        "load1": round(os.getloadavg()[0], 2),
        "storage_used": usage.total - usage.free,
    }


def bridges(sys_net: Path = Path("/sys/class/net")) -> list[str]:
    """The Linux bridges on this host (in this network namespace): placement sends a VM on a bridge-mode network
    only to hosts that have its uplink bridge (corral.cluster.placement)."""
    try:
        return sorted(entry.name for entry in sys_net.iterdir() if (entry / "bridge").is_dir())
    except OSError:
        return []


def read_inventory(pool_dir: Path, accel_setting: str, qemu_binary: str, qemu: str | None = None) -> Inventory:
    """``qemu``: the version found before, to skip running the binary again."""
    usage = shutil.disk_usage(pool_dir)
    return Inventory(
        cpus=len(os.sched_getaffinity(0)),
        memory=total_memory(),
        storage_total=usage.total,
        storage_free=usage.free,
        accel=choose_accel(accel_setting),
        qemu_version=qemu or qemu_version(qemu_binary),
    )
