import pytest

from corral.cluster import placement
from corral.errors import Conflict, InsufficientResources, NotFound
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


# -- a pool of hosts: filters, weights, groups, dry runs -------------------------------------------------------


def _host(session, name, cpus=4, memory=8 << 30, **extra):
    session.add(
        Host(
            name=name,
            cpus=cpus,
            memory=memory,
            storage_total=100 << 30,
            storage_free=90 << 30,
            qemu_version="7.2.22",
            cpu_overcommit=1.0,
            memory_overcommit=1.0,
            reserved_memory=0,
            **extra,
        )
    )


def _place(session, name, **hints):
    """What the control plane does for a create: pick, then write the VM row on that host."""
    spec = VMSpec(name=name, image="tiny", cpus=hints.pop("cpus", 1), memory=hints.pop("memory", 1 << 30))
    host = placement.pick_host(session, spec, hints.pop("wanted", None), **hints)
    policy = placement.group_policy(session, "default", hints.get("group"), hints.get("policy"))
    session.add(
        VM(
            name=name,
            spec=spec.model_dump(mode="json"),
            host=host.name,
            desired_state="running",
            placement_group=hints.get("group"),
            placement_policy=policy,
        )
    )
    session.flush()
    return host.name


@pytest.fixture
def pool(store):
    with store.session() as session:
        for name in ("a", "b", "c"):
            _host(session, name)
    return store


def test_spread_takes_the_least_allocated_host_and_pack_the_fullest(pool):
    with pool.session() as session:
        first = [_place(session, f"s{i}") for i in range(3)]
        assert sorted(first) == ["a", "b", "c"]
        placement.configure("pack")
        try:
            packed = [_place(session, f"p{i}") for i in range(3)]
        finally:
            placement.configure("spread")
        assert len(set(packed)) == 1


def test_drained_unreachable_and_offline_hosts_are_skipped(pool):
    from datetime import timedelta

    from corral.store.models import utcnow

    with pool.session() as session:
        hosts = {h.name: h for h in session.query(Host)}
        hosts["a"].drained = True
        hosts["b"].heartbeat_at = utcnow() - timedelta(hours=1)
        assert {_place(session, f"v{i}") for i in range(4)} == {"c"}
        hosts["c"].state = "offline"
        with pytest.raises(InsufficientResources, match="a: host is drained; b: host is unreachable; c: host is off"):
            _place(session, "late")


def test_an_unreachable_host_is_marked_by_the_control_plane(pool):
    from datetime import timedelta

    from corral.cluster import hosts as pool_hosts
    from corral.store.models import utcnow

    with pool.session() as session:
        session.query(Host).filter_by(name="b").one().heartbeat_at = utcnow() - timedelta(hours=1)
    with pool.session() as session:
        assert pool_hosts.mark_unreachable(session) == 1
    with pool.session() as session:
        assert {h.name: h.state for h in session.query(Host)} == {"a": "online", "b": "unreachable", "c": "online"}


def test_anti_affinity_spreads_a_group_and_refuses_a_fourth_member(pool):
    with pool.session() as session:
        _place(session, "x0", cpus=3)  # "a" is fuller, but anti-affinity, not weight, decides below
        hosts = [_place(session, f"g{i}", group="web", policy="anti-affinity") for i in range(3)]
        assert sorted(hosts) == ["a", "b", "c"]
        with pytest.raises(InsufficientResources, match="anti-affinity"):
            _place(session, "g3", group="web")


def test_affinity_keeps_a_group_on_one_host_until_it_is_full(pool):
    with pool.session() as session:
        hosts = {_place(session, f"g{i}", group="db", policy="affinity", memory=2 << 30) for i in range(4)}
        assert len(hosts) == 1
        with pytest.raises(InsufficientResources, match="left"):
            _place(session, "g4", group="db", memory=2 << 30)


def test_a_group_keeps_the_policy_it_was_made_with(pool):
    with pool.session() as session:
        _place(session, "g0", group="web", policy="anti-affinity")
        with pytest.raises(Conflict, match="group 'web' is anti-affinity"):
            _place(session, "g1", group="web", policy="affinity")


def test_accelerator_and_wanted_host_filters(pool):
    with pool.session() as session:
        session.query(Host).filter_by(name="b").one().accel = "kvm"
        assert _place(session, "k", accel="kvm") == "b"
        assert _place(session, "w", wanted="c") == "c"
        with pytest.raises(NotFound, match="not registered"):
            _place(session, "n", wanted="nope")


def test_dry_run_explains_every_host(pool):
    with pool.session() as session:
        session.query(Host).filter_by(name="a").one().drained = True
        _place(session, "big", cpus=4)
        request = placement.PlacementRequest(cpus=2, memory=1 << 30)
        plan = placement.plan(session, request)
        verdicts = {v.host: v for v in plan.hosts}
        assert verdicts["a"].reason == "host is drained" and not verdicts["a"].fits
        assert plan.chosen in ("b", "c") and verdicts[plan.chosen].chosen
        full = next(v for v in plan.hosts if v.host not in ("a", plan.chosen))
        assert "vCPUs left" in full.reason
        assert session.query(VM).count() == 1  # nothing made


def test_place_many_balances_and_never_overbooks(store):
    with store.session() as session:
        for index in range(10):
            _host(session, f"h{index:02d}", cpus=8, memory=16 << 30)
    requests = [placement.PlacementRequest(cpus=1, memory=2 << 30) for _ in range(85)]
    with store.session() as session:
        chosen = placement.place_many(session, requests)
    assert chosen.count(None) == 5  # 10 hosts x 8 slots of 2 GiB = 80
    counts = {name: chosen.count(name) for name in set(chosen) - {None}}
    assert set(counts.values()) == {8}
