"""The network defences without a daemon: the port range setting, the port hold, the uplink rules and the
firewall script. Fast, no root needed (the attacks themselves are in test_network_attacks.py)."""

from __future__ import annotations

import socket

import pytest

from corral.cluster import networks
from corral.config import Settings
from corral.errors import Conflict, Forbidden, InvalidInput
from corral.host import firewall


@pytest.mark.parametrize("text", ["300-200", "0-10", "1-70000", "20000", "a-b", "-5-10"])
def test_a_bad_port_range_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Settings(port_forward_range=text)


def test_the_port_range_is_inclusive_and_defaults_to_20000_29999() -> None:
    assert Settings().forward_ports == range(20000, 30000)
    assert Settings(port_forward_range=" 100 - 200 ").forward_ports == range(100, 201)


@pytest.mark.parametrize("kind,protocol", [(socket.SOCK_STREAM, "tcp"), (socket.SOCK_DGRAM, "udp")])
@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::1"])
def test_a_port_some_program_holds_cannot_be_held(kind: int, protocol: str, address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, kind) as holder:
        holder.bind((address, 0))
        port = holder.getsockname()[1]
        with pytest.raises(Conflict) as refused:
            networks.hold_port(protocol, port)
        assert refused.value.message == f"host port {port}/{protocol} is in use on the host"


def test_a_held_port_cannot_be_taken_by_a_host_program_and_is_free_once_released() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    held = networks.hold_port("tcp", port)
    try:
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_STREAM) as late, pytest.raises(OSError):
                late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                late.bind((address, port))
    finally:
        for sock in held:
            sock.close()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_uplinks_for_tenants_come_from_the_allowlist_only() -> None:
    with pytest.raises(Forbidden) as refused:
        networks.check_uplink(None, "br9", any_host_bridge=False, allowed=["br0"])  # type: ignore[arg-type]
    assert "br0" in str(refused.value)
    with pytest.raises(InvalidInput):  # corral's naming scheme: refused before the store is asked
        networks.check_uplink(None, "crl12345678", any_host_bridge=True, allowed=[])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        networks.check_uplink(None, "crl12345678", any_host_bridge=False, allowed=["crl12345678"])  # type: ignore[arg-type]


def test_the_firewall_drops_loopback_and_isolated_traffic_before_any_forward() -> None:
    rules = firewall.Ruleset(
        networks=[
            firewall.BridgeRules("crlaaaa", "nat", "10.87.0.0/24"),
            firewall.BridgeRules("crlbbbb", "isolated", "10.87.1.0/24"),
        ],
        forwards=[firewall.ForwardRules("tcp", 20080, "10.87.0.2", 80)],
    )
    script = firewall.render("t", rules)
    assert 'iifname { "crlaaaa", "crlbbbb" } ip daddr 127.0.0.0/8 counter drop' in script
    isolated_drop = script.index('iifname "crlbbbb" drop')
    assert isolated_drop < script.index("ct status dnat accept")
    assert "tcp dport 20080 dnat to 10.87.0.2:80" in script
