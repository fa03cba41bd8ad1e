import pytest

from corral.cluster import placement
from corral.errors import Conflict, InsufficientResources
from corral.spec.vm import VMSpec
from corral.store.models import VM, Host


def _vm(session, name, cpus=1, memory=1 << 30, state="running"):
    spec = VMSpec(name=name, image="tiny", cpus=cpus, memory=memory)
    session.add(VM(name=name, spec=spec.model_dump(mode="json"), host="h1", desired_state=state))


def test_a_vm_that_fits_gets_the_host(store, host):
    with store.session() as session:
        assert placement.pick_host(session, VMSpec(name="a", image="tiny")).name == "h1"


def test_more_cpus_than_the_host_has_is_refused(store, host):
    with store.session() as session, pytest.raises(InsufficientResources, match="vCPUs"):
        placement.pick_host(session, VMSpec(name="a", image="tiny", cpus=3))


def test_more_memory_than_the_host_has_is_refused(store, host):
    with store.session() as session, pytest.raises(InsufficientResources, match="memory"):
        placement.pick_host(session, VMSpec(name="a", image="tiny", memory="8G"))


def test_running_vms_count_and_stopped_ones_do_not(store, host):
    with store.session() as session:
        _vm(session, "a", memory=2 << 30)
        _vm(session, "b", memory=2 << 30, state="stopped")
        used = placement.allocated(session, "h1")
        assert (used.cpus, used.memory, used.vms) == (1, 2 << 30, 1)
        placement.check_fits(session, session.query(Host).one(), VMSpec(name="c", image="tiny", memory="2G"))
        with pytest.raises(InsufficientResources, match="left"):
            placement.check_fits(session, session.query(Host).one(), VMSpec(name="c", image="tiny", memory="3G"))


def test_cpu_overcommit_ratio_is_the_limit(store, host):
    with store.session() as session:
        for index in range(4):  # 2 CPUs x ratio 2.0
            _vm(session, f"vm{index}", memory=256 << 20)
        with pytest.raises(InsufficientResources, match="vCPUs left"):
            placement.pick_host(session, VMSpec(name="x", image="tiny"))


def test_host_without_qemu_cannot_take_vms(store, host):
    with store.session() as session:
        session.query(Host).one().qemu_version = None
    with store.session() as session, pytest.raises(Conflict, match="QEMU is not installed"):
        placement.pick_host(session, VMSpec(name="a", image="tiny"))


def test_no_online_host(store):
    with store.session() as session, pytest.raises(Conflict, match="no host agent"):
        placement.pick_host(session, VMSpec(name="a", image="tiny"))
