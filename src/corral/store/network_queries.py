"""Store queries and writes of networks that both halves need: the control plane when it plans a change, the
host agent when it carries one out (it reaches the control plane only through the store, so they live here).

The device-name prefixes are here for the same reason: the control plane names bridges and taps in the rows it
writes, the agent recognises its own devices (and VXLAN links) by them.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.spec.vm import VMSpec
from corral.store.models import VM, NetworkPort, PortForward

BRIDGE_PREFIX = "crl"
TAP_PREFIX = "crt"
VXLAN_PREFIX = "crx"


def ports_of(session: Session, vm_id: str) -> list[NetworkPort]:
    return list(session.scalars(select(NetworkPort).where(NetworkPort.vm_id == vm_id).order_by(NetworkPort.nic_index)))


def forwards_of(session: Session, vm_id: str) -> list[PortForward]:
    return list(session.scalars(select(PortForward).where(PortForward.vm_id == vm_id).order_by(PortForward.host_port)))


def detach_nic(session: Session, vm: VM, slot: int) -> None:
    """The store's half of a NIC removal, once the guest has let go of the device."""
    spec = VMSpec.model_validate(vm.spec)
    nics = [nic for position, nic in enumerate(spec.nics) if spec.nic_slot(position) != slot]
    vm.spec = spec.model_copy(update={"nics": nics}).model_dump(mode="json")
    for port in ports_of(session, vm.id):
        if port.nic_index == slot:
            session.delete(port)


def move_forwards(session: Session, vm: VM, host: str) -> None:
    """Point ``vm``'s forwards at its new host, in the transaction that moves the VM: that host's agent then
    holds the ports and writes the rules, the old host's lets go of them."""
    for forward in forwards_of(session, vm.id):
        forward.host = host
