"""Job handlers for networks, NIC hot-plug and port forwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from corral.engine.argv import netdev_options, nic_device_options
from corral.errors import Conflict, CorralError, EngineError, NotFound
from corral.host import vm_lifecycle, vm_nics
from corral.hostports import hold_port
from corral.spec.job_params import NicParams, PortForwardParams
from corral.spec.vm import VMSpec
from corral.store import network_queries
from corral.store.models import VM, Network, PortForward

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext
    from corral.host.vm_lifecycle import RunningVM

log = logging.getLogger("corral.agent")
NIC_RELEASE_TIMEOUT = 20.0


def _network(ctx: JobContext) -> Network:
    with ctx.agent.store.reading() as session:
        network = session.get(Network, ctx.target_id) if ctx.target_id else None
        if network is None:
            raise NotFound(f"network {ctx.target_name} not found")
        session.expunge(network)
        return network


async def network_create(ctx: JobContext) -> dict[str, Any]:
    """Make the bridge and DHCP server now, so a mistake (a missing uplink, a clashing subnet) is reported to
    the user who asked, and nothing of the failed network stays behind."""
    agent = ctx.agent
    ctx.progress(0.2, "making the bridge and DHCP server")
    network = _network(ctx)
    try:
        # Directly, not only through sync: sync leaves a bridge-mode network whose uplink is missing to hosts
        # that have it, while this job is where the user learns the uplink they named is not there.
        await asyncio.to_thread(agent.networks.ensure, network, [])
    except CorralError:
        await _remove(ctx, network)
        raise
    await asyncio.to_thread(agent.networks.sync)
    # Report this host's bridges now rather than at the next heartbeat: placement sends VMs on a bridge-mode
    # network only to hosts known to have its uplink.
    await asyncio.to_thread(agent.heartbeat)
    network = _network(ctx)
    if network.state != "ready":
        message = network.status_message or f"network {network.name} could not be made on {agent.host_name}"
        await _remove(ctx, network)
        raise EngineError(message)
    return {"network": network.name, "bridge": network.bridge, "subnet": network.subnet, "gateway": network.gateway}


async def network_delete(ctx: JobContext) -> dict[str, Any]:
    network = _network(ctx)
    ctx.progress(0.3, "stopping DHCP and removing the bridge")
    await _remove(ctx, network)
    return {"network": network.name}


async def _remove(ctx: JobContext, network: Network) -> None:
    """Take the network down on this host, drop its row, and reload the firewall without it."""
    agent = ctx.agent
    await asyncio.to_thread(agent.networks.teardown, network.id)
    with agent.store.session() as session:
        row = session.get(Network, network.id)
        if row is not None:
            session.delete(row)
    await asyncio.to_thread(agent.networks.sync)
    agent.store.notifier.notify()


def check_forwards_free(agent: Agent, vm: VM) -> None:
    """The destination of a live move: the VM's forwarded host ports must be free here, since its forwards follow
    it (this host's agent holds them once the move commits; QEMU binds a user-mode NIC's own). Refused before any
    byte moves, rather than a forward that silently stops working after the move."""
    with agent.store.reading() as session:
        forwards = [(fwd.protocol, fwd.host_port) for fwd in network_queries.forwards_of(session, vm.id)]
    for protocol, port in forwards:
        if port not in agent.settings.forward_ports:
            continue  # outside the administrator's range: it has no rule on any host
        try:
            if agent.networks.holding(protocol, port):  # for another VM's forward here: the VM is not here yet
                raise Conflict(f"host port {port}/{protocol} is forwarded on this host already")
            for sock in hold_port(protocol, port):
                sock.close()
        except Conflict as exc:
            raise Conflict(
                f"VM {vm.name} forwards host port {port}/{protocol}, which is in use on host {agent.host_name}",
                f"move it to another host, or remove the forward: `corral vm port-forward {vm.name} --remove {port}`",
            ) from exc


def _vm(ctx: JobContext) -> VM:
    return vm_lifecycle.load_vm(ctx.agent, ctx.vm_id())


def _running(ctx: JobContext) -> RunningVM | None:
    running = ctx.agent.vms.get(ctx.target_id or "")
    return running if running is not None and not running.proc.exited else None


async def vm_nic_add(ctx: JobContext) -> dict[str, Any]:
    """Plug the NIC into the running guest (a TAP, a netdev, a virtio-net device on the NIC's own port); a
    stopped VM just gets it at its next start. On failure the NIC is taken out of the VM again."""
    agent, slot = ctx.agent, ctx.params_as(NicParams).slot
    async with agent.vm_locks[ctx.vm_id()]:
        vm = _vm(ctx)
        running = _running(ctx)
        if running is None:
            return {"slot": slot, "hotplugged": False}
        spec = VMSpec.model_validate(vm.spec)
        plan = next(nic for nic in vm_nics.nic_plans(agent, vm, spec) if nic.id == f"net{slot}")
        try:
            ctx.progress(0.3, "plugging the NIC into the running guest")
            if plan.mode == "tap":
                await asyncio.to_thread(agent.networks.sync)
                if plan.bridge is None or plan.ifname is None:  # a tap has an ifname; the bridge is its network's
                    raise NotFound(
                        f"the network of NIC {plan.id} is gone", "remove the NIC or create the network again"
                    )
                await asyncio.to_thread(agent.networks.plug, plan.ifname, plan.bridge, agent.isolation.vm_uid(vm.id))
                taps = vm_nics.taps_file(agent, vm.id)
                taps.parent.mkdir(parents=True, exist_ok=True)
                with taps.open("a") as file:
                    file.write(f"{plan.ifname}\n")
            netdev = {k: v for k, v in netdev_options(plan).items() if v is not None}
            if plan.mode == "tap":
                # QEMU runs unprivileged by now: it gets the TAP as an open descriptor instead of a name.
                assert plan.ifname is not None  # checked when it was plugged, above
                fd = await asyncio.to_thread(agent.networks.open_tap, plan.ifname)
                try:
                    await running.proc.pass_fd(f"{plan.id}-fd", fd)
                finally:
                    os.close(fd)
                for key in ("ifname", "script", "downscript"):
                    netdev.pop(key, None)
                netdev["fd"] = f"{plan.id}-fd"
            if plan.forwards:
                netdev["hostfwd"] = [{"str": forward} for forward in plan.forwards]
            await running.proc.execute("netdev_add", netdev)
            device = {k: v for k, v in nic_device_options(plan).items() if v is not None}
            try:
                await running.proc.execute("device_add", device)
            except Exception:
                with contextlib.suppress(Exception):
                    await running.proc.execute("netdev_del", {"id": plan.id})
                raise
        except Exception:
            if plan.ifname:
                await asyncio.to_thread(agent.networks.unplug, plan.ifname)
            with agent.store.session() as session:
                row = session.get(VM, vm.id)
                if row is not None:
                    network_queries.detach_nic(session, row, slot)
            raise
    await asyncio.to_thread(agent.networks.sync)
    return {"slot": slot, "hotplugged": True, "mac": plan.mac}


async def vm_nic_remove(ctx: JobContext) -> dict[str, Any]:
    """Ask the guest to release the device (PCIe hot-unplug needs its consent), then drop netdev and TAP."""
    agent, slot = ctx.agent, ctx.params_as(NicParams).slot
    async with agent.vm_locks[ctx.vm_id()]:
        vm = _vm(ctx)
        running = _running(ctx)
        spec = VMSpec.model_validate(vm.spec)
        plans = {nic.id: nic for nic in vm_nics.nic_plans(agent, vm, spec)}
        plan = plans.get(f"net{slot}")
        if running is not None and plan is not None:
            device_id = f"net{slot}-dev"
            ctx.progress(0.3, "asking the guest to release the NIC")
            with running.proc.listener("DEVICE_DELETED") as listener:
                await running.proc.execute("device_del", {"id": device_id})
                try:
                    async with asyncio.timeout(NIC_RELEASE_TIMEOUT):
                        while True:
                            event = await listener.get()
                            if event.get("data", {}).get("device") == device_id:
                                break
                except TimeoutError as exc:
                    raise Conflict(
                        f"the guest did not release NIC {slot} within {NIC_RELEASE_TIMEOUT:.0f} s",
                        "the guest OS needs PCIe hotplug support; or stop the VM and remove it",
                    ) from exc
            with contextlib.suppress(Exception):
                await running.proc.execute("netdev_del", {"id": plan.id})
        if plan is not None and plan.ifname:
            await asyncio.to_thread(agent.networks.unplug, plan.ifname)
        with agent.store.session() as session:
            row = session.get(VM, vm.id)
            if row is not None:
                network_queries.detach_nic(session, row, slot)
    await asyncio.to_thread(agent.networks.sync)
    agent.store.notifier.notify()
    return {"slot": slot, "hotplugged": running is not None}


async def vm_port_forward(ctx: JobContext) -> dict[str, Any]:
    """NAT networks: the firewall's DNAT rules follow the store, for ports the agent could hold (a port some host
    program has is refused here, whoever holds it). User-mode NICs: QEMU's hostfwd, changed live through the human
    monitor (QMP has no command for it) and rebuilt from the store at every start; QEMU binds the port itself, so
    it can never take over a port a host program holds."""
    agent = ctx.agent
    vm = _vm(ctx)
    params = ctx.params_as(PortForwardParams)
    added, removed = params.add, params.remove
    with agent.store.reading() as session:
        forward = session.get(PortForward, added) if added else None
        if forward is not None:
            session.expunge(forward)
        taps = {port.nic_index for port in network_queries.ports_of(session, vm.id)}
    target = forward
    if target is not None:
        slot = target.nic_index
    elif removed is not None:
        slot = removed.nic_index
    else:
        raise NotFound(f"the port forward of VM {vm.name} this job adds was removed meanwhile")
    user_mode = slot not in taps or not agent.networks.enabled
    running = _running(ctx)
    try:
        if user_mode and running is not None:
            if target is not None:
                rule = f"{target.protocol}:0.0.0.0:{target.host_port}-:{target.guest_port}"
                command = f"hostfwd_add net{slot} {rule}"
            else:  # a removal: checked above
                assert removed is not None
                command = f"hostfwd_remove net{slot} {removed.protocol}:0.0.0.0:{removed.host_port}"
            output = str(await running.proc.execute("human-monitor-command", {"command-line": command}) or "")
            # The monitor answers a good hostfwd_add with nothing and a good hostfwd_remove with "... removed".
            if target is not None and output.strip():
                raise Conflict(
                    f"QEMU refused the forward: {output.strip()}",
                    "the host port may be in use by another program; choose another",
                )
            if target is None and "removed" not in output:
                log.warning("hostfwd_remove on %s: %s", vm.name, output.strip() or "no answer")
        await asyncio.to_thread(agent.networks.sync)
        if target is not None and not user_mode and not agent.networks.holding(target.protocol, target.host_port):
            raise Conflict(
                f"host port {target.host_port}/{target.protocol} is in use on the host",
                "choose another host port in the range for port forwards",
            )
    except Exception:
        if target is not None:
            with agent.store.session() as session:
                session.query(PortForward).filter(PortForward.id == target.id).delete()
        raise
    with agent.store.reading() as session:
        count = len(list(session.scalars(select(PortForward.id).where(PortForward.vm_id == vm.id))))
    return {"forwards": count}
