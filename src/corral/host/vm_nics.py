"""A VM's NICs on this host: how each becomes a QEMU netdev (a TAP on its network's bridge, or user-mode NAT),
which PCIe port it sits on, and the TAPs made before QEMU starts and removed after it exits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from corral.engine.plan import LaunchPlan, NicPlan
from corral.errors import NotFound
from corral.spec.vm import MAX_NICS, VMSpec
from corral.store.models import VM, Network, NetworkPort, PortForward

if TYPE_CHECKING:
    from corral.host.agent import Agent


def hotplug_ports(machine: str) -> tuple[str, ...]:
    """One PCIe root port per NIC slot on q35 (its root bus takes no hotplug); pc's bus hotplugs by itself."""
    return tuple(nic_port(slot) for slot in range(MAX_NICS)) if machine.startswith("q35") else ()


def nic_port(slot: int) -> str:
    return f"nicport{slot}"


def nic_plans(agent: Agent, vm: VM, spec: VMSpec) -> list[NicPlan]:
    """Each NIC as QEMU gets it: a TAP on its network's bridge, or user-mode NAT (the user network, and the
    fallback where this agent cannot make bridges) carrying the VM's port forwards as hostfwd rules (QEMU binds
    those ports itself: a port a host program holds fails the start, it is never taken over)."""
    with agent.store.reading() as session:
        rows = session.scalars(select(NetworkPort).where(NetworkPort.vm_id == vm.id))
        ports = {port.nic_index: port for port in rows}
        bridges = {net.id: net.bridge for net in session.scalars(select(Network))}
        forwards = list(session.scalars(select(PortForward).where(PortForward.vm_id == vm.id)))
        session.expunge_all()  # plain values from here on
    on_q35 = agent.settings.machine.startswith("q35")
    allowed = agent.settings.forward_ports  # forwards made before the administrator narrowed the range stay off
    plans = []
    for position, nic in enumerate(spec.nics):
        slot = spec.nic_slot(position)
        port = ports.get(slot)
        bus = nic_port(slot) if on_q35 else None
        if port is not None and agent.networks.enabled:
            plans.append(
                NicPlan(
                    id=f"net{slot}",
                    mac=nic.mac or port.mac,
                    mode="tap",
                    ifname=port.tap,
                    bridge=bridges.get(port.network_id),
                    bus=bus,
                )
            )
            continue
        hostfwd = tuple(
            f"{fwd.protocol}:0.0.0.0:{fwd.host_port}-:{fwd.guest_port}"
            for fwd in forwards
            if fwd.nic_index == slot and fwd.host_port in allowed
        )
        plans.append(NicPlan(id=f"net{slot}", mac=nic.mac or "", mode="user", forwards=hostfwd, bus=bus))
    return plans


def taps_file(agent: Agent, vm_id: str) -> Path:
    return agent.layout.vm_run_dir(vm_id) / "taps"


def plug_taps(agent: Agent, vm_id: str, plan: LaunchPlan) -> None:
    """Make the TAPs of the plan's bridged NICs (their networks first, if this host has not made them yet).
    The names are kept in the VM's run directory so they are removed even if the VM row is gone by then."""
    taps = [nic for nic in plan.nics if nic.mode == "tap" and nic.ifname]
    if not taps:
        return
    agent.networks.sync()
    uid = agent.isolation.vm_uid(vm_id)
    path = taps_file(agent, vm_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{nic.ifname}\n" for nic in taps))
    for nic in taps:
        if nic.bridge is None or nic.ifname is None:  # taps all have an ifname (the filter above)
            raise NotFound(f"the network of NIC {nic.id} is gone", "remove the NIC or create the network again")
        agent.networks.plug(nic.ifname, nic.bridge, uid)


def unplug_taps(agent: Agent, vm_id: str) -> None:
    path = taps_file(agent, vm_id)
    if not path.exists():
        return
    for name in path.read_text().split():
        agent.networks.unplug(name)
    path.unlink(missing_ok=True)
