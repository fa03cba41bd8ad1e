"""The fork job: pause the parent as briefly as possible, then start its children from its state."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from typing import TYPE_CHECKING, Any

from corral.engine import fork as engine_fork
from corral.engine.guest_agent import GuestAgent
from corral.errors import Conflict, CorralError, NotFound
from corral.host import resize_jobs, storage, vm_lifecycle
from corral.spec.vm import VMSpec
from corral.store.models import VM, Volume

if TYPE_CHECKING:
    from corral.host.agent import Agent, JobContext


def _vm(agent: Agent, vm_id: str) -> VM:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            raise NotFound("a VM of this fork no longer exists")
        vm.volumes  # noqa: B018
        return vm


def renew_identity_script(name: str, vm_id: str, macs: list[str]) -> str:
    """What a child runs through its guest agent: it is a new machine now (hostname, machine id, MACs,
    DHCP lease, entropy). Written for any Linux with a POSIX shell and iproute2 or busybox."""
    lines = [
        f"hostname {shlex.quote(name)}",
        f"echo {shlex.quote(name)} > /etc/hostname",
        f"echo {vm_id} > /etc/machine-id",
        "head -c 64 /dev/urandom > /dev/null",
        f"echo {vm_id}{time.time_ns()} > /dev/urandom",
    ]
    for index, mac in enumerate(macs):
        iface = f"eth{index}"
        lines += [
            f"if [ -e /sys/class/net/{iface} ]; then ip link set {iface} down; "
            f"ip link set {iface} address {mac}; ip link set {iface} up; fi",
        ]
    lines.append(
        "(pkill udhcpc; udhcpc -b -q -i eth0 -s /usr/share/udhcpc/default.script) >/dev/null 2>&1 "
        "|| dhclient -r eth0 >/dev/null 2>&1; dhclient eth0 >/dev/null 2>&1 || true"
    )
    return "\n".join(lines)


async def fork(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    parent_id = ctx.target_id
    child_ids: list[str] = list(ctx.params["child_ids"])
    running = agent.vms.get(parent_id)
    if running is None or running.proc.exited:
        raise Conflict(f"VM {ctx.target_name} is not running", "a fork copies a running VM; start it first")
    parent = _vm(agent, parent_id)
    if not VMSpec.model_validate(parent.spec).forkable:
        raise Conflict(f"VM {ctx.target_name} was not started forkable", "create it with --forkable")
    work = agent.layout.vm_run_dir(parent_id) / f"fork-{ctx.job_id[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    state = work / "state"
    frozen_ram = agent.layout.ram_file(ctx.job_id)
    children = {child_id: _vm(agent, child_id) for child_id in child_ids}
    started: list[str] = []
    made: set[str] = set()  # the children's disk files this job created (and may remove)
    try:
        await resize_jobs.refuse_hotplugged_cpus(running, "fork")  # inside: a refusal removes the children's rows
        for child in children.values():  # claimed before the pause: it costs the parent nothing
            for volume in child.volumes:
                storage.claim(storage.volume_path(agent, volume), f"volume {volume.name}")
                made.add(volume.id)
        async with agent.vm_locks[parent_id]:
            ctx.progress(0.05, "pausing the parent")
            paused_at = time.monotonic()
            await running.proc.pause()
            try:
                await engine_fork.save_device_state(running.proc, state)
                await asyncio.to_thread(engine_fork.freeze_copy, agent.layout.ram_file(parent_id), frozen_ram)
                parent_disks = sorted(parent.volumes, key=lambda v: v.device_index)
                for child in children.values():
                    for source, target in zip(
                        parent_disks, sorted(child.volumes, key=lambda v: v.device_index), strict=True
                    ):
                        await asyncio.to_thread(
                            engine_fork.freeze_copy,
                            storage.volume_path(agent, source),
                            storage.volume_path(agent, target),
                        )
            finally:
                await running.proc.resume()
            pause_ms = (time.monotonic() - paused_at) * 1000
        with agent.store.session() as session:
            for child in children.values():
                for volume in child.volumes:
                    session.get(Volume, volume.id).state = "ready"
        ctx.progress(0.4, f"parent resumed after {pause_ms:.0f} ms; starting children")
        ready_ms: list[float] = []
        for child_id, child in children.items():
            async with agent.vm_locks[child_id]:
                plan = vm_lifecycle.build_plan(agent, child).model_copy(
                    update={"ram_file": frozen_ram, "ram_shared": False, "incoming": True}
                )
                launched_at = time.monotonic()
                await vm_lifecycle.launch(
                    agent, child_id, plan, after_launch=lambda proc: engine_fork.load_device_state(proc, state)
                )
                ready_ms.append((time.monotonic() - launched_at) * 1000)
                started.append(child_id)
        # The children map the frozen RAM privately: the file can go now, its pages stay while they are mapped.
        frozen_ram.unlink(missing_ok=True)
        ctx.progress(0.8, "renewing the children's identity")
        for child_id, child in children.items():
            await _renew(agent, child_id, child)
    except BaseException:
        from corral.host.handlers import discard_vm

        frozen_ram.unlink(missing_ok=True)
        for child_id in child_ids:
            with contextlib.suppress(Exception):
                await discard_vm(ctx, child_id, {v.id for v in children[child_id].volumes} & made)
        raise
    finally:
        state.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            work.rmdir()
    return {
        "children": [children[c].name for c in child_ids],
        "parent_pause_ms": pause_ms,
        "child_ready_ms": max(ready_ms),
        "child_ready_ms_each": ready_ms,
    }


async def _renew(agent: Agent, child_id: str, child: VM) -> None:
    """Tell the child it is a new machine; a guest without an agent keeps the parent's identity (logged)."""
    running = agent.vms.get(child_id)
    if running is None or running.proc.record.guest_agent_socket is None:
        return
    spec = VMSpec.model_validate(child.spec)
    script = renew_identity_script(child.name, child.id, [nic.mac or "" for nic in spec.nics])
    try:
        async with agent.guest_locks[child_id], GuestAgent(running.proc.record.guest_agent_socket) as guest:
            result = await guest.exec(["/bin/sh", "-c", script], timeout=30)
        status = "identity renewed" if result.exit_code == 0 else f"identity renewal exited {result.exit_code}"
    except (CorralError, TimeoutError, OSError) as exc:
        status = f"identity renewal failed: {exc}"
    vm_lifecycle.update_vm(agent, child_id, status_message=f"forked; {status}")
