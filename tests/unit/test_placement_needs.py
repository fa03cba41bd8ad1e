"""Placement filters for what a VM needs besides capacity: the uplink bridge of a bridge-mode network (as the
hosts' heartbeats report their bridges), an agent that can make bridges at all, and attached volumes that tie a
VM to the host (or the shared pool) they live in. Each host's reason is what `vm create --dry-run` prints."""

from __future__ import annotations

from typing import Any

import pytest

from corral.cluster import placement
from corral.errors import InsufficientResources
from corral.spec.vm import NicSpec, VMSpec
from corral.store.models import Host, Network, Volume


def _hosts(store: Any, usage: dict[str, dict[str, Any]]) -> None:
    with store.session() as session:
        for name, used in usage.items():
            session.add(
                Host(
                    name=name,
                    cpus=4,
                    memory=8 << 30,
                    storage_total=100 << 30,
                    storage_free=100 << 30,
                    qemu_version="7.2.22",
                    reserved_memory=0,
                    usage=used,
                )
            )
        session.add(Network(name="lan", mode="bridge", uplink="br0", bridge="br0", state="ready"))
        session.add(
            Network(name="nat1", mode="nat", subnet="10.87.9.0/24", gateway="10.87.9.1", bridge="crlx", state="ready")
        )


def _plan(store: Any, spec: VMSpec, volumes: list[str] = ()) -> dict[str, str]:  # type: ignore[assignment]
    with store.session() as session:
        attached = session.query(Volume).filter(Volume.name.in_(list(volumes))).all()
        request = placement.PlacementRequest.of(spec, **placement.needs(session, spec, "default", attached))
        result = placement.plan(session, request)
    return {v.host: ("chosen" if v.chosen else v.reason if not v.fits else "fits") for v in result.hosts}


def _spec(*networks: str) -> VMSpec:
    return VMSpec(
        name="v",
        image="tiny",
        nics=[NicSpec(network=n, mac=f"52:54:00:00:00:0{i}", slot=i) for i, n in enumerate(networks)],
    )


def test_a_bridge_mode_network_goes_only_where_its_uplink_is(store: Any) -> None:
    _hosts(store, {"h1": {"bridges": ["crl1"]}, "h2": {"bridges": ["br0", "crl1"]}})
    assert _plan(store, _spec("lan")) == {
        "h1": "no bridge br0 here (the uplink of a bridge-mode network)",
        "h2": "chosen",
    }
    # nat (and isolated) networks are made on any host; user-mode NICs need nothing.
    assert set(_plan(store, _spec("nat1", "user")).values()) == {"chosen", "fits"}
    with store.session() as session, pytest.raises(InsufficientResources, match="no bridge br0"):
        placement.pick_host(session, _spec("lan"), "h1")
    with store.session() as session:
        assert placement.pick_host(session, _spec("lan")).name == "h2"


def test_hosts_that_reported_nothing_are_not_judged_and_non_root_agents_make_no_bridges(store: Any) -> None:
    _hosts(store, {"h1": {}, "h2": {"bridges": [], "networking": False}})
    verdicts = _plan(store, _spec("nat1"))
    assert verdicts["h1"] == "chosen"
    assert verdicts["h2"] == "its agent cannot make bridges (not root): no corral networks here"
    assert set(_plan(store, _spec("user")).values()) == {"chosen", "fits"}


def test_an_attached_volume_ties_the_vm_to_its_host_or_a_host_sharing_the_pool(store: Any) -> None:
    _hosts(store, {"h1": {"pool_id": "p1"}, "h2": {"pool_id": "p1"}, "h3": {"pool_id": "p3"}})
    with store.session() as session:
        session.add(Volume(name="data1", host="h1", pool="default", path="data1.qcow2", size=1 << 30))
    verdicts = _plan(store, _spec("user"), ["data1"])
    assert verdicts["h3"] == "volume data1 is in storage pool default of host h1, not shared here"
    assert {verdicts["h1"], verdicts["h2"]} == {"chosen", "fits"}


def test_a_batch_keeps_hosts_that_only_one_kind_of_request_cannot_use(store: Any) -> None:
    """place_many drops hosts per request shape: a host without the uplink stays open to plain VMs."""
    _hosts(store, {"h1": {"bridges": []}, "h2": {"bridges": ["br0"]}})
    with store.session() as session:
        bridged = placement.PlacementRequest.of(_spec("lan"), **placement.needs(session, _spec("lan")))
        plain = placement.PlacementRequest.of(_spec("user"))
        chosen = placement.place_many(session, [bridged, bridged, plain, plain])
    assert chosen[:2] == ["h2", "h2"] and "h1" in chosen[2:]
