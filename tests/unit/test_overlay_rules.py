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


def test_every_reservation_of_the_network_is_a_dns_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DNS pool-wide: dnsmasq names only the MACs it gave a lease itself, so the names of guests on other hosts
    come from the store's reservations, in a hosts file it rereads on SIGHUP."""
    here = dnsmasq.DhcpHost("52:54:00:00:00:0a", "10.9.0.10", "va")
    there = dnsmasq.DhcpHost("52:54:00:00:00:0b", "10.9.0.9", "vb")
    assert dnsmasq.write_hosts(tmp_path, [here, there]) is True
    assert (tmp_path / dnsmasq.NAMES).read_text() == "10.9.0.9 vb\n10.9.0.10 va\n"
    assert (tmp_path / "hosts").read_text() == "52:54:00:00:00:0b,10.9.0.9,vb\n52:54:00:00:00:0a,10.9.0.10,va\n"
    assert dnsmasq.write_hosts(tmp_path, [there, here]) is False  # nothing changed: no SIGHUP
    assert dnsmasq.write_hosts(tmp_path, [here]) is True  # vb left the network: its name goes too
    assert (tmp_path / dnsmasq.NAMES).read_text() == "10.9.0.10 va\n"
    try:
        args = dnsmasq.command(tmp_path, "crlaaaa", "10.9.0.0/24", "10.9.0.1", isolated=True)
    except Exception as exc:  # no dnsmasq binary here
        pytest.skip(str(exc))
    assert f"--addn-hosts={tmp_path / dnsmasq.NAMES}" in args


def test_forwards_follow_their_vm_between_hosts(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A move takes a VM's forwards along: refused to a host where another VM forwards the same port, and the
    agent of the host a VM arrived on by other means (HA) adopts its forwards, unless one clashes there."""
    from sqlalchemy import select

    from corral.cluster import networks as control
    from corral.config import Settings
    from corral.host.networks import NetworkHost
    from corral.spec.vm import VMSpec
    from corral.store import network_queries
    from corral.store.models import VM, PortForward

    with store.session() as session:
        for name, host in (("vx", "h1"), ("vy", "h2"), ("vz", "h3")):
            session.add(VM(name=name, spec=VMSpec(name=name, image="tiny").model_dump(mode="json"), host=host))
        session.flush()
        vms = {vm.name: vm for vm in session.scalars(select(VM))}
        for name, port in (("vx", 20080), ("vy", 20080), ("vz", 20090)):
            session.add(PortForward(vm_id=vms[name].id, host=vms[name].host, host_port=port, guest_port=80))
    with store.session() as session:
        vx = session.scalars(select(VM).where(VM.name == "vx")).one()
        assert control.forwards_clash(session, vx, "h2") == (
            "host port 20080/tcp of its forwards is forwarded there already"
        )
        assert control.forwards_clash(session, vx, "h3") is None
        network_queries.move_forwards(session, vx, "h3")
        vx.host = "h3"
    # vz "restarted" on h1 by HA: h1's agent adopts its forward; vx's on h3 stays put (it moved with the VM).
    with store.session() as session:
        session.scalars(select(VM).where(VM.name == "vz")).one().host = "h1"
    agent = NetworkHost(Settings(home=tmp_path / "home"), store, "h1")
    agent._adopt_forwards()
    with store.reading() as session:
        hosts = {vm: host for vm, host in session.execute(select(VM.name, PortForward.host).join(PortForward))}
    assert hosts == {"vx": "h3", "vy": "h2", "vz": "h1"}
    # vy lands on h3 beside vx's 20080: its forward cannot be adopted and stays where it was, with no rule.
    with store.session() as session:
        session.scalars(select(VM).where(VM.name == "vy")).one().host = "h3"
    NetworkHost(Settings(home=tmp_path / "home"), store, "h3")._adopt_forwards()
    with store.reading() as session:
        assert session.scalars(select(PortForward.host).join(VM).where(VM.name == "vy")).one() == "h2"


def test_a_taken_forwarded_port_refuses_the_move(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Checked by the destination's agent before any byte moves: a forward that could not follow would stop
    working silently after the switchover."""
    import socket
    from types import SimpleNamespace

    from sqlalchemy import select

    from corral.config import Settings
    from corral.errors import Conflict
    from corral.host.network_jobs import check_forwards_free
    from corral.spec.vm import VMSpec
    from corral.store.models import VM, PortForward

    program = socket.socket()  # a host program on a port of the range (IPv4 only: the check sees any address)
    program.bind(("127.0.0.1", 0))
    port = program.getsockname()[1]
    settings = Settings(home=tmp_path / "home", port_forward_range=f"{port}-{port + 1}")
    agent = SimpleNamespace(
        store=store, settings=settings, host_name="h2", networks=SimpleNamespace(holding=lambda *key: False)
    )
    with store.session() as session:
        session.add(VM(name="vx", spec=VMSpec(name="vx", image="tiny").model_dump(mode="json"), host="h1"))
        session.flush()
        vm = session.scalars(select(VM)).one()
        session.add(PortForward(vm_id=vm.id, host="h1", host_port=port, guest_port=80))
        session.expunge(vm)
    try:
        with pytest.raises(Conflict, match=f"VM vx forwards host port {port}/tcp, which is in use on host h2"):
            check_forwards_free(agent, vm)  # type: ignore[arg-type]
    finally:
        program.close()
    check_forwards_free(agent, vm)  # type: ignore[arg-type]  # free now: the move may go
    agent.networks.holding = lambda *key: True  # held here for another VM's forward
    with pytest.raises(Conflict, match="in use on host h2"):
        check_forwards_free(agent, vm)  # type: ignore[arg-type]
