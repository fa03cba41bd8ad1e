"""nftables rules for corral's networks: masquerade and port forwards for NAT networks, walls around isolated
ones, and anti-spoofing on every VM's bridge port.

The whole rule set of one corral installation is rendered from the store as text and loaded in one ``nft -f``
transaction (delete and re-create its own tables), so the kernel never sees half an update and rules of
deleted networks cannot linger. Tables carry a tag of the installation, so two corral homes on one machine (a
test run next to a demo) never overwrite each other's rules.

Port forwards DNAT traffic to a host port, the host's own included (so `curl 127.0.0.1:PORT` on the host reaches
the guest as it would from outside). That is safe only because the agent holds every forwarded port with bound
sockets (NetworkHost): no host service can listen on it, so no host traffic meant for a service is ever captured.
The caller passes only forwards whose port is held; an unheld port gets no rule at all.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import EngineError


@dataclass(frozen=True)
class BridgeRules:
    """What the firewall needs to know of one network on this host."""

    bridge: str
    mode: str  # nat, isolated or bridge
    subnet: str | None
    # In a pool: the network's VXLAN device here, the gateway every host has, and the guests' MTU.
    vxlan: str | None = None
    gateway: str | None = None
    mtu: int | None = None


@dataclass(frozen=True)
class PortRules:
    """One VM NIC: its TAP may only send from its own MAC and (when corral gave it one) its own address."""

    tap: str
    mac: str
    ip: str | None


@dataclass(frozen=True)
class ForwardRules:
    """One port forward whose host port the agent holds (never one it does not: that would capture the traffic
    of whatever host service holds the port)."""

    protocol: str
    host_port: int
    guest_ip: str
    guest_port: int


@dataclass
class Ruleset:
    networks: list[BridgeRules] = field(default_factory=list)
    ports: list[PortRules] = field(default_factory=list)
    forwards: list[ForwardRules] = field(default_factory=list)


def table_tag(home: Path) -> str:
    return hashlib.sha256(str(home.absolute()).encode()).hexdigest()[:8]


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _quoted(names: list[str]) -> list[str]:
    return [f'"{name}"' for name in names]


def render(tag: str, rules: Ruleset) -> str:
    """The nft script: three tables (inet filter, ip nat, bridge anti-spoof), each deleted and re-made."""
    own = [net for net in rules.networks if net.mode != "bridge"]
    nat = [net for net in own if net.mode == "nat"]
    isolated = [net for net in own if net.mode == "isolated"]
    bridges = _quoted([net.bridge for net in own])
    lines: list[str] = []

    def table(family: str, name: str, body: list[str]) -> None:
        lines.extend([f"table {family} {name}", f"delete table {family} {name}", f"table {family} {name} {{"])
        lines.extend(f"  {line}" for line in body)
        lines.append("}")

    filter_body = [
        "chain forward {",
        "  type filter hook forward priority filter; policy accept;",
    ]
    if bridges:
        # Guests of one network talk freely (this matters where br_netfilter sends bridged frames through here).
        filter_body += [f'  iifname "{net.bridge}" oifname "{net.bridge}" accept' for net in own]
        # An isolated guest has no way out, not even to a port forward of the host (the forward's DNAT would
        # otherwise turn its packet to the gateway into one routed to another network's guest).
        filter_body += [f'  iifname "{net.bridge}" drop' for net in isolated]
        filter_body += [
            f"  oifname {_set(bridges)} ct state established,related accept",
            f"  oifname {_set(bridges)} ct status dnat accept",
        ]
        # A NAT network may go out through the host's routes, but never into another corral network.
        for net in nat:
            filter_body.append(f'  iifname "{net.bridge}" ip saddr {net.subnet} oifname != {_set(bridges)} accept')
        filter_body += [f"  iifname {_set(bridges)} drop", f"  oifname {_set(bridges)} drop"]
    filter_body += ["}"]
    if bridges:
        # route_localnet (set on corral's bridges so forwards work through 127.0.0.1) would also let a guest send
        # packets to 127.0.0.1 on its gateway and reach the host's loopback-only services: drop them first.
        filter_body += [
            "chain prerouting {",
            "  type filter hook prerouting priority raw; policy accept;",
            f"  iifname {_set(bridges)} ip daddr 127.0.0.0/8 counter drop",
            "}",
        ]
    filter_body += ["chain input {", "  type filter hook input priority filter; policy accept;"]
    # Isolated guests reach DHCP and DNS on their gateway and nothing else of the host.
    for net in isolated:
        filter_body += [
            f'  iifname "{net.bridge}" udp dport {{ 53, 67 }} accept',
            f'  iifname "{net.bridge}" tcp dport 53 accept',
            f'  iifname "{net.bridge}" ct state established,related accept',
            f'  iifname "{net.bridge}" drop',
        ]
    filter_body.append("}")
    table("inet", f"corral_{tag}", filter_body)

    nat_body = ["chain postrouting {", "  type nat hook postrouting priority srcnat; policy accept;"]
    for net in nat:
        nat_body.append(f"  ip saddr {net.subnet} ip daddr != {net.subnet} masquerade")
    # Forwards reached from the host itself through 127.0.0.1 leave with a loopback source: rewrite it.
    if rules.forwards and bridges:
        nat_body.append(f"  ip saddr 127.0.0.0/8 oifname {_set(bridges)} masquerade")
    nat_body += ["}"]
    dnat = [
        f"  fib daddr type local {fwd.protocol} dport {fwd.host_port} dnat to {fwd.guest_ip}:{fwd.guest_port}"
        for fwd in rules.forwards
    ]
    nat_body += ["chain prerouting {", "  type nat hook prerouting priority dstnat; policy accept;", *dnat, "}"]
    nat_body += ["chain output {", "  type nat hook output priority -100; policy accept;", *dnat, "}"]
    table("ip", f"corral_{tag}_nat", nat_body)

    bridge_body = ["chain prerouting {", "  type filter hook prerouting priority filter; policy accept;"]
    for port in rules.ports:
        bridge_body.append(f'  iifname "{port.tap}" ether saddr != {port.mac} drop')
        bridge_body.append(f'  iifname "{port.tap}" arp saddr ether != {port.mac} drop')
        if port.ip:
            bridge_body.append(f'  iifname "{port.tap}" ip saddr != {{ 0.0.0.0, {port.ip} }} drop')
            bridge_body.append(f'  iifname "{port.tap}" arp saddr ip != {port.ip} drop')
    overlays = [net for net in own if net.vxlan]
    for net in overlays:
        # Each host answers for the gateway and DHCP of its own guests: neither crosses to another host.
        vx = f'"{net.vxlan}"'
        bridge_body.append(f"  iifname {vx} udp dport {{ 67, 68 }} drop")
        if net.gateway:
            bridge_body.append(f"  iifname {vx} arp daddr ip {net.gateway} drop")
            bridge_body.append(f"  iifname {vx} arp saddr ip {net.gateway} drop")
    bridge_body.append("}")
    if overlays:
        out = []
        for net in overlays:
            vx = f'"{net.vxlan}"'
            out.append(f"  oifname {vx} udp dport {{ 67, 68 }} drop")
            if net.gateway:
                out.append(f"  oifname {vx} arp daddr ip {net.gateway} drop")
                out.append(f"  oifname {vx} arp saddr ip {net.gateway} drop")
        clamp = []
        for net in overlays:
            # Guests that ignore DHCP's MTU still get TCP through: their handshakes promise segments that fit.
            mss = (net.mtu or 1450) - 40
            for direction in ("iifname", "oifname"):
                clamp.append(
                    f'  {direction} "{net.vxlan}" tcp flags syn / syn,rst tcp option maxseg size > {mss} '
                    f"tcp option maxseg size set {mss}"
                )
        bridge_body += [
            "chain forward {",
            "  type filter hook forward priority filter; policy accept;",
            *out,
            *clamp,
            "}",
        ]
        bridge_body += ["chain output {", "  type filter hook output priority filter; policy accept;", *out, "}"]
    table("bridge", f"corral_{tag}", bridge_body)
    return "\n".join(lines) + "\n"


def render_removal(tag: str) -> str:
    lines = []
    for family, name in (("inet", f"corral_{tag}"), ("ip", f"corral_{tag}_nat"), ("bridge", f"corral_{tag}")):
        lines += [f"table {family} {name}", f"delete table {family} {name}"]
    return "\n".join(lines) + "\n"


def nft_binary() -> str:
    found = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if Path(p).exists()), None)
    if found is None:
        raise EngineError(
            "nft (nftables) is not installed: NAT and isolation rules cannot be set",
            "install it: apt-get install nftables",
        )
    return found


def load(script: str) -> None:
    result = subprocess.run([nft_binary(), "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise EngineError(
            f"nft refused corral's rules: {result.stderr.strip()[:400]}",
            "check that the kernel has nf_tables (modprobe nf_tables) and see `nft list ruleset`",
        )


def enable_forwarding() -> None:
    """NAT needs the host to route; like libvirt, corral turns it on and leaves it on."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1\n")
