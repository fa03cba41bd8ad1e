"""This host's half of corral's networks: bridges, TAPs, one dnsmasq per network and the nftables rules.

Everything here is reconciled from the store like VMs are: ``sync`` makes what is missing (after a reboot, a
daemon restart or a dnsmasq crash), removes what the store no longer names, and reloads the firewall in one
transaction. What this installation made is recorded under CORRAL_HOME/run/networks, so it only ever removes
its own bridges, even with other corral homes (or libvirt) on the same machine.

Port forwards of NAT networks: the agent of the host the VM runs on holds each forwarded host port with bound
sockets for as long as the forward exists there, and writes a DNAT rule only for ports it holds; after a live
migration the destination takes the forward over and the source lets go of it. A port some program already has
is never forwarded (the job that adds the forward fails), and no program can take a forwarded port later, so the
rules never capture traffic meant for a host service. Ports outside the administrator's range get no rule either.

Networks across a pool (PostgreSQL store): a nat or isolated network is one layer-2 segment over every host with
a VM on it. Such a host enslaves a VXLAN device (the network's VNI, the ``overlay_port``, its own registered
address as the source) to the network's bridge, with one all-zeros FDB entry per other host of the network:
broadcasts go to each of them by unicast (no multicast in the underlay) and the kernel learns where each MAC is.
Every host keeps the same gateway address on its bridge and its own dnsmasq with the whole network's
reservations; the firewall stops ARP for the gateway and DHCP at the VXLAN device, so a guest always talks to its
own host's gateway, DHCP server and masquerade (NAT egress leaves from the host the VM runs on).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from corral.config import Settings
from corral.errors import CorralError, EngineError
from corral.host import dnsmasq, firewall
from corral.hostports import hold_port
from corral.spec.network import VXLAN_OVERHEAD, NetworkMode
from corral.store.db import Store
from corral.store.models import VM, Host, Network, NetworkPort, PortForward
from corral.store.network_queries import VXLAN_PREFIX

log = logging.getLogger("corral.agent")

TABLE_CHECK_INTERVAL = 10.0

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def _bridge(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bridge", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise EngineError(f"bridge {' '.join(args)} failed: {result.stderr.strip()}", "is iproute2's bridge there?")
    return result


def vxlan_name(network_id: str) -> str:
    return f"{VXLAN_PREFIX}{network_id[:8]}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise EngineError(f"ip {' '.join(args)} failed: {result.stderr.strip()}", "corral's agent must run as root")
    return result


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def is_bridge(name: str) -> bool:
    return Path("/sys/class/net", name, "bridge").is_dir()


def can_manage() -> bool:
    """Bridges and TAPs need root (CAP_NET_ADMIN); without it VMs fall back to user-mode networking."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


