"""The overlay's pieces that need no pool: the bridge rules that keep each host's gateway and DHCP local, and the
refusals of a bad VNI or MTU."""

from __future__ import annotations

import pytest

from corral.errors import InvalidInput
from corral.host import dnsmasq, firewall
from corral.spec.network import NetworkSpec


def test_gateway_arp_and_dhcp_never_cross_the_vxlan_device() -> None:
    overlay = firewall.BridgeRules("crlaaaa", "nat", "10.9.0.0/24", "crxaaaa", "10.9.0.1", 1450)
    script = firewall.render("t", firewall.Ruleset(networks=[overlay]))
    for direction in ("iifname", "oifname"):
        assert f'{direction} "crxaaaa" udp dport {{ 67, 68 }} drop' in script
        assert f'{direction} "crxaaaa" arp daddr ip 10.9.0.1 drop' in script
        assert f'{direction} "crxaaaa" tcp flags syn / syn,rst tcp option maxseg size > 1410' in script
    single = firewall.render("t", firewall.Ruleset(networks=[firewall.BridgeRules("crlaaaa", "nat", "10.9.0.0/24")]))
    assert "crx" not in single and "maxseg" not in single


def test_dhcp_tells_guests_the_overlay_mtu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    try:
        args = dnsmasq.command(tmp_path, "crlaaaa", "10.9.0.0/24", "10.9.0.1", isolated=False, mtu=1450)
    except Exception as exc:  # no dnsmasq binary here
        pytest.skip(str(exc))
    assert "--dhcp-option=option:mtu,1450" in args
    assert not any("mtu" in arg for arg in dnsmasq.command(tmp_path, "crlaaaa", "10.9.0.0/24", "10.9.0.1", False))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"vni": 0}, "VNI 0 is out of range"),
        ({"vni": 1 << 24}, "out of range"),
        ({"mtu": 100}, "MTU 100 is out of range"),
        ({"mode": "bridge", "uplink": "br0", "vni": 5}, "no VNI or MTU"),
    ],
)
def test_bad_vni_or_mtu_is_refused(fields: dict[str, object], words: str) -> None:
    with pytest.raises((InvalidInput, ValueError), match=words):
        NetworkSpec.model_validate({"name": "n1", **fields})
