"""The control plane's half of `vm set`: ceilings, the spec a change leads to, and what it refuses."""

import pytest

from corral.cluster.resize import DiskAdd, VMResize, resized_spec
from corral.errors import InvalidInput
from corral.spec.vm import VMSpec

MiB = 1 << 20


def spec(**fields: object) -> VMSpec:
    return VMSpec(name="demo", image="tiny", **fields)


def test_shrinking_keeps_the_old_size_as_the_ceiling_so_it_can_grow_back_live():
    new = resized_spec(spec(memory="256M", cpus=2), VMResize(memory="128M", cpus=1))
    assert (new.memory, new.max_memory, new.boot_memory) == (128 * MiB, 256 * MiB, 256 * MiB)
    assert (new.cpus, new.max_cpus, new.boot_max_cpus) == (1, 2, 2)


def test_growing_within_the_ceiling_keeps_it():
    new = resized_spec(spec(memory="128M", max_memory="1G", cpus=1, max_cpus=4), VMResize(memory="512M", cpus=3))
    assert (new.memory, new.max_memory, new.cpus, new.max_cpus) == (512 * MiB, 1024 * MiB, 3, 4)


def test_growing_a_vm_without_a_ceiling_is_a_change_for_the_next_start():
    new = resized_spec(spec(memory="256M"), VMResize(memory="512M"))
    assert new.memory == 512 * MiB and new.max_memory is None and new.boot_memory == 512 * MiB


@pytest.mark.parametrize(
    ("start", "change", "message"),
    [
        ({"memory": "256M", "max_memory": "256M"}, {"memory": "512M"}, "above the maximum 256M"),
        ({"cpus": 1, "max_cpus": 2}, {"cpus": 3}, "more than the maximum of 2"),
        ({}, {"cpus": 0}, "invalid CPU count 0"),
        ({}, {"memory": "16M"}, "too small"),
        ({"memory": "512M"}, {"max_memory": "256M"}, "above the maximum"),
    ],
)
def test_changes_past_a_limit_are_refused(start, change, message):
    with pytest.raises(InvalidInput, match=message):
        resized_spec(spec(**start), VMResize(**change))


def test_a_request_must_change_something_and_a_disk_needs_one_source():
    with pytest.raises(InvalidInput, match="nothing to change"):
        VMResize()
    with pytest.raises(InvalidInput, match="either a size or an existing volume"):
        DiskAdd()
    with pytest.raises(InvalidInput, match="either a size or an existing volume"):
        DiskAdd(size="1G", volume="v")
    assert DiskAdd(size="2G").size == 2 << 30


def test_ceilings_below_the_size_are_refused_at_create():
    with pytest.raises(InvalidInput, match="above the maximum"):
        spec(memory="512M", max_memory="256M")
    with pytest.raises(InvalidInput, match="more than the maximum"):
        spec(cpus=4, max_cpus=2)