class NetworkHost:
    def __init__(self, settings: Settings, store: Store, host_name: str) -> None:
        self.settings = settings
        self.store = store
        self.host_name = host_name
        self.root = settings.home / "run" / "networks"
        self.tag = firewall.table_tag(settings.home)
        self.enabled = can_manage()
        self._lock = threading.RLock()
        self._last_rules: str | None = None
        self._checked = 0.0
        self._held: dict[tuple[str, int], list[socket.socket]] = {}
        self._unheld: dict[tuple[str, int], str] = {}  # forwards whose port some program holds: why
        self._overlay_errors: dict[str, str] = {}  # network id: why its overlay could not be joined
        self._joined: set[str] = set()  # network ids whose segment this host is on
        self._forward_clash = False  # forwards of a VM that arrived here could not be adopted (warned once)

    def directory(self, network_id: str) -> Path:
        return self.root / network_id[:12]

    # -- networks ---------------------------------------------------------------------------------------------

    def guest_mtu(self, network: Network) -> int | None:
        """The MTU guests are told by DHCP: the network's own, or in a pool what the overlay carries."""
        if network.mtu is not None:
            return network.mtu
        return self.settings.underlay_mtu - VXLAN_OVERHEAD if self.store.shared else None

    def ensure(self, network: Network, hosts: list[dnsmasq.DhcpHost]) -> None:
        """Make the network's bridge and DHCP server exist as the row says; raise with the reason if not."""
        if not self.enabled:
            raise EngineError(
                "corral's agent is not root: bridged networks are unavailable on this host",
                "run corral as root, or use --nic network=user",
            )
        with self._lock:
            directory = self.directory(network.id)
            directory.mkdir(parents=True, exist_ok=True)
            if network.mode == NetworkMode.BRIDGE:
                if not is_bridge(network.bridge):
                    raise EngineError(
                        f"uplink {network.bridge!r} is not a bridge on this host",
                        "create it (ip link add br0 type bridge) and enslave the LAN interface to it",
                    )
                (directory / "bridge").write_text(f"{network.bridge}\nexternal\n")
                return
            self._ensure_bridge(network, directory)
            if network.dhcp and network.subnet and network.gateway:
                changed = dnsmasq.write_hosts(directory, hosts)
                if dnsmasq.outdated(directory):
                    log.info("network %s: restarting dnsmasq to serve the names of the whole network", network.name)
                    dnsmasq.stop(directory, wait=5.0)
                if dnsmasq.running_pid(directory) is None:
                    dnsmasq.start(
                        directory,
                        network.bridge,
                        network.subnet,
                        network.gateway,
                        isolated=network.mode == NetworkMode.ISOLATED,
                        mtu=self.guest_mtu(network),
                    )
                elif changed:
                    dnsmasq.reload(directory)

    def _ensure_bridge(self, network: Network, directory: Path) -> None:
        (directory / "bridge").write_text(f"{network.bridge}\nowned\n")
        if not link_exists(network.bridge):
            _ip("link", "add", "name", network.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            ipv6 = Path("/proc/sys/net/ipv6/conf", network.bridge, "disable_ipv6")
            if ipv6.exists():  # guests get IPv4 from corral; no stray router advertisements or SLAAC
                ipv6.write_text("1\n")
        if network.subnet and network.gateway:
            prefix = ipaddress.IPv4Network(network.subnet).prefixlen
            address = f"{network.gateway}/{prefix}"
            shown = _ip("-o", "-4", "addr", "show", "dev", network.bridge).stdout
            if f" {address} " not in shown:
                self._check_no_clash(network)
                _ip("addr", "add", address, "dev", network.bridge)
        _ip("link", "set", network.bridge, "up")
        # Port forwards reached through 127.0.0.1 are routed out of this bridge; Linux drops that unless told.
        localnet = Path("/proc/sys/net/ipv4/conf", network.bridge, "route_localnet")
        if localnet.exists() and localnet.read_text().strip() != "1":
            localnet.write_text("1\n")

    def _check_no_clash(self, network: Network) -> None:
        subnet = ipaddress.IPv4Network(network.subnet)
        for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[1] == network.bridge:
                continue
            try:
                other = ipaddress.IPv4Interface(fields[3]).network
            except ValueError:
                continue
            if other.overlaps(subnet):
                # The host's interfaces and their networks are host facts: the log has them, the tenant's job not.
                log.warning("network %s: subnet %s overlaps %s on %s", network.name, network.subnet, other, fields[1])
                raise EngineError(
                    f"subnet {network.subnet} overlaps an address range the host uses",
                    "delete the network and create it again with another --subnet, or without one to get a free one",
                )

    # -- the overlay between hosts ----------------------------------------------------------------------------

    def join(self, network: Network, local: str, peers: set[str]) -> str:
        """This host's part of the network's VXLAN segment: the device on the bridge, one flood entry per peer.
        Returns the device's name."""
        name = vxlan_name(network.id)
        directory = self.directory(network.id)
        wanted = {"id": network.vni, "port": self.settings.overlay_port, "local": local}
        if link_exists(name) and _vxlan_params(name) != wanted:
            log.info("network %s: re-making %s (VNI, port or address changed)", network.name, name)
            _ip("link", "del", name, check=False)
        if not link_exists(name):
            (directory / "vxlan").write_text(f"{name}\n")
            _ip(
                "link",
                "add",
                name,
                "mtu",
                str(self.settings.underlay_mtu - VXLAN_OVERHEAD),
                "type",
                "vxlan",
                "id",
                str(network.vni),
                "dstport",
                str(self.settings.overlay_port),
                "local",
                local,
                "ttl",
                "64",
            )
            log.info("network %s joins its overlay (VNI %s) through %s", network.name, network.vni, name)
        master = Path("/sys/class/net", name, "master")
        if not master.exists() or master.resolve().name != network.bridge:
            _ip("link", "set", name, "master", network.bridge)
        _ip("link", "set", name, "up")
        have = _flood_peers(name)
        for peer in sorted(peers - have):
            _bridge("fdb", "append", "00:00:00:00:00:00", "dev", name, "dst", peer)
        for peer in sorted(have - peers):
            _bridge("fdb", "del", "00:00:00:00:00:00", "dev", name, "dst", peer, check=False)
        return name

    def leave(self, network_id: str) -> None:
        """No VM of the network here any more: out of its segment (the bridge and dnsmasq stay, as on one host)."""
        name = vxlan_name(network_id)
        if link_exists(name):
            log.info("leaving the overlay of network %s", network_id[:12])
            _ip("link", "del", name, check=False)
        (self.directory(network_id) / "vxlan").unlink(missing_ok=True)

    def teardown(self, network_id: str) -> None:
        """Stop the network's dnsmasq and remove its bridge if corral made it; an external bridge stays."""
        with self._lock:
            remove_network_dir(self.directory(network_id))

    # -- TAPs -------------------------------------------------------------------------------------------------

    def plug(self, tap: str, bridge: str, owner_uid: int | None) -> None:
        """A persistent TAP on the bridge, owned by the VM's uid so its QEMU can open it again after dropping
        root (a hot-added NIC)."""
        with self._lock:
            if link_exists(tap):
                _ip("link", "del", tap, check=False)  # a leftover with another owner or bridge
            owner = ["user", str(owner_uid)] if owner_uid is not None else []
            _ip("tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", *owner)
            try:
                _ip("link", "set", tap, "master", bridge)
                _ip("link", "set", tap, "up")
            except CorralError:
                _ip("link", "del", tap, check=False)
                raise

    def open_tap(self, tap: str) -> int:
        """An open file descriptor on an existing TAP, for a QEMU that has dropped root: it cannot open
        /dev/net/tun itself (root-only on many hosts), so the agent opens it and hands the descriptor over."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            request = struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as exc:
            os.close(fd)
            raise EngineError(f"cannot open TAP {tap}: {exc.strerror}", "is the agent root?") from exc
        return fd

    def _reattach(self, tap: str, bridge: str) -> None:
        """A running VM's TAP falls off its bridge when the bridge is re-made (someone deleted it, a network
        restart): put it back, so the guest's link comes back without a restart."""
        if not link_exists(tap):
            return  # the VM is not running here
        master = Path("/sys/class/net", tap, "master")
        if master.exists() and master.resolve().name == bridge:
            return
        log.info("re-attaching %s to %s", tap, bridge)
        _ip("link", "set", tap, "master", bridge, check=False)
        _ip("link", "set", tap, "up", check=False)

    def unplug(self, tap: str) -> None:
        with self._lock:
            if link_exists(tap):
                _ip("link", "del", tap, check=False)

    # -- reconciling ------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every network of the store exist here, drop those it no longer has, reload the firewall.

        Errors of one network are written to its row (state "error") and never stop the others."""
        if not self.enabled:
            return
        with self._lock:
            self._adopt_forwards()
            with self.store.reading() as session:
                networks = list(session.scalars(select(Network)))
                ports = list(
                    session.execute(select(NetworkPort, VM.name, VM.host).join(VM, VM.id == NetworkPort.vm_id))
                    .tuples()
                    .all()
                )
                addresses = {name: address for name, address in session.execute(select(Host.name, Host.address)).all()}
                forwards = list(
                    session.execute(
                        select(PortForward, NetworkPort.ip)
                        .join(
                            NetworkPort,
                            (NetworkPort.vm_id == PortForward.vm_id) & (NetworkPort.nic_index == PortForward.nic_index),
                        )
                        # Where its VM runs: from the moment a live migration commits (which moves the forward's
                        # row too), the source's next sync lets go of the port and this one takes it.
                        .join(VM, VM.id == PortForward.vm_id)
                        .where(VM.host == self.host_name, PortForward.host == self.host_name)
                    ).all()
                )
                session.expunge_all()
            self._hold_ports({(fwd.protocol, fwd.host_port) for fwd, ip in forwards if ip})
            wanted = {net.id[:12] for net in networks if net.state != "deleting"}
            if self.root.exists():
                for directory in self.root.iterdir():
                    if directory.name not in wanted and not any(n.id[:12] == directory.name for n in networks):
                        log.info("removing network leftovers %s", directory.name)
                        self.teardown(directory.name)
            states: dict[str, tuple[str, str]] = {}
            for net in networks:
                if net.state == "deleting":
                    continue
                if (
                    net.mode == NetworkMode.BRIDGE
                    and not is_bridge(net.bridge)
                    and not any(port.network_id == net.id and host == self.host_name for port, _n, host in ports)
                ):
                    # Not this host's to judge: its uplink is elsewhere, and placement sends the network's VMs
                    # only to hosts whose heartbeat reports that bridge. Marking the shared row "error" here would
                    # flip it against the hosts that have it.
                    continue
                hosts = [
                    dnsmasq.DhcpHost(port.mac, port.ip, name)
                    for port, name, _host in ports
                    if port.network_id == net.id and port.ip
                ]
                try:
                    self.ensure(net, hosts)
                    states[net.id] = ("ready", "")
                except CorralError as exc:
                    states[net.id] = ("error", str(exc))
            self._record_states(networks, states)
            bridges = {net.id: net.bridge for net in networks if states.get(net.id, ("",))[0] == "ready"}
            for port, _name, host in ports:
                if host == self.host_name and port.network_id in bridges:
                    self._reattach(port.tap, bridges[port.network_id])
            overlays = self._sync_overlays(
                [n for n in networks if states.get(n.id, ("",))[0] == "ready"], ports, addresses
            )
            rules = firewall.Ruleset(
                networks=[
                    firewall.BridgeRules(n.bridge, n.mode, n.subnet, overlays.get(n.id), n.gateway, self.guest_mtu(n))
                    for n in networks
                    if n.state != "deleting" and states.get(n.id, ("",))[0] == "ready"
                ],
                ports=[
                    firewall.PortRules(port.tap, port.mac, port.ip)
                    for port, _name, host in ports
                    if host == self.host_name
                ],
                forwards=[
                    firewall.ForwardRules(fwd.protocol, fwd.host_port, ip, fwd.guest_port)
                    for fwd, ip in forwards
                    if ip and self.holding(fwd.protocol, fwd.host_port)
                ],
            )
            self.apply(rules, nat=any(n.mode == NetworkMode.NAT for n in networks))

    def _sync_overlays(
        self,
        networks: list[Network],
        ports: list[tuple[NetworkPort, str, str | None]],
        addresses: dict[str, str | None],
    ) -> dict[str, str]:
        """Join the segments of the networks with a VM here, leave the others; {network id: VXLAN device}.

        A network is this host's when a VM of it is placed here, or when one of its TAPs exists here (a VM
        arriving by live migration, before the store names this host): the guest is then on the segment from its
        first frame. Peers are the other hosts the store places the network's VMs on."""
        joined: dict[str, str] = {}
        failed: dict[str, str] = {}
        local = addresses.get(self.host_name)
        for net in networks:
            if net.mode == NetworkMode.BRIDGE or net.vni is None or not self.store.shared:
                continue
            members = {host for port, _n, host in ports if port.network_id == net.id and host}
            here = self.host_name in members or any(
                port.network_id == net.id and link_exists(port.tap) for port, _n, _h in ports
            )
            try:
                if not here:
                    if link_exists(vxlan_name(net.id)):
                        self.leave(net.id)
                    continue
                if not local:
                    raise EngineError("this host has no registered address", "restart its agent with --address")
                peers = {addresses[h] for h in members if h != self.host_name and addresses.get(h)} - {local}
                joined[net.id] = self.join(net, local, {str(p) for p in peers})
            except CorralError as exc:
                if self._overlay_errors.get(net.id) != exc.message:  # once, not at every 2 s reconcile
                    log.warning("network %s: overlay: %s", net.name, exc.message)
                failed[net.id] = exc.message
        self._overlay_errors = failed
        self._joined = set(joined)
        return joined

    def overlay_states(self) -> dict[str, str]:
        """{network id: "joined" | "error"} for the networks this host should span, for the heartbeat: `network
        show` tells each host's part (the reason of an error stays in this agent's log: it names host facts)."""
        errors, joined = self._overlay_errors, self._joined  # swapped whole by sync: no lock (sync may take a while)
        return {**{nid: "error" for nid in errors}, **{nid: "joined" for nid in joined}}

    # -- forwarded ports --------------------------------------------------------------------------------------

    def _adopt_forwards(self) -> None:
        """Point the forwards of the VMs that run here at this host, where a VM arrived without them: a restart
        here by HA, a move written by an older corral. A migration moves them itself; this is what keeps the
        one-forward-per-port-and-host check right whatever moved the VM."""
        stale = (
            select(PortForward.id)
            .join(VM, VM.id == PortForward.vm_id)
            .where(VM.host == self.host_name, (PortForward.host != self.host_name) | PortForward.host.is_(None))
        )
        with self.store.reading() as session:
            ids = list(session.scalars(stale))
        if not ids:
            return
        try:
            with self.store.session() as session:
                session.execute(update(PortForward).where(PortForward.id.in_(ids)).values(host=self.host_name))
        except IntegrityError:
            # Another VM here forwards the same port: that one keeps it, these get no rule (said once, not per sync).
            if not self._forward_clash:
                log.warning("port forwards of a VM that arrived here clash with this host's own; they stay off")
            self._forward_clash = True
            return
        self._forward_clash = False

    def _hold_ports(self, wanted: set[tuple[str, int]]) -> None:
        """Hold exactly the forwarded ports in the administrator's range: bind the new ones, let go of the rest."""
        allowed = self.settings.forward_ports
        wanted = {key for key in wanted if key[1] in allowed}
        for key in [key for key in self._held if key not in wanted]:
            for sock in self._held.pop(key):
                sock.close()
        unheld: dict[tuple[str, int], str] = {}
        for key in sorted(wanted - self._held.keys()):
            try:
                self._held[key] = hold_port(*key)
            except CorralError as exc:
                unheld[key] = exc.message
                if key not in self._unheld:
                    log.warning("port forward from %d/%s gets no rule: %s", key[1], key[0], exc.message)
        self._unheld = unheld

    def holding(self, protocol: str, port: int) -> bool:
        """Whether this agent holds the host port (so its forward's DNAT rule is loaded)."""
        return (protocol, port) in self._held

    def apply(self, rules: firewall.Ruleset, nat: bool) -> None:
        """Load the rules if they changed. With no network at all, corral's tables are removed (or never made),
        so an installation that uses no corral network leaves nothing in the host's firewall."""
        empty = not (rules.networks or rules.ports or rules.forwards)
        script = firewall.render_removal(self.tag) if empty else firewall.render(self.tag, rules)
        if script == self._last_rules:
            # Someone may have flushed the firewall (a reboot-less `nft flush ruleset`): look now and then. Half a
            # second early rather than a whole period late: an idle agent syncs every TABLE_CHECK_INTERVAL seconds
            # too (corral.host.agent.NETWORK_CHECK), and each of those syncs should look.
            if empty or time.monotonic() - self._checked < TABLE_CHECK_INTERVAL - 0.5:
                return
            self._checked = time.monotonic()
            if self._tables_exist():
                return
            log.warning("corral's nftables tables were removed; loading them again")
        if empty and self._last_rules is None and (shutil.which("nft") is None or not self._tables_exist()):
            self._last_rules = script
            return
        if nat:
            firewall.enable_forwarding()
        firewall.load(script)
        self._last_rules = script

    def _tables_exist(self) -> bool:
        listed = subprocess.run([firewall.nft_binary(), "list", "tables"], capture_output=True, text=True, timeout=30)
        return f"corral_{self.tag}" in listed.stdout

    def _record_states(self, networks: list[Network], states: dict[str, tuple[str, str]]) -> None:
        changed = {
            nid: st
            for nid, st in states.items()
            if any(n.id == nid and (n.state, n.status_message) != st for n in networks)
        }
        if not changed:
            return
        with self.store.session() as session:
            for network_id, (state, message) in changed.items():
                row = session.get(Network, network_id)
                if row is not None and row.state != "deleting":
                    row.state, row.status_message = state, message
                    if state == "error":
                        log.warning("network %s: %s", row.name, message)
        self.store.notifier.notify()

    def remove_all(self) -> None:
        with self._lock:
            self._hold_ports(set())
            remove_everything(self.settings.home)
            self._last_rules = None


