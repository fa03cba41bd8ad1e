"""Job handlers that resize a running VM: balloon, CPU hot-plug, cgroup limits, and disk hot-plug.

The control plane (cluster/resize.py) has already validated the change and written the new spec; these make the
running QEMU follow it as far as it can live, and say what waits for the next start. Order matters for memory:
growing raises the cgroup limit before the balloon deflates, shrinking lowers it only after the balloon has
taken the pages back (the kernel refuses a limit below current use). See docs/resize.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import qemu_img
from corral.engine.argv import disk_blockdev_options, disk_device_options
from corral.engine.guest_agent import GuestAgent
from corral.engine.plan import DiskPlan
from corral.errors import Conflict, CorralError, EngineError, NotFound, Timeout
from corral.host import cgroups, sandbox, storage, vm_lifecycle, vm_plan
from corral.host.launch_settings import throttle_disk
from corral.spec.job_params import DiskAddParams, DiskRemoveParams, VMResizeParams
from corral.spec.sizes import format_size
from corral.spec.vm import MAX_DISKS, VMSpec
from corral.store.models import VM, Volume

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext
    from corral.host.vm_lifecycle import RunningVM

log = logging.getLogger("corral.agent")
MiB = 1 << 20
BALLOON_TIMEOUT = 30.0  # an idle 1 GiB guest gave back 768 MiB in ~1 s here; a busy one can take longer
CPU_ONLINE_TIMEOUT = 90.0  # a hot-plugged vCPU took ~12 s to come up under TCG
DISK_RELEASE_TIMEOUT = 20.0


def _running(agent: Agent, vm_id: str) -> RunningVM | None:
    running = agent.vms.get(vm_id)
    return running if running is not None and not running.proc.exited else None


# -- cgroup -----------------------------------------------------------------------------------------------------


def _limits(agent: Agent, spec: VMSpec) -> cgroups.Limits:
    """What the launch would give this spec (host/isolation.py): the memory limit follows the balloon target."""
    assert agent.inventory is not None
    tb_size = agent.settings.tcg_tb_size_mib * MiB if agent.inventory.accel == "tcg" else 0
    return cgroups.Limits.for_vm(
        spec.cpus,
        spec.memory,
        tb_size=tb_size,
        cpus=spec.cpu_limit,
        cpu_weight=spec.cpu_weight or cgroups.DEFAULT_CPU_WEIGHT,
    )


def _cgroup(agent: Agent, vm_id: str) -> cgroups.VMCgroup | None:
    driver = agent.isolation.driver
    if driver is None:
        return None
    return cgroups.VMCgroup(driver, f"vm-{vm_id[:16]}", cgroups.Limits())


async def _set_limits(agent: Agent, vm_id: str, limits: cgroups.Limits, attempts: int = 10) -> str | None:
    """Apply ``limits``; a memory limit below what QEMU holds right now is refused by the kernel (EBUSY), so it
    is retried for a few seconds while the balloon's pages drain. Returns a warning when it never took."""
    cgroup = _cgroup(agent, vm_id)
    if cgroup is None:
        return None
    for attempt in range(attempts):
        try:
            await asyncio.to_thread(cgroup.set_limits, limits)
            return None
        except CorralError as exc:
            if attempt == attempts - 1:
                log.warning("VM %s: cgroup limits not applied: %s", vm_id, exc)
                return f"the cgroup limits were not changed: {exc.message}"
            await asyncio.sleep(0.5)
    return None


# -- memory -----------------------------------------------------------------------------------------------------


async def balloon_actual(running: RunningVM) -> int:
    """What the guest has now: QEMU's RAM minus the balloon (QMP query-balloon)."""
    return int((await running.proc.execute("query-balloon"))["actual"])


async def _boot_memory(running: RunningVM) -> int:
    return int((await running.proc.execute("query-memory-size-summary"))["base-memory"])


