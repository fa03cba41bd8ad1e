"""Network verbs of the control plane: networks, the NICs VMs have on them, and port forwards.

Addresses are reserved here, in the store, when a NIC is made: the DHCP server then hands each MAC its own
address. Knowing a guest's address before it boots is what lets port forwards and anti-spoofing rules be
written up front, and keeps the address stable across restarts, clones and host moves.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Collection
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.errors import AlreadyExists, Conflict, Forbidden, InvalidInput, NotFound
from corral.hostports import hold_port
from corral.spec.job import JobKind
from corral.spec.job_params import ForwardRemoval, NicParams, PortForwardParams
from corral.spec.network import NetworkMode, NetworkSpec, PortForwardSpec, validate_subnet
from corral.spec.vm import MAX_NICS, USER_NETWORK, NicSpec, PowerState, VMSpec
from corral.store import jobs
from corral.store.models import VM, Host, Job, Network, NetworkPort, PortForward, new_id
from corral.store.network_queries import (
    BRIDGE_PREFIX,
    TAP_PREFIX,
    forwards_of,
    ports_of,
)

DEFAULT_NETWORK = "default"
# Where automatic subnets come from: /24s of 10.87.0.0/16, away from the ranges home routers and clouds favour.
AUTO_SUBNET_POOL = ipaddress.IPv4Network("10.87.0.0/16")
FIRST_VNI = 10000  # automatic VNIs start here, away from the small numbers people pick by hand


def get_network(session: Session, name: str, project: str = "default") -> Network:
    network = session.scalars(select(Network).where(Network.project == project, Network.name == name)).first()
    if network is None:
        raise NotFound(f"network {name!r} not found", "list networks with `corral network list`, or create it")
    return network


def list_networks(session: Session, project: str = "default") -> list[Network]:
    return list(session.scalars(select(Network).where(Network.project == project).order_by(Network.name)))


def _taken_subnets(session: Session) -> list[tuple[str, str, ipaddress.IPv4Network]]:
    """Every project's subnets as (project, name, subnet): they all share the hosts' routing tables, so none may
    overlap."""
    rows = session.execute(
        select(Network.project, Network.name, Network.subnet).where(Network.subnet.is_not(None))
    ).all()
    return [(project, name, ipaddress.IPv4Network(subnet)) for project, name, subnet in rows]


def host_routes() -> list[ipaddress.IPv4Network]:
    """This machine's IPv4 routes, so an automatic subnet never shadows a LAN the host is on."""
    try:
        out = subprocess.run(
            ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    routes = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst in ("default", "") or route.get("type") in ("broadcast", "local"):
            continue
        try:
            routes.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
        except ValueError:
            continue
    return routes


def pick_subnet(session: Session, avoid: list[ipaddress.IPv4Network] | None = None) -> ipaddress.IPv4Network:
    taken = [subnet for _, _, subnet in _taken_subnets(session)] + (avoid if avoid is not None else host_routes())
    for candidate in AUTO_SUBNET_POOL.subnets(new_prefix=24):
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise Conflict("no free /24 left in 10.87.0.0/16 for a new network", "pass --subnet explicitly")


def pick_vni(session: Session, wanted: int | None = None) -> int:
    """The VXLAN identifier of a new network: ``wanted`` if no network has it, else the lowest free from
    FIRST_VNI. VNIs are unique across projects: they share the hosts' underlay, so a clash would join two
    networks into one segment."""
    taken = set(session.scalars(select(Network.vni).where(Network.vni.is_not(None))))
    if wanted is not None:
        if wanted in taken:
            raise Conflict(f"VNI {wanted} is taken by another network", "choose another --vni, or leave it out")
        return wanted
    vni = FIRST_VNI
    while vni in taken:
        vni += 1
    return vni


def network_hosts(session: Session, network_id: str) -> list[str]:
    """The hosts a network spans: those that run or keep a VM with a NIC on it."""
    rows = session.scalars(
        select(VM.host).join(NetworkPort, NetworkPort.vm_id == VM.id).where(NetworkPort.network_id == network_id)
    )
    return sorted({host for host in rows if host})


def network_host_states(session: Session, network: Network) -> dict[str, str]:
    """Each host the network spans and its part in it, as `network show` lists them: ``joined`` (its VXLAN device
    is on the segment), ``error`` (its agent could not join; the reason is in that agent's log, as it names host
    facts), ``joining`` (not reported yet: its agent's next heartbeat tells), ``local`` (no overlay: a single host,
    or a bridge-mode network, whose LAN is the segment)."""
    hosts = network_hosts(session, network.id)
    pool = session.get_bind().dialect.name == "postgresql"
    if not pool or network.mode == NetworkMode.BRIDGE or network.vni is None:
        return dict.fromkeys(hosts, "local")
    usage: dict[str, dict[str, Any] | None] = dict(
        session.execute(select(Host.name, Host.usage).where(Host.name.in_(hosts))).tuples().all()
    )
    return {host: ((usage.get(host) or {}).get("overlays") or {}).get(network.id, "joining") for host in hosts}


def _job_host(session: Session, uplink: str | None = None) -> str:
    """Network jobs run on one host (the first online one): it reports errors such as a missing uplink.
    Every other host's agent makes the bridge when a VM there first needs it. A bridge-mode network's job goes to
    the first host whose heartbeat saw its ``uplink`` (placement sends its VMs only there, too)."""
    online = session.execute(select(Host.name, Host.usage).where(Host.state == "online").order_by(Host.name)).all()
    if not online:
        raise Conflict("no host is online to make the network on", "start corral's agent (`corral serve`)")
    if uplink is not None:
        for name, usage in online:
            if uplink in (usage or {}).get("bridges", ()):
                return name
    return online[0][0]


def is_corral_bridge(session: Session, name: str) -> bool:
    """Whether ``name`` is a bridge corral makes: any installation's (by the naming scheme) or any network's of
    this one (by the store). Joining one would put a bridge-mode network's VMs on another network's segment."""
    if name.startswith((BRIDGE_PREFIX, TAP_PREFIX)):
        return True
    owned = select(Network.id).where(Network.bridge == name, Network.mode != NetworkMode.BRIDGE.value)
    return session.scalars(owned).first() is not None


def check_uplink(session: Session, uplink: str, any_host_bridge: bool, allowed: Collection[str]) -> None:
    """Who may join which host bridge: cluster admins any host bridge, project admins only the ones the
    administrator listed in ``bridge_uplinks``; corral's own bridges nobody. A tenant is refused before the store
    is looked at, so the refusal tells nothing of other tenants' bridges."""
    if not any_host_bridge and uplink not in allowed:
        listed = ", ".join(sorted(allowed))
        raise Forbidden(
            f"bridge-mode networks on uplink {uplink!r} need a cluster admin",
            f"use one of the uplinks the administrator allows ({listed})"
            if listed
            else "ask a cluster admin to create it, or to allow the uplink in bridge_uplinks",
        )
    if is_corral_bridge(session, uplink):
        raise InvalidInput(
            f"uplink {uplink!r} is a bridge corral made for a network, not a host bridge",
            "name a host bridge such as br0; VMs join corral's networks with --nic network=NAME",
        )


def create(
    session: Session,
    spec: NetworkSpec,
    project: str = "default",
    *,
    any_host_bridge: bool = False,
    allowed_uplinks: Collection[str] = (),
    max_mtu: int | None = None,
) -> Job:
    """Record the network and submit the job that makes it. ``any_host_bridge``: the caller is a cluster admin,
    who may name any host bridge as a bridge-mode uplink; others only those in ``allowed_uplinks``. ``max_mtu``:
    in a pool, the largest guest MTU the overlay carries (the underlay's MTU less VXLAN's headers)."""
    if spec.mode == NetworkMode.BRIDGE and spec.uplink is not None:
        check_uplink(session, spec.uplink, any_host_bridge, allowed_uplinks)
    if session.scalars(select(Network.id).where(Network.project == project, Network.name == spec.name)).first():
        raise AlreadyExists(f"network {spec.name!r} already exists", "choose another name or delete it first")
    if spec.mtu is not None and max_mtu is not None and spec.mtu > max_mtu:
        raise InvalidInput(
            f"MTU {spec.mtu} cannot be carried by the overlay between hosts (at most {max_mtu})",
            f"choose --mtu {max_mtu} or less, or raise underlay_mtu if the hosts' links carry jumbo frames",
        )
    vni = None if spec.mode == NetworkMode.BRIDGE else pick_vni(session, spec.vni)
    subnet = gateway = None
    if spec.mode != NetworkMode.BRIDGE:
        if spec.subnet is None:
            chosen = pick_subnet(session)
        else:
            chosen = validate_subnet(spec.subnet)
            for other_project, other_name, other in _taken_subnets(session):
                if chosen.overlaps(other):
                    # Another project's network is not named, nor its subnet: they are that project's business.
                    shown = f"network {other_name!r} ({other})" if other_project == project else "another network"
                    raise Conflict(
                        f"subnet {chosen} overlaps {shown}",
                        "choose a subnet that overlaps no other network, or leave --subnet out to get a free one",
                    )
        subnet, gateway = str(chosen), str(next(chosen.hosts()))
    network_id = new_id()
    network = Network(
        id=network_id,
        name=spec.name,
        project=project,
        mode=spec.mode.value,
        subnet=subnet,
        gateway=gateway,
        dhcp=spec.dhcp and spec.mode != NetworkMode.BRIDGE,
        uplink=spec.uplink,
        bridge=spec.uplink if spec.mode == NetworkMode.BRIDGE else f"{BRIDGE_PREFIX}{network_id[:8]}",
        vni=vni,
        mtu=spec.mtu,
        state="pending",
    )
    session.add(network)
    session.flush()
    return jobs.submit(
        session,
        JobKind.NETWORK_CREATE,
        "network",
        network.name,
        target_id=network.id,
        host=_job_host(session, network.uplink),
        project=project,
    )


def delete(session: Session, name: str, project: str = "default") -> Job:
    network = get_network(session, name, project)
    users = session.scalars(
        select(VM.name).join(NetworkPort, NetworkPort.vm_id == VM.id).where(NetworkPort.network_id == network.id)
    ).all()
    if users:
        shown = ", ".join(sorted(set(users)))
        raise Conflict(
            f"network {name!r} is in use by VM(s) {shown}",
            "delete those VMs or remove their NICs (`corral vm nic remove VM SLOT`) first",
        )
    if jobs.active_for(session, "network", network.id):
        raise Conflict(f"network {name!r} is busy", "wait for its job to finish")
    network.state = "deleting"
    return jobs.submit(
        session,
        JobKind.NETWORK_DELETE,
        "network",
        network.name,
        target_id=network.id,
        host=_job_host(session, network.uplink),
        project=project,
    )


def ensure_default(session: Session) -> Network | None:
    """The NAT network every installation starts with, made once (a user may delete it afterwards)."""
    if session.scalars(select(Network.id).where(Network.project == "default", Network.name == DEFAULT_NETWORK)).first():
        return None
    spec = NetworkSpec(name=DEFAULT_NETWORK, mode=NetworkMode.NAT)
    create(session, spec)
    return get_network(session, DEFAULT_NETWORK)


# -- NICs ------------------------------------------------------------------------------------------------------


def _free_address(session: Session, network: Network) -> str:
    subnet = ipaddress.IPv4Network(network.subnet)
    taken = set(session.scalars(select(NetworkPort.ip).where(NetworkPort.network_id == network.id)))
    taken.add(network.gateway)
    for address in subnet.hosts():
        if str(address) not in taken:
            return str(address)
    raise Conflict(
        f"network {network.name!r} has no free address left in {network.subnet}",
        "create a network with a larger subnet",
    )


def attach_nic(session: Session, vm: VM, nic: NicSpec) -> NetworkPort | None:
    """Reserve ``nic``'s place on its network: a TAP name and, with DHCP, an address. User-mode NICs need none."""
    if nic.network == USER_NETWORK:
        return None
    assert nic.mac is not None and nic.slot is not None, "NICs get their MAC and slot before they are attached"
    network = get_network(session, nic.network, vm.project)
    if network.state in ("deleting", "error"):
        raise Conflict(
            f"network {network.name!r} is {network.state}: {network.status_message}".rstrip(": "),
            f"see `corral network show {network.name}`",
        )
    clash = session.scalars(
        select(NetworkPort.id).where(NetworkPort.network_id == network.id, NetworkPort.mac == nic.mac)
    ).first()
    if clash:
        raise Conflict(f"MAC {nic.mac} is already used on network {network.name!r}", "choose another MAC or none")
    port_id = new_id()
    port = NetworkPort(
        id=port_id,
        network_id=network.id,
        vm_id=vm.id,
        nic_index=nic.slot,
        mac=nic.mac,
        ip=_free_address(session, network) if network.subnet and network.dhcp else None,
        tap=f"{TAP_PREFIX}{port_id[:10]}",
    )
    session.add(port)
    session.flush()
    return port


def attach_nics(session: Session, vm: VM, spec: VMSpec) -> None:
    for nic in spec.nics:
        attach_nic(session, vm, nic)


def nic_add(session: Session, vm: VM, nic: NicSpec) -> Job:
    spec = VMSpec.model_validate(vm.spec)
    if len(spec.nics) >= MAX_NICS:
        raise Conflict(f"VM {vm.name} already has {MAX_NICS} NICs", "remove one first")
    updated = spec.model_copy(update={"nics": [*spec.nics, nic]}).with_macs()
    VMSpec.model_validate(updated.model_dump())  # duplicate MACs and slots are refused here
    added = updated.nics[-1]
    assert added.slot is not None  # with_macs gives every NIC a slot
    attach_nic(session, vm, added)
    vm.spec = updated.model_dump(mode="json")
    return jobs.submit(
        session,
        JobKind.VM_NIC_ADD,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=vm.project,
        params=NicParams(slot=added.slot),
    )


def find_nic(spec: VMSpec, which: str) -> NicSpec:
    """A NIC by slot number or MAC address, as `vm show` lists them."""
    for position, nic in enumerate(spec.nics):
        if which.lower() in (str(spec.nic_slot(position)), (nic.mac or "").lower()):
            return nic
    raise NotFound(f"the VM has no NIC {which!r}", "name a NIC by the slot or MAC `corral vm show` lists")


def nic_remove(session: Session, vm: VM, which: str) -> Job:
    spec = VMSpec.model_validate(vm.spec)
    nic = find_nic(spec, which)
    position = spec.nics.index(nic)
    slot = spec.nic_slot(position)
    if session.scalars(select(PortForward.id).where(PortForward.vm_id == vm.id, PortForward.nic_index == slot)).first():
        raise Conflict(
            f"NIC {slot} of {vm.name} has port forwards",
            f"remove them: `corral vm port-forward {vm.name} --remove HOST_PORT`",
        )
    return jobs.submit(
        session,
        JobKind.VM_NIC_REMOVE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=vm.project,
        params=NicParams(slot=slot),
    )


# -- port forwards ---------------------------------------------------------------------------------------------


def _forward_nic(session: Session, vm: VM) -> tuple[int, str]:
    """The NIC a forward reaches: the first on a NAT network, else the first user-mode one."""
    spec = VMSpec.model_validate(vm.spec)
    ports = {port.nic_index: port for port in ports_of(session, vm.id)}
    candidates: list[tuple[int, str]] = []
    for position, nic in enumerate(spec.nics):
        slot = spec.nic_slot(position)
        if nic.network == USER_NETWORK:
            candidates.append((slot, "user"))
            continue
        network = session.get(Network, ports[slot].network_id) if slot in ports else None
        if network is not None and network.mode == NetworkMode.NAT and ports[slot].ip:
            candidates.append((slot, "nat"))
    if not candidates:
        raise Conflict(
            f"VM {vm.name} has no NIC a port forward can reach",
            "forwards need a NIC on a NAT network or on the user network; isolated networks have no way in",
        )
    candidates.sort(key=lambda item: item[1] != "nat")
    return candidates[0]


def shown_range(ports: range) -> str:
    return f"{ports.start}-{ports.stop - 1}"


def add_forward(session: Session, vm: VM, forward: PortForwardSpec, allowed: range, probe_host: bool = False) -> Job:
    """Record a forward and submit the job that applies it. ``allowed`` is the administrator's range of host ports
    (docs/networking.md); ``probe_host``: the VM's host is this machine, so a port some program holds is refused
    here already (the agent refuses it too, when it binds the port for the forward)."""
    if forward.host_port not in allowed:
        raise InvalidInput(
            f"host port {forward.host_port} is outside the range for port forwards ({shown_range(allowed)})",
            f"choose a host port in {shown_range(allowed)}",
        )
    clash = session.scalars(
        select(PortForward).where(
            PortForward.host == vm.host,
            PortForward.protocol == forward.protocol,
            PortForward.host_port == forward.host_port,
        )
    ).first()
    if clash is not None:
        owner = session.get(VM, clash.vm_id)
        # Another project's VM is not named: its name is that project's business.
        shown = f" to {owner.name}" if owner is not None and owner.project == vm.project else ""
        raise Conflict(
            f"host port {forward.host_port}/{forward.protocol} is already forwarded{shown}",
            f"choose another host port in {shown_range(allowed)}",
        )
    slot, _kind = _forward_nic(session, vm)
    if probe_host:
        for sock in hold_port(forward.protocol, forward.host_port):
            sock.close()
    row = PortForward(
        vm_id=vm.id,
        host=vm.host,
        nic_index=slot,
        protocol=forward.protocol,
        host_port=forward.host_port,
        guest_port=forward.guest_port,
    )
    session.add(row)
    session.flush()
    return _forward_job(session, vm, PortForwardParams(add=row.id))


def _forward_job(session: Session, vm: VM, params: PortForwardParams) -> Job:
    """The job that applies a forward's change on the VM's host (its rules, or a live hostfwd)."""
    return jobs.submit(
        session, JobKind.VM_PORT_FORWARD, "vm", vm.name, target_id=vm.id, host=vm.host, project=vm.project,
        params=params,
    )  # fmt: skip


def remove_forward(session: Session, vm: VM, host_port: int, protocol: str = "tcp") -> Job:
    row = session.scalars(
        select(PortForward).where(
            PortForward.vm_id == vm.id, PortForward.protocol == protocol, PortForward.host_port == host_port
        )
    ).first()
    if row is None:
        raise NotFound(
            f"VM {vm.name} has no forward from host port {host_port}/{protocol}",
            f"list them with `corral vm show {vm.name}`",
        )
    params = PortForwardParams(
        remove=ForwardRemoval(
            host_port=row.host_port, guest_port=row.guest_port, protocol=row.protocol, nic_index=row.nic_index
        )
    )
    session.delete(row)
    return _forward_job(session, vm, params)


def forwards_clash(session: Session, vm: VM, host: str) -> str | None:
    """Why ``vm``'s forwards cannot follow it to ``host`` (another VM there forwards one of its host ports), or
    None. A forward lives on the VM's host, so a move takes its ports along (docs/networking.md)."""
    for forward in forwards_of(session, vm.id):
        other = session.scalars(
            select(PortForward).where(
                PortForward.host == host,
                PortForward.protocol == forward.protocol,
                PortForward.host_port == forward.host_port,
                PortForward.vm_id != vm.id,
            )
        ).first()
        if other is not None:
            return f"host port {forward.host_port}/{forward.protocol} of its forwards is forwarded there already"
    return None


def running(vm: VM) -> bool:
    return vm.observed_state in (PowerState.RUNNING, PowerState.PAUSED, PowerState.STARTING)