def _vxlan_params(name: str) -> dict[str, object]:
    """VNI, UDP port and source address of an existing VXLAN device."""
    result = _ip("-d", "-j", "link", "show", "dev", name, check=False)
    try:
        data = json.loads(result.stdout)[0]["linkinfo"]["info_data"]
    except (ValueError, LookupError, TypeError):
        return {}
    return {"id": data.get("id"), "port": data.get("port"), "local": data.get("local")}


def _flood_peers(name: str) -> set[str]:
    """The peers of a VXLAN device's all-zeros (flood) FDB entries."""
    shown = _bridge("fdb", "show", "dev", name, check=False).stdout
    peers = set()
    for line in shown.splitlines():
        fields = line.split()
        if fields and fields[0] == "00:00:00:00:00:00" and "dst" in fields:
            peers.add(fields[fields.index("dst") + 1])
    return peers


def remove_network_dir(directory: Path) -> None:
    """Stop a network's dnsmasq, delete its VXLAN device and its bridge if corral made it (an external one
    stays), forget it."""
    dnsmasq.stop(directory)
    vxlan = directory / "vxlan"
    if vxlan.exists():
        name = vxlan.read_text().strip()
        if name and link_exists(name):
            _ip("link", "del", name, check=False)
    marker = directory / "bridge"
    if marker.exists():
        name, _, ownership = marker.read_text().partition("\n")
        if ownership.strip() == "owned" and link_exists(name):
            _ip("link", "del", name, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def remove_everything(home: Path) -> None:
    """Take down every bridge, TAP, dnsmasq and nftables table the installation at ``home`` made (used when a
    test run ends, and by `corral serve --remove-networks`). Works without the store: it reads what the agent
    recorded under ``home``."""
    for taps in (home / "run").glob("*/taps"):
        for name in taps.read_text().split():
            if link_exists(name):
                _ip("link", "del", name, check=False)
        taps.unlink(missing_ok=True)
    root = home / "run" / "networks"
    if root.exists():
        for directory in root.iterdir():
            remove_network_dir(directory)
    if can_manage() and shutil.which("nft"):
        try:
            firewall.load(firewall.render_removal(firewall.table_tag(home)))
        except CorralError:
            log.warning("could not remove corral's nftables tables")
