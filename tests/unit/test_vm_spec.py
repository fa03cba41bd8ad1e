import pytest

from corral.errors import InvalidInput
from corral.spec.vm import DiskSpec, NicSpec, VMSpec


def test_defaults_give_one_user_nic_and_256m():
    spec = VMSpec(name="demo", image="tiny")
    assert spec.memory == 256 << 20
    assert spec.cpus == 1
    assert [nic.network for nic in spec.nics] == ["user"]


def test_memory_accepts_human_sizes():
    assert VMSpec(name="demo", image="tiny", memory="1G").memory == 1 << 30


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory", "-1"),
        ("memory", "12Q"),
        ("memory", "16M"),
        ("cpus", 0),
        ("cpus", 1000),
        ("name", "Bad"),
        ("image", "../etc"),
    ],
)
def test_bad_fields_are_invalid_input(field, value):
    with pytest.raises(InvalidInput):
        VMSpec(**{"name": "demo", "image": "tiny", field: value})


def test_disk_needs_exactly_one_source():
    with pytest.raises(InvalidInput):
        DiskSpec()
    with pytest.raises(InvalidInput):
        DiskSpec(size="1G", volume="data")
    assert DiskSpec(size="2G").size == 2 << 30


@pytest.mark.parametrize("mac", ["52:54:00:zz:00:01", "01:00:00:00:00:01", "52:54:00:00:01"])
def test_invalid_macs(mac):
    with pytest.raises(InvalidInput):
        NicSpec(mac=mac)


def test_with_macs_assigns_unique_stable_macs():
    spec = VMSpec(name="demo", image="tiny", nics=[NicSpec(), NicSpec(), NicSpec(mac="52:54:00:00:00:01")])
    filled = spec.with_macs()
    macs = [nic.mac for nic in filled.nics]
    assert all(macs) and len(set(macs)) == 3
    assert macs[2] == "52:54:00:00:00:01"
    assert filled.with_macs().nics == filled.nics


def test_duplicate_macs_rejected():
    with pytest.raises(InvalidInput):
        VMSpec(name="demo", image="tiny", nics=[NicSpec(mac="52:54:00:00:00:01"), NicSpec(mac="52:54:00:00:00:01")])


def test_network_names_follow_the_name_rule():
    assert NicSpec(network="lan").network == "lan"
    with pytest.raises(InvalidInput):
        NicSpec(network="LAN/../x")


def test_nic_slots_are_assigned_once_and_kept():
    spec = VMSpec(name="demo", image="tiny", nics=[NicSpec(), NicSpec(network="lan", slot=0)]).with_macs()
    assert [nic.slot for nic in spec.nics] == [1, 0]
    assert spec.with_macs().nics == spec.nics
    with pytest.raises(InvalidInput):
        VMSpec(name="demo", image="tiny", nics=[NicSpec(slot=2), NicSpec(slot=2)])