async def _set_balloon(ctx: JobContext, running: RunningVM, target: int) -> tuple[int, float]:
    """Ask for ``target`` bytes and wait until the guest's driver gets there (within 1 MiB): (actual, seconds)."""
    began = time.monotonic()
    await running.proc.execute("balloon", {"value": target})
    actual = await balloon_actual(running)
    while abs(actual - target) > MiB:
        if time.monotonic() - began > BALLOON_TIMEOUT:
            raise Timeout(
                f"the guest's balloon reached {format_size(actual)}, not {format_size(target)}, within "
                f"{BALLOON_TIMEOUT:.0f} s",
                "the guest needs the virtio_balloon driver loaded; or restart the VM, which boots with the new memory",
            )
        await asyncio.sleep(0.1)
        actual = await balloon_actual(running)
    return actual, time.monotonic() - began


async def _resize_memory(ctx: JobContext, running: RunningVM, old: VMSpec, new: VMSpec) -> dict[str, Any]:
    agent, vm_id = ctx.agent, ctx.vm_id()
    boot = await _boot_memory(running)
    target = min(new.memory, boot)
    result: dict[str, Any] = {"memory_boot": boot}
    if new.memory > boot:
        result["memory_restart_needed"] = True
        result["note"] = (
            f"the guest booted with {format_size(boot)}: it has that much now and gets "
            f"{format_size(new.memory)} at the next start"
        )
    growing = target >= await balloon_actual(running)
    if growing:
        result["warning"] = await _set_limits(agent, vm_id, _limits(agent, new))
    ctx.progress(0.2, f"{'deflating' if growing else 'inflating'} the balloon to {format_size(target)}")
    actual, seconds = await _set_balloon(ctx, running, target)
    if not growing:
        result["warning"] = await _set_limits(agent, vm_id, _limits(agent, new))
    _record_balloon(agent, vm_id, actual)
    result.update(memory_actual=actual, balloon_seconds=round(seconds, 3))
    return result


def _record_balloon(agent: Agent, vm_id: str, actual: int) -> None:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is not None:
            vm.stats = {**(vm.stats or {}), "balloon_bytes": actual}
    agent.store.notifier.notify()


# -- CPUs -------------------------------------------------------------------------------------------------------


async def _guest_vcpus(agent: Agent, running: RunningVM) -> list[dict[str, Any]]:
    socket_path = running.proc.record.guest_agent_socket
    if socket_path is None:
        raise Conflict("this VM has no guest agent channel to bring CPUs online", "restart it to apply the change")
    async with agent.guest_locks[running.vm_id], GuestAgent(socket_path) as guest:
        return list(await guest.call("guest-get-vcpus"))


async def _set_guest_vcpus(agent: Agent, running: RunningVM, changes: list[dict[str, Any]]) -> None:
    socket_path = running.proc.record.guest_agent_socket
    assert socket_path is not None
    async with agent.guest_locks[running.vm_id], GuestAgent(socket_path) as guest:
        await guest.call("guest-set-vcpus", {"vcpus": changes}, timeout=30.0)


