"""The fork job: pause the parent as briefly as possible, then start its children from its state."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine import fork as engine_fork
from corral.engine.guest_agent import GuestAgent
from corral.errors import Conflict, CorralError, NotFound
from corral.host import resize_jobs, storage, vm_lifecycle, vm_plan
from corral.spec.job_params import VMForkParams
from corral.spec.vm import USER_NETWORK, VMSpec
from corral.store.models import VM, Volume

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from corral.engine.process import QemuProcess
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext


# Renewals left running by `vm fork --no-wait` (a task nobody holds may be collected before it ends).
_renewing: set[asyncio.Task[None]] = set()


def _vm(agent: Agent, vm_id: str) -> VM:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            raise NotFound("a VM of this fork no longer exists")
        vm.volumes  # noqa: B018
        return vm


DHCP_SCRIPT = "/usr/share/udhcpc/default.script"


def renew_identity_script(
    name: str, vm_id: str, macs: list[str], keep_addresses: bool = False, lease_needed: list[bool] | None = None
) -> str:
    """What a child runs through its guest agent: it is a new machine now (hostname, machine id, MACs,
    DHCP lease, entropy). Written for any Linux with a POSIX shell and iproute2 or busybox.

    Measured on the tiny image under TCG, the first version took 0.4-0.9 s, most of it taking each link down
    and up and waiting for a one-shot ``udhcpc -q``: now a MAC changes live (virtio-net supports it; a driver
    that refuses still gets the down/up), and each NIC's DHCP client restarts at once, all NICs in parallel,
    the script ending when every NIC has its lease (``udhcpc -b`` goes on renewing it in the background, as
    the one the guest started at boot did; a NIC without a DHCP server gives up after ~2 s). ``lease_needed``
    (per NIC, default all): a NIC on QEMU's user network keeps its address in the child's own user network, so
    the script does not wait for its lease (~0.3 s of the renewal on TCG, where a fork's first moments run
    untranslated guest code).

    ``keep_addresses`` (an isolated copy, whose networks have no DHCP server): MACs and addresses stay as they
    are, and the DHCP clients stop, so a lease running out never takes an address away."""
    quoted = shlex.quote(name)
    lines = [
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH",  # qemu-ga passes on a minimal PATH, if any
        f"hostname {quoted}",
        f"echo {quoted} > /etc/hostname",
        f"printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t%s\\n' {quoted} > /etc/hosts",
        f"echo {vm_id} > /etc/machine-id",
        f"echo {vm_id}{time.time_ns()} > /dev/urandom",
        # The parent's DHCP clients go (they hold its MACs; the first version's `pkill` was not in the tiny
        # image, so they stayed): a loop of shell builtins over /proc, which forks nothing.
        "for f in /proc/[0-9]*/comm; do read -r c < $f 2>/dev/null || continue; case $c in udhcpc | dhclient) "
        "p=${f#/proc/}; kill ${p%/comm} ;; esac; done 2>/dev/null",
    ]
    for index, mac in enumerate([] if keep_addresses else macs):
        iface = f"eth{index}"
        if mac:
            lines.append(
                f"if [ -e /sys/class/net/{iface} ]; then ip link set {iface} address {mac} 2>/dev/null || "
                f"{{ ip link set {iface} down; ip link set {iface} address {mac}; ip link set {iface} up; }}; fi"
            )
        client = (
            f"{{ if command -v udhcpc >/dev/null; then udhcpc -b -t 2 -T 1 -i {iface} -s {DHCP_SCRIPT} "
            f"-x hostname:{quoted}; else dhclient -r {iface}; dhclient {iface}; fi; }} >/dev/null 2>&1 &"
        )
        waited = lease_needed is None or index >= len(lease_needed) or lease_needed[index]
        lines.append(f"if [ -e /sys/class/net/{iface} ]; then {client if waited else f'( {client} )'} fi")
    lines.append("wait")
    return "\n".join(lines)


async def fork(ctx: JobContext) -> dict[str, Any]:
    agent = ctx.agent
    parent_id = ctx.vm_id()
    params = ctx.params_as(VMForkParams)
    child_ids, wait, keep = list(params.child_ids), params.wait, params.keep_addresses
    running = agent.vms.get(parent_id)
    if running is None or running.proc.exited:
        raise Conflict(f"VM {ctx.target_name} is not running", "a fork copies a running VM; start it first")
    parent = _vm(agent, parent_id)
    # A parent with its RAM in a shared file takes the fast path (device state only, a frozen copy of the file);
    # any other (plain RAM, or a fork's private mapping) writes its RAM into the state file (engine/fork.py).
    backing, parent_ram = engine_fork.ram_backing(running.proc.record.argv)
    fast = backing == "shared" and parent_ram is not None
    work = agent.layout.vm_run_dir(parent_id) / f"fork-{ctx.job_id[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    frozen_ram = agent.layout.ram_file(ctx.job_id)
    state = work / "state" if fast else frozen_ram.with_suffix(".state")  # a full state is RAM: tmpfs too
    children = {child_id: _vm(agent, child_id) for child_id in child_ids}
    started: list[str] = []
    renewals: list[asyncio.Task[None]] = []
    made: set[str] = set()  # the children's disk files this job created (and may remove)
    timings: dict[str, float] = {}
    try:
        await resize_jobs.refuse_hotplugged_cpus(running, "fork")  # inside: a refusal removes the children's rows
        for child in children.values():  # claimed before the pause: it costs the parent nothing
            for volume in child.volumes:
                storage.claim(storage.volume_path(agent, volume), f"volume {volume.name}")
                made.add(volume.id)
        async with agent.vm_locks[parent_id]:
            ctx.progress(0.05, "pausing the parent")
            paused_at = time.monotonic()
            # A warm template waits paused (it costs no CPU): it stays paused; a running parent resumes.
            was_running = await running.proc.run_state() == "running"
            await running.proc.pause()
            try:
                await engine_fork.save_device_state(running.proc, state, with_ram=not fast)
                timings["save_ms"] = (time.monotonic() - paused_at) * 1000
                if fast:
                    assert parent_ram is not None
                    await asyncio.to_thread(engine_fork.freeze_copy, parent_ram, frozen_ram)
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
                # After a migration QEMU holds the source in "postmigrate" and refuses the next migration from
                # there: the only way out is to run it. A warm template runs for the ~2 ms of cont + stop.
                await running.proc.resume()
                if not was_running:
                    await running.proc.pause()
            pause_ms = (time.monotonic() - paused_at) * 1000
        with agent.store.session() as session:
            for child in children.values():
                for volume in child.volumes:
                    row = session.get(Volume, volume.id)
                    if row is None:
                        raise NotFound(f"volume {volume.name} no longer exists")
                    row.state = "ready"
        ctx.progress(0.4, f"parent resumed after {pause_ms:.0f} ms; starting children")
        ready_ms: list[float] = []
        launched_all = time.monotonic()
        for child_id, child in children.items():
            async with agent.vm_locks[child_id]:
                plan = vm_plan.build_plan(agent, child).model_copy(
                    update={"incoming": True, **_child_ram(agent, child_id, backing, frozen_ram)}
                )
                launched_at = time.monotonic()
                await vm_lifecycle.launch(
                    agent, child_id, plan, after_launch=_take_state(agent, child, state, fast, keep, renewals)
                )
                ready_ms.append((time.monotonic() - launched_at) * 1000)
                started.append(child_id)
        # The children map the frozen RAM privately (or loaded their own copy): the files can go now.
        frozen_ram.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
        if wait:
            ctx.progress(0.8, "renewing the children's identity")
            await asyncio.gather(*renewals)
            timings["usable_ms"] = (time.monotonic() - launched_all) * 1000
        else:  # --no-wait: the job ends with the children running; they take their identity meanwhile
            for task in renewals:
                _renewing.add(task)
                task.add_done_callback(_renewing.discard)
    except BaseException:
        from corral.host.vm_lifecycle import discard_vm

        for task in renewals:
            task.cancel()
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
        "path": "shared-ram" if fast else "full-state",
        "parent_pause_ms": pause_ms,
        "child_ready_ms": max(ready_ms),
        "child_ready_ms_each": ready_ms,
        "waited_for_identity": wait,
        **timings,
    }


def _child_ram(agent: Agent, child_id: str, backing: str, frozen_ram: Path) -> dict[str, Any]:
    """A child's RAM must have the parent's RAM block names: a private mapping of the frozen file (fast path),
    plain RAM (a plain parent), or, under a parent that is itself a fork, a shared file of its own, which makes
    the child a fast-path parent in turn."""
    if backing == "shared":
        return {"ram_file": frozen_ram, "ram_shared": False}
    if backing == "private":
        return {"ram_file": agent.layout.ram_file(child_id), "ram_shared": True}
    return {"ram_file": None}


def _take_state(
    agent: Agent, child: VM, state: Path, fast: bool, keep_addresses: bool, renewals: list[asyncio.Task[None]]
) -> Callable[[QemuProcess], Awaitable[None]]:
    """The child's ``after_launch``: load the parent's state, then start renewing its identity at once. The
    renewal's connection is the guest agent's first, before the VM's watchers open theirs (QEMU serves one
    at a time), so the request waits in the channel for the guest to read it rather than behind a sync."""

    async def take(proc: QemuProcess) -> None:
        await engine_fork.load_device_state(proc, state, with_ram=not fast)
        socket_path = proc.record.guest_agent_socket
        if socket_path is not None:
            renewals.append(asyncio.get_running_loop().create_task(_renew(agent, child, socket_path, keep_addresses)))

    return take


async def _renew(agent: Agent, child: VM, socket_path: Path, keep_addresses: bool) -> None:
    """Tell the child it is a new machine; a guest without an agent keeps the parent's identity (logged)."""
    spec = VMSpec.model_validate(child.spec)
    macs = [nic.mac or "" for nic in spec.nics]
    leases = [nic.network != USER_NETWORK for nic in spec.nics]
    script = renew_identity_script(child.name, child.id, macs, keep_addresses, leases)
    try:
        async with agent.guest_locks[child.id], GuestAgent(socket_path) as guest:
            code = await _run(guest, script, timeout=30)
        status = "identity renewed" if code == 0 else f"identity renewal exited {code}"
    except (CorralError, TimeoutError, OSError) as exc:
        status = f"identity renewal failed: {exc}"
    with contextlib.suppress(Exception):  # a child discarded meanwhile has no row to note it in
        vm_lifecycle.update_vm(agent, child.id, status_message=f"forked; {status}")


async def _run(guest: GuestAgent, script: str, timeout: float) -> int | None:
    """``sh -c script`` in the guest, its exit code. qemu-ga has no completion event, so its status is polled,
    every 10 ms (a poll is two round trips, ~15 ms under TCG): GuestAgent.exec backs off to 200 ms for long
    commands, which cost a renewal up to that much after the script ended."""
    started = await guest.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script]})
    deadline = time.monotonic() + timeout
    while True:
        status = await guest.call("guest-exec-status", {"pid": started["pid"]})
        if status.get("exited"):
            return status.get("exitcode")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the identity renewal did not finish within {timeout:.0f} s")
        await asyncio.sleep(0.01)
