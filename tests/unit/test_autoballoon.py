"""Automatic ballooning: the pure decision of a round (targets, steps, floors, stale statistics, busy VMs), and
`vm set --min-memory` on the control plane (bounds, nothing changed on bad input) on both stores."""

import pytest

from corral.cluster.resize import VMResize, resize
from corral.errors import InvalidInput
from corral.host.autoballoon import Guest, Policy, decide
from corral.spec.vm import VMSpec, memory_floor
from corral.store.models import VM

MiB = 1 << 20
POLICY = Policy(target=0.8, step=0.05, guest_min_free=0.15, band=0.05, stale_after=10.0)


def guest(name: str, actual: int = 1024, available: int | None = 800, age: float | None = 1.0, **fields) -> Guest:
    values = {"memory": 1024 * MiB, "floor": 256 * MiB, "busy": None, **fields}
    return Guest(
        name, name, actual=actual * MiB, available=None if available is None else available * MiB, stats_age=age,
        **values,
    )  # fmt: skip


def by_name(moves):
    return {move.name: (move.before // MiB, move.after // MiB) for move in moves}


def test_under_the_target_with_full_guests_nothing_moves():
    assert decide(700 * MiB, 1000 * MiB, [guest("a"), guest("b")], POLICY) == []


def test_over_the_target_idle_guests_shrink_one_step_the_freest_first_and_no_more_than_the_excess():
    # 900 of 1000 used, target 800: 100 MiB too much; a step is 5 % of 1 GiB = 51 MiB.
    moves = decide(900 * MiB, 1000 * MiB, [guest("a", available=300), guest("b", available=700)], POLICY)
    assert by_name(moves) == {"b": (1024, 973), "a": (1024, 975)}
    assert sum(move.before - move.after for move in moves) == 100 * MiB
    assert all("over the target" in move.reason for move in moves)
    # A small excess takes only what is needed, from the freest guest alone.
    assert by_name(decide(810 * MiB, 1000 * MiB, [guest("a", available=300), guest("b")], POLICY)) == {
        "b": (1024, 1014)
    }


def test_never_under_the_floor_nor_leaving_the_guest_short_of_free_memory():
    at_floor = guest("floor", actual=256)
    near_floor = guest("near", actual=270)
    tight = guest("tight", available=170)  # 15 % of 1024 is 153.6: it may give (170 - 153.6) / 0.85 = 19 MiB
    moves = decide(2000 * MiB, 1000 * MiB, [at_floor, near_floor, tight], POLICY)
    assert by_name(moves) == {"near": (270, 256), "tight": (1024, 1005)}


def test_stale_or_missing_statistics_and_busy_vms_are_never_shrunk():
    guests = [
        guest("stale", age=30.0),
        guest("never", available=None, age=None),
        guest("clock", age=-5.0),
        guest("migrating", busy="a vm.migrate job is running"),
    ]
    assert decide(2000 * MiB, 1000 * MiB, guests, POLICY) == []


def test_memory_is_given_back_below_the_band_least_free_first_and_within_the_room():
    guests = [guest("a", actual=512, available=400), guest("b", actual=512, available=100)]
    # 600 of 1000 used: the mark is 800 - 50 = 750, room 150; each step is 51 MiB.
    moves = decide(600 * MiB, 1000 * MiB, guests, POLICY)
    assert by_name(moves) == {"b": (512, 563), "a": (512, 563)}
    assert all("under the target" in move.reason for move in moves)
    # Inside the band nothing moves either way (no flapping around the target).
    assert decide(780 * MiB, 1000 * MiB, guests, POLICY) == []
    # Never above the VM's memory; stale statistics do not keep memory from going back.
    assert by_name(decide(0, 1000 * MiB, [guest("c", actual=1000, age=60.0)], POLICY)) == {"c": (1000, 1024)}
    # A busy VM is not touched even to give back.
    assert decide(0, 1000 * MiB, [guest("d", actual=512, busy="a vm.resize job is running")], POLICY) == []


def test_a_guest_low_on_free_memory_gets_memory_back_even_under_pressure():
    moves = decide(2000 * MiB, 1000 * MiB, [guest("low", actual=512, available=40), guest("idle")], POLICY)
    assert by_name(moves)["low"] == (512, 563)
    assert "low on free memory" in moves[0].reason
    assert "idle" in by_name(moves)  # the others still shrink for the host


def test_default_floor_is_the_larger_of_128m_and_a_quarter_and_never_above_memory():
    assert memory_floor(256 * MiB) == 128 * MiB
    assert memory_floor(4096 * MiB) == 1024 * MiB
    assert memory_floor(64 * MiB) == 64 * MiB
    assert memory_floor(1024 * MiB, 512 * MiB) == 512 * MiB


def _vm(store, host, **spec_fields):
    with store.session() as session:
        vm = VM(name="demo", host=host, spec=VMSpec(name="demo", image="tiny", **spec_fields).model_dump(mode="json"))
        session.add(vm)
    return "demo"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"min_memory": "512M"}, "--min-memory 512M is above the VM's memory, 256M"),
        ({"min_memory": "32M"}, "--min-memory 32M is below the least floor, 64M"),
        ({"min_memory": "lots"}, "invalid size 'lots'"),
    ],
)
def test_bad_min_memory_is_refused_and_changes_nothing(store, host, change, message):
    name = _vm(store, host, memory="256M")
    with pytest.raises(InvalidInput, match=message), store.session() as session:
        resize(session, name, VMResize(**change))
    with store.session() as session:
        assert session.query(VM).one().min_memory is None


def test_min_memory_is_stored_and_a_shrink_under_it_is_refused(store, host):
    name = _vm(store, host, memory="512M")
    with store.session() as session:
        resize(session, name, VMResize(min_memory="256M"))
    with store.session() as session:
        assert session.query(VM).one().min_memory == 256 * MiB
    with pytest.raises(InvalidInput, match="floor 256M is above the VM's memory, 128M"), store.session() as session:
        resize(session, name, VMResize(memory="128M"))
    with store.session() as session:
        vm = session.query(VM).one()
        assert (vm.spec["memory"], vm.min_memory) == (512 * MiB, 256 * MiB)
        resize(session, name, VMResize(memory="128M", min_memory="128M"))
    with store.session() as session:
        vm = session.query(VM).one()
        assert (vm.spec["memory"], vm.min_memory) == (128 * MiB, 128 * MiB)