async def _resize_cpus(ctx: JobContext, running: RunningVM, new: VMSpec) -> dict[str, Any]:
    """Plug vCPUs into free slots (`device_add` of the type query-hotpluggable-cpus lists), then have the guest
    agent bring the first ``cpus`` online and take the rest offline. Offlined vCPUs stay plugged (idle, and held
    to the new quota by the cgroup) until the next start, which boots with exactly ``cpus``."""
    agent = ctx.agent
    slots = await running.proc.execute("query-hotpluggable-cpus")
    result: dict[str, Any] = {"cpu_slots": len(slots)}
    target = min(new.cpus, len(slots))
    if new.cpus > len(slots):
        result["cpus_restart_needed"] = True
        result["note"] = (
            f"the guest has {len(slots)} CPU slots: {target} CPUs now, {new.cpus} at the next start "
            "(create with --max-cpus to grow live)"
        )
    plugged = [slot for slot in slots if slot.get("qom-path")]
    free = sorted(
        (slot for slot in slots if not slot.get("qom-path")), key=lambda slot: tuple(sorted(slot["props"].items()))
    )
    began = time.monotonic()
    for slot in free[: max(0, target - len(plugged))]:
        ctx.progress(0.2, f"plugging vCPU {len(plugged)}")
        props = dict(slot["props"])
        cpu_id = "cpu" + "-".join(str(props[key]) for key in sorted(props))
        await running.proc.execute("device_add", {"driver": slot["type"], "id": cpu_id, **props})
        plugged.append(slot)
    ctx.progress(0.4, f"waiting for the guest to bring {target} CPUs online")
    await vm_lifecycle.wait_ready(running, vm_lifecycle.READY_TIMEOUT)
    online = 0
    while True:
        vcpus = await _guest_vcpus(agent, running)
        changes = [
            {"logical-id": cpu["logical-id"], "online": cpu["logical-id"] < target}
            for cpu in vcpus
            if cpu["online"] != (cpu["logical-id"] < target) and (cpu["logical-id"] < target or cpu["can-offline"])
        ]
        online = sum(1 for cpu in vcpus if cpu["online"])
        if not changes and online == target:
            break
        if time.monotonic() - began > CPU_ONLINE_TIMEOUT:
            raise Timeout(
                f"the guest has {online} CPUs online, not {target}, after {CPU_ONLINE_TIMEOUT:.0f} s",
                "the guest OS needs CPU hotplug support; the change applies at the next start",
            )
        if changes:
            with contextlib.suppress(CorralError):  # a vCPU still coming up refuses; the next round retries
                await _set_guest_vcpus(agent, running, changes)
        ctx.progress(
            0.4 + 0.5 * min(1.0, (time.monotonic() - began) / 30.0), f"{online} of {target} CPUs online in the guest"
        )
        await asyncio.sleep(0.5)
    result.update(cpus_online=online, cpu_seconds=round(time.monotonic() - began, 3))
    return result


async def refuse_hotplugged_cpus(running: RunningVM | None, what: str) -> None:
    """A fork or a migration starts the other QEMU from the spec with every vCPU on -smp; a source with vCPUs
    hot-plugged by `vm set` does not match that (the fork child was OOM-killed in tests), so both are refused
    until a restart has made the plugged vCPUs boot-time ones."""
    if running is None or running.proc.exited:
        return
    slots = await running.proc.execute("query-hotpluggable-cpus")
    if any(str(slot.get("qom-path", "")).startswith("/machine/peripheral/") for slot in slots):
        raise Conflict(
            f"this VM has vCPUs hot-plugged since it started, which a {what} cannot carry yet",
            "restart the VM first (`corral vm restart NAME`); it boots with the same CPUs",
        )


# -- vm.resize --------------------------------------------------------------------------------------------------


