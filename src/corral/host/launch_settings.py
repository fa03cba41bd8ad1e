"""What a VM's QEMU is told over QMP right after it starts, from the VM's spec: settings its command line does
not carry (disk throttling, the balloon's first target). One spec read serves both."""

from __future__ import annotations

from corral.engine.plan import LaunchPlan
from corral.engine.process import QemuProcess
from corral.spec.vm import VMSpec


async def apply_launch_settings(proc: QemuProcess, plan: LaunchPlan, spec: VMSpec) -> None:
    await apply_disk_limits(proc, plan, spec)
    await apply_balloon(proc, plan, spec)


async def apply_disk_limits(proc: QemuProcess, plan: LaunchPlan, spec: VMSpec) -> None:
    """Disk bandwidth and IOPS limits through QEMU's own throttling: it works on any filesystem, where the
    cgroup io controller only sees whole block devices (and nothing on tmpfs or overlay pools)."""
    for disk in plan.disks:
        if not disk.read_only:
            await throttle_disk(proc, disk.node, spec)


async def throttle_disk(proc: QemuProcess, node: str, spec: VMSpec) -> None:
    """The spec's disk limits on one disk (at launch, or when a disk is hot-added); none set, nothing sent."""
    if not (spec.disk_read_bps or spec.disk_write_bps or spec.disk_iops):
        return
    # The block backend belongs to the virtio device inside the PCI proxy that carries the qdev id.
    await proc.execute(
        "block_set_io_throttle",
        {
            "id": f"/machine/peripheral/{node}-dev/virtio-backend",
            "bps": 0,
            "bps_rd": spec.disk_read_bps or 0,
            "bps_wr": spec.disk_write_bps or 0,
            "iops": spec.disk_iops or 0,
            "iops_rd": 0,
            "iops_wr": 0,
        },
    )


async def apply_balloon(proc: QemuProcess, plan: LaunchPlan, spec: VMSpec) -> None:
    """A VM started with headroom (max_memory above memory) is ballooned down to its memory at once; the
    guest's driver inflates when it loads. A migration or fork child takes the balloon with the device state."""
    if not plan.balloon or plan.incoming:
        return
    if spec.memory < plan.memory_mib << 20:
        await proc.execute("balloon", {"value": spec.memory})