async def vm_resize(ctx: JobContext) -> dict[str, Any]:
    """Make the running QEMU, the guest and the cgroup follow the spec the control plane wrote."""
    agent, vm_id = ctx.agent, ctx.vm_id()
    old = VMSpec.model_validate(ctx.params_as(VMResizeParams).old)
    async with agent.vm_locks[vm_id]:
        new = VMSpec.model_validate(vm_lifecycle.load_vm(agent, vm_id).spec)
        running = _running(agent, vm_id)
        result: dict[str, Any] = {"live": running is not None, "memory": new.memory, "cpus": new.cpus}
        if running is None:
            return {**result, "note": "the VM is not running: the change applies at its next start"}
        notes, warnings = [], []
        if new.memory != old.memory or new.max_memory != old.max_memory:
            part = await _resize_memory(ctx, running, old, new)
            notes.append(part.pop("note", None))
            warnings.append(part.pop("warning", None))
            result.update(part)
        if new.cpus != old.cpus:
            part = await _resize_cpus(ctx, running, new)
            notes.append(part.pop("note", None))
            result.update(part)
        if (new.cpus, new.cpu_limit, new.cpu_weight) != (old.cpus, old.cpu_limit, old.cpu_weight):
            ctx.progress(0.95, "updating the CPU quota")
            warnings.append(await _set_limits(agent, vm_id, _limits(agent, new)))
        if new.max_cpus != old.max_cpus and new.boot_max_cpus != len(
            await running.proc.execute("query-hotpluggable-cpus")
        ):
            notes.append(f"max CPUs {new.boot_max_cpus} applies at the next start")
        if new.max_memory != old.max_memory and new.boot_memory != await _boot_memory(running):
            notes.append(f"max memory {format_size(new.boot_memory)} applies at the next start")
    result["restart_needed"] = bool(
        result.get("memory_restart_needed")
        or result.get("cpus_restart_needed")
        or any(note and "next start" in note for note in notes)
    )
    result["notes"] = [note for note in notes if note]
    result["warnings"] = [warning for warning in warnings if warning]
    return result


# -- disks ------------------------------------------------------------------------------------------------------


def _backing_chain(path: Path, binary: str) -> list[Path]:
    chain: list[Path] = []
    facts = qemu_img.info(path, binary)
    backing = facts.get("full-backing-filename") or facts.get("backing-filename")
    while backing:
        chain.append(Path(backing))
        facts = qemu_img.info(Path(backing), binary)
        backing = facts.get("full-backing-filename") or facts.get("backing-filename")
    return chain


def _give_to_vm(agent: Agent, vm_id: str, path: Path) -> None:
    """QEMU has dropped root by now: the file (and any base under it) must be readable by the VM's uid before
    blockdev-add opens it, as host/isolation.py arranges for the disks it starts with."""
    uid, gid = agent.isolation.vm_uid(vm_id), agent.isolation.gid
    if uid is None or gid is None:
        return
    sandbox.prepare_paths([path], _backing_chain(path, agent.settings.qemu_img_binary), uid, gid)


def _return_to_root(path: Path) -> None:
    """A detached disk goes back to root, as `vm delete --keep-disks` leaves them: another VM may get it."""
    with contextlib.suppress(OSError):
        os.chown(path, 0, 0)
        os.chmod(path, 0o600)


def _disk_plan(agent: Agent, volume: Volume) -> DiskPlan:
    index = volume.device_index
    on_q35 = agent.settings.machine.startswith("q35")
    return DiskPlan(
        node=vm_plan.disk_node(index),
        path=storage.volume_path(agent, volume),
        format=volume.format,
        bus=vm_plan.disk_port(index) if on_q35 and 0 < index <= MAX_DISKS else None,
    )


def _clean(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


async def _hotplug_disk(agent: Agent, vm_id: str, running: RunningVM, plan: DiskPlan) -> None:
    added: list[str] = []
    try:
        for node in disk_blockdev_options(plan):
            await running.proc.execute("blockdev-add", _clean(node))
            added.append(str(node["node-name"]))
        await running.proc.execute("device_add", _clean(disk_device_options(plan)))
    except BaseException:
        for node_name in reversed(added):
            with contextlib.suppress(Exception):
                await running.proc.execute("blockdev-del", {"node-name": node_name})
        raise
    await throttle_disk(running.proc, plan.node, VMSpec.model_validate(vm_lifecycle.load_vm(agent, vm_id).spec))


async def vm_disk_add(ctx: JobContext) -> dict[str, Any]:
    """Make the volume's file if it is new, then plug it into the running guest on its own root port. On any
    failure the VM is as before: a new volume is deleted, an existing one is free again."""
    agent, vm_id, params = ctx.agent, ctx.vm_id(), ctx.params_as(DiskAddParams)
    volume_id, created = params.volume_id, params.created
    async with agent.vm_locks[vm_id]:
        with agent.store.session() as session:
            volume = session.get(Volume, volume_id)
            if volume is None:
                raise NotFound(f"volume {params.volume} no longer exists")
            session.expunge(volume)
        path = storage.volume_path(agent, volume)
        made = False
        try:
            if created:
                ctx.progress(0.1, f"creating {volume.name}")
                await storage.materialize(agent, volume, None)
                made = True
                with agent.store.session() as session:
                    row = session.get(Volume, volume_id)
                    if row is not None:  # deleted meanwhile: nothing to mark
                        row.state = "ready"
            running = _running(agent, vm_id)
            if running is None:
                return {"volume": volume.name, "hotplugged": False, "device_index": volume.device_index}
            ctx.progress(0.5, f"plugging {volume.name} into the running guest")
            began = time.monotonic()
            await asyncio.to_thread(_give_to_vm, agent, vm_id, path)
            plan = _disk_plan(agent, volume)
            await _hotplug_disk(agent, vm_id, running, plan)
            seconds = time.monotonic() - began
        except BaseException:
            with agent.store.session() as session:
                row = session.get(Volume, volume_id)
                if row is not None and created:
                    if made:
                        storage.remove(agent, row)
                    session.delete(row)
                elif row is not None:
                    row.vm_id, row.device_index = None, 0
            if not created:
                await asyncio.to_thread(_return_to_root, path)
            agent.store.notifier.notify()
            raise
    agent.store.notifier.notify()
    return {
        "volume": volume.name,
        "hotplugged": True,
        "device_index": volume.device_index,
        "node": plan.node,
        "size": volume.size,
        "seconds": round(seconds, 3),
    }


async def vm_disk_remove(ctx: JobContext) -> dict[str, Any]:
    """Ask the guest to release the disk (PCIe hot-unplug needs its consent), drop its block nodes, and free the
    volume. A guest that does not let go keeps the disk, and the error says so."""
    agent, vm_id, params = ctx.agent, ctx.vm_id(), ctx.params_as(DiskRemoveParams)
    volume_id = params.volume_id
    async with agent.vm_locks[vm_id]:
        with agent.store.session() as session:
            volume = session.get(Volume, volume_id)
            if volume is None or volume.vm_id != vm_id:
                raise NotFound(f"volume {params.volume} is not attached to VM {ctx.target_name}")
            session.expunge(volume)
        running = _running(agent, vm_id)
        seconds = None
        if running is not None:
            node = vm_plan.disk_node(volume.device_index)
            device_id = f"{node}-dev"
            ctx.progress(0.3, f"asking the guest to release {volume.name}")
            began = time.monotonic()
            with running.proc.listener("DEVICE_DELETED") as listener:
                try:
                    await running.proc.execute("device_del", {"id": device_id})
                except EngineError as exc:
                    if "not found" not in exc.message.lower():
                        raise
                else:
                    try:
                        async with asyncio.timeout(DISK_RELEASE_TIMEOUT):
                            while (await listener.get()).get("data", {}).get("device") != device_id:
                                pass
                    except TimeoutError as exc:
                        raise Conflict(
                            f"the guest did not release {volume.name} within {DISK_RELEASE_TIMEOUT:.0f} s",
                            "unmount it in the guest (it needs PCIe hotplug support); or stop the VM and remove it",
                        ) from exc
            for node_name in (node, f"{node}-file"):
                with contextlib.suppress(EngineError):
                    await running.proc.execute("blockdev-del", {"node-name": node_name})
            seconds = round(time.monotonic() - began, 3)
        with agent.store.session() as session:
            row = session.get(Volume, volume_id)
            if row is not None:
                row.vm_id, row.device_index = None, 0
        await asyncio.to_thread(_return_to_root, storage.volume_path(agent, volume))
    agent.store.notifier.notify()
    return {"volume": volume.name, "hotplugged": running is not None, "seconds": seconds}
