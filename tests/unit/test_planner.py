"""The balancing and consolidation planners on synthetic pools (affinity, overcommit, unlike hosts), and the
usage history and stored plans on the real store (SQLite and PostgreSQL)."""

import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from corral.cluster import packing_bound, planner, plans, usage
from corral.cluster.placement import HostLoad, PlacementRequest, Policy
from corral.errors import Conflict, InvalidInput
from corral.store import usage as usage_store
from corral.store.models import VM, Host, Plan, UsagePoint

G = 1 << 30


def _host(name, cpus=8, memory=32 * G, cpu_overcommit=1.0, memory_overcommit=1.0, **changes):
    row = SimpleNamespace(
        name=name,
        state="online",
        heartbeat_at=datetime.now(UTC),
        drained=False,
        qemu_version="7.2",
        accel="tcg",
        cpus=cpus,
        memory=memory,
        reserved_memory=0,
        cpu_overcommit=cpu_overcommit,
        memory_overcommit=memory_overcommit,
        storage_total=1 << 40,
        storage_overcommit=1.0,
        usage={},
        standby=False,
    )
    for key, value in changes.items():
        setattr(row, key, value)
    return HostLoad(row, True)


def _pool(hosts, placed, **guest_fields):
    """``placed``: (vm name, host, cpus, memory GiB[, group, policy]) -> the hosts loaded and the guests."""
    guests = []
    for index, item in enumerate(placed):
        name, where, cpus, memory = item[:4]
        group, policy = (item[4], item[5]) if len(item) > 4 else (None, None)
        request = PlacementRequest(
            cpus=cpus, memory=memory * G, group=group, policy=policy if policy == Policy.ANTI_AFFINITY else None
        )
        hosts[where].add(request)
        guests.append(
            planner.Guest(
                id=f"id{index}",
                name=name,
                project="default",
                host=where,
                request=request,
                movable=policy != Policy.AFFINITY,
                **guest_fields.get(name, {}),
            )
        )
    return hosts, guests


# -- balancing --------------------------------------------------------------------------------------------------


def test_busy_vms_on_one_host_are_spread_and_the_score_falls():
    hosts = {name: _host(name) for name in ("a", "b", "c")}
    busy = {f"vm{i}": {"cpu_used": 1.8, "memory_used": 2 * G} for i in range(4)}
    hosts, guests = _pool(hosts, [(f"vm{i}", "a", 2, 2) for i in range(4)], **busy)
    result = planner.balance(hosts, guests, threshold=3)
    assert result.moves, result.summary()
    assert result.score_after < result.score_before
    assert {move.target for move in result.moves} == {"b", "c"}
    assert all(move.source == "a" for move in result.moves)


def test_a_low_threshold_asks_for_bigger_gains():
    hosts = {name: _host(name) for name in ("a", "b")}
    # a little imbalance: one small VM more on a
    hosts, guests = _pool(
        hosts,
        [("x", "a", 1, 1), ("y", "a", 1, 1), ("z", "b", 1, 1)],
        x={"cpu_used": 0.5},
        y={"cpu_used": 0.5},
        z={"cpu_used": 0.5},
    )
    assert planner.balance(hosts, guests, threshold=1).moves == []


def test_balancing_respects_anti_affinity_and_capacity():
    hosts = {"a": _host("a"), "b": _host("b"), "small": _host("small", cpus=1, memory=1 * G)}
    placed = [
        ("w1", "a", 2, 4, "web", Policy.ANTI_AFFINITY),
        ("w2", "b", 2, 4, "web", Policy.ANTI_AFFINITY),
        ("db", "a", 2, 4),
    ]
    busy = {name: {"cpu_used": 2.0} for name in ("w1", "w2", "db")}
    hosts, guests = _pool(hosts, placed, **busy)
    result = planner.balance(hosts, guests, threshold=5)
    for move in result.moves:
        assert move.target != "small"  # too small for any of them
        assert move.vm != "w1" or move.target != "b"  # never beside its group's other member


def test_affinity_groups_and_drained_or_standby_hosts_are_left_alone():
    hosts = {"a": _host("a"), "b": _host("b", drained=True), "c": _host("c", standby=True)}
    hosts, guests = _pool(
        hosts,
        [("p", "a", 2, 2, "pair", Policy.AFFINITY), ("q", "a", 2, 2, "pair", Policy.AFFINITY)],
        p={"cpu_used": 2.0},
        q={"cpu_used": 2.0},
    )
    assert planner.balance(hosts, guests, threshold=5).moves == []


# -- consolidation ----------------------------------------------------------------------------------------------


def test_consolidation_frees_hosts_keeps_n_plus_1_and_matches_the_optimum():
    random.seed(7)
    hosts = {f"h{i}": _host(f"h{i}") for i in range(8)}
    placed = [(f"vm{i}", f"h{i % 8}", random.choice([1, 2]), random.choice([1, 2, 4])) for i in range(16)]
    hosts, guests = _pool(hosts, placed)
    result = planner.consolidate(hosts, guests)
    packing_bound.exact(hosts, guests, result, True, 5.0)
    assert result.freed and result.hosts_used == 8 - len(result.freed)
    assert result.optimum_hosts_used is not None, result.summary()
    assert result.hosts_used >= result.optimum_hosts_used
    assert result.gap is not None and result.gap <= 0.34
    awake = [load for name, load in hosts.items() if name not in result.freed]
    # N+1: the awake hosts less their largest still hold every allocation.
    assert sum(h.cpu_cap for h in awake) - max(h.cpu_cap for h in awake) >= sum(h.cpus_alloc for h in awake)
    for name in result.freed:
        assert hosts[name].vms == 0
    assert all(hosts[name].cpus_alloc <= hosts[name].cpu_cap for name in hosts)


def test_consolidation_with_unlike_hosts_and_overcommit_uses_the_big_ones():
    hosts = {
        "big1": _host("big1", cpus=16, memory=64 * G, cpu_overcommit=4.0),
        "big2": _host("big2", cpus=16, memory=64 * G, cpu_overcommit=4.0),
        **{f"s{i}": _host(f"s{i}", cpus=2, memory=4 * G) for i in range(4)},
    }
    placed = [(f"vm{i}", f"s{i % 4}", 2, 2) for i in range(4)] + [("x", "big1", 8, 8)]
    hosts, guests = _pool(hosts, placed)
    result = planner.consolidate(hosts, guests)
    packing_bound.exact(hosts, guests, result, True, 5.0)
    assert set(result.freed) >= {"s0", "s1", "s2", "s3"}
    assert hosts["big1"].cpus_alloc + hosts["big2"].cpus_alloc == 16
    assert result.gap == 0.0


def test_consolidation_never_splits_anti_affinity_or_moves_pinned_vms():
    hosts = {f"h{i}": _host(f"h{i}") for i in range(4)}
    placed = [
        ("a1", "h0", 1, 1, "g", Policy.ANTI_AFFINITY),
        ("a2", "h1", 1, 1, "g", Policy.ANTI_AFFINITY),
        ("a3", "h2", 1, 1, "g", Policy.ANTI_AFFINITY),
        ("p", "h3", 1, 1, "pair", Policy.AFFINITY),
    ]
    hosts, guests = _pool(hosts, placed)
    result = planner.consolidate(hosts, guests)
    packing_bound.exact(hosts, guests, result, True, 5.0)
    on = {}
    for guest in guests:
        on.setdefault(guest.host, []).append(guest.name)
    assert all(len([n for n in names if n.startswith("a")]) <= 1 for names in on.values())
    assert "h3" not in result.freed  # its VM is pinned
    assert result.optimum_hosts_used is not None and result.hosts_used >= result.optimum_hosts_used


def test_large_pools_get_a_bound_from_host_shapes():
    hosts = {f"h{i}": _host(f"h{i}", cpus=[8, 16][i % 2], memory=[32, 64][i % 2] * G) for i in range(300)}
    placed = [(f"vm{i}", f"h{i % 300}", 1 + i % 3, 1 + i % 5) for i in range(1200)]
    hosts, guests = _pool(hosts, placed)
    result = planner.consolidate(hosts, guests)
    packing_bound.exact(hosts, guests, result, True, 5.0)
    assert result.bound_hosts_used is not None and result.optimum_hosts_used is None
    assert result.bound_hosts_used <= result.hosts_used
    assert result.gap is not None and result.gap <= 0.1, result.summary()


# -- the store: usage history and plans -------------------------------------------------------------------------


def _stats(at, cpu_seconds, memory=G, read=0):
    return {
        "sampled_at": at,
        "cpu_seconds": cpu_seconds,
        "memory_bytes": memory,
        "disks": {"vda": {"read_bytes": read, "write_bytes": 0}},
        "nics": {},
    }


def test_usage_points_become_rates_roll_up_and_prune(store):
    start = datetime.now(UTC).timestamp() - 3 * 3600
    with store.session() as session:
        for step in range(1, 60):  # ten minutes of samples, three hours ago
            before, now = start + (step - 1) * 10, start + step * 10
            usage_store.record(
                session,
                "h1",
                [
                    (
                        "vm1",
                        _stats(before, step * 5.0, read=step * 1000),
                        _stats(now, (step + 1) * 5.0, read=(step + 1) * 1000),
                    )
                ],
                load=1.0,
            )
    with store.session() as session:
        raw = session.query(UsagePoint).filter_by(kind="vm", resolution=0).order_by(UsagePoint.at).first()
        assert raw.cpu == pytest.approx(0.5) and raw.disk_read == pytest.approx(100.0)
        host = session.query(UsagePoint).filter_by(kind="host", resolution=0).first()
        assert host.cpu == pytest.approx(0.5) and host.load == 1.0
        done = usage_store.maintain(session, "h1", now=datetime.fromtimestamp(start + 700, UTC))
        assert done["minute"] >= 9
    with store.session() as session:
        done = usage_store.maintain(session, "h1")  # now: the raw points are past their hour
        assert done["pruned"] >= 59
        assert session.query(UsagePoint).filter_by(resolution=0).count() == 0
        assert session.query(UsagePoint).filter_by(kind="vm", resolution=60).count() >= 9
        history = usage.history(session, "vm", "vm1", "vm1", usage.parse_since("1d"))
        assert history.resolution == 60 and history.average["cpu"] == pytest.approx(0.5)


def test_bad_windows_are_refused():
    for text in ("-1h", "soon", "40d", "0", "9" * 400 + "d"):
        with pytest.raises(InvalidInput):
            usage.parse_since(text)
    assert usage.parse_since("90m") == timedelta(minutes=90)


def _add_host(session, name, cpus=4, memory=8 * G):
    session.add(
        Host(
            name=name,
            cpus=cpus,
            memory=memory,
            cpu_overcommit=1.0,
            memory_overcommit=1.0,
            qemu_version="7.2",
            storage_total=100 * G,
            storage_free=100 * G,
            state="online",
        )
    )


def _add_vm(session, name, host, cpus=1, memory=G):
    vm = VM(
        name=name,
        host=host,
        spec={"name": name, "image": "tiny", "cpus": cpus, "memory": memory},
        desired_state="running",
        observed_state="running",
    )
    session.add(vm)
    return vm


def test_plans_are_stored_and_a_stale_one_is_refused(store):
    with store.session() as session:
        for name in ("a", "b", "c"):
            _add_host(session, name)
        for index in range(3):
            _add_vm(session, f"vm{index}", "abc"[index])
    with store.session() as session:
        with pytest.raises(InvalidInput, match="threshold"):
            plans.recommend_balance(session, plans.BalanceRequest(threshold=9))
        plan = plans.recommend_consolidation(session, plans.ConsolidateRequest())
        assert plan.state == "recommended" and plan.moves and plan.summary["hosts_freed"] >= 1
        plan_id = plan.id
    with store.session() as session:
        _add_vm(session, "newcomer", "a")  # the pool changes under the plan
    with store.session() as session, pytest.raises(Conflict, match="stale"):
        plans.approve(session, plan_id)
    with store.session() as session:
        assert session.get(Plan, plan_id).state == "superseded"
        fresh = plans.recommend_consolidation(session, plans.ConsolidateRequest())
        assert plans.approve(session, fresh.id).state == "running"
        with pytest.raises(Conflict, match="running"):
            plans.approve(session, fresh.id)


def test_standby_refuses_a_host_with_vms_and_placement_wakes_one(store):
    from corral.cluster import placement
    from corral.spec.vm import VMSpec

    with store.session() as session:
        _add_host(session, "a", cpus=2, memory=2 * G)
        _add_host(session, "b")
        _add_vm(session, "busy", "a", cpus=2, memory=2 * G)
    with store.session() as session, pytest.raises(Conflict, match="still has 1 VM"):
        plans.set_standby(session, "a")
    with store.session() as session:
        plans.set_standby(session, "b")
    with store.session() as session:
        assert session.query(Host).filter_by(name="b").one().standby
        # a is full and b in standby: placement wakes b rather than refusing
        chosen = placement.pick_host(session, VMSpec(name="x", image="tiny", cpus=1, memory="1G"))
        assert chosen.name == "b" and not chosen.standby


def test_a_switched_off_standby_host_is_woken_and_the_create_told_to_retry(store, monkeypatch):
    from corral.cluster import placement
    from corral.spec.vm import VMSpec

    woken = []
    monkeypatch.setattr(placement, "wake_hook", lambda name, address: woken.append(name))
    with store.session() as session:
        _add_host(session, "a", cpus=1, memory=G)
        _add_host(session, "b")
        _add_vm(session, "busy", "a", cpus=1, memory=G)
    with store.session() as session:
        plans.set_standby(session, "b")
        session.query(Host).filter_by(name="b").one().state = "offline"  # the power command switched it off
    with store.session() as session, pytest.raises(Conflict, match="waking up"):
        placement.pick_host(session, VMSpec(name="x", image="tiny", cpus=1, memory="1G"))
    assert woken == ["b"]
    with store.session() as session:
        assert session.query(Host).filter_by(name="b").one().standby  # not awake until its agent reports


def test_automatic_balancing_runs_one_move_at_a_time_and_stores_nothing_when_balanced(store):
    with store.session() as session:
        for name in ("a", "b", "c"):
            _add_host(session, name)
        for index in range(3):
            _add_vm(session, f"vm{index}", "a")
    with store.session() as session:
        plan = plans.auto_balance(session, threshold=3)
        assert plan is not None and plan.state == "running" and plan.summary["automatic"]
        assert len(plan.moves) == 1 and plan.moves[0]["from"] == "a"
        assert plan.summary["score_after"] < plan.summary["score_before"]
    with store.session() as session:  # one at a time: nothing new while it runs
        assert plans.auto_balance(session, threshold=3) is None
        session.query(Plan).one().state = "succeeded"
        for vm in session.query(VM).all():
            vm.host = "abc"[int(vm.name[-1])]  # balanced now
    with store.session() as session:
        assert plans.auto_balance(session, threshold=3) is None
        assert session.query(Plan).count() == 1


def test_standby_and_wake_are_events(store):
    from corral.store.models import Event

    with store.session() as session:
        _add_host(session, "a")
    with store.session() as session:
        plans.set_standby(session, "a")
    with store.session() as session:
        plans.wake(session, "a")
    with store.session() as session:
        kinds = [(e.type, e.resource_name) for e in session.query(Event).filter(Event.resource_kind == "host")]
        assert kinds == [("host.standby", "a"), ("host.wake", "a")]


def test_automatic_balancing_rounds_come_once_per_interval(store, monkeypatch):
    monkeypatch.setattr(plans, "_auto_last", {})
    with store.session() as session:
        for name in ("a", "b"):
            _add_host(session, name)
        for index in range(2):
            _add_vm(session, f"vm{index}", "a")
    first = plans.auto_balance_tick(store, threshold=3, interval=3600)
    assert first is not None
    with store.session() as session:
        session.get(Plan, first).state = "succeeded"
        session.query(VM).filter_by(name="vm0").one().host = "a"  # still unbalanced: only the interval holds it
    assert plans.auto_balance_tick(store, threshold=3, interval=3600) is None


def test_a_drain_with_no_room_awake_wakes_a_standby_host_and_moves_there(store):
    from corral.cluster import moves
    from corral.store.models import Event, Job

    with store.session() as session:
        _add_host(session, "a")
        _add_host(session, "b")
        _add_vm(session, "web", "a", cpus=2, memory=2 * G)
    with store.session() as session:
        plans.set_standby(session, "b")
    with store.session() as session:
        drain_job, report = moves.drain(session, "a")
        assert report["not_moved"] == [] and [move["to"] for move in report["vms"]] == ["b"], report
        assert drain_job is not None
    with store.session() as session:
        assert not session.query(Host).filter_by(name="b").one().standby
        assert any(event.type == "host.wake" for event in session.query(Event).all())
        assert session.query(Job).filter(Job.host == "b").count() >= 1  # the incoming half of the move


# -- automatic consolidation ------------------------------------------------------------------------------------


def test_automatic_consolidation_frees_a_host_and_puts_it_in_standby(store):
    from corral.store.models import Event, Job

    with store.session() as session:
        for name in ("a", "b", "c"):
            _add_host(session, name)
        for index in range(3):
            _add_vm(session, f"vm{index}", "abc"[index])
    with store.session() as session:
        plan = plans.auto_consolidate(session)
        assert plan is not None and plan.state == "running" and plan.summary["automatic"]
        assert plan.kind == "consolidate" and plan.summary["hosts_freed"] >= 1
        assert plan.moves and all(move["from"] in plan.summary["freed"] for move in plan.moves)
        freed, plan_id = plan.summary["freed"], plan.id
    # The HostWatch drives it as any approved plan: each move is an ordinary migration job.
    for _ in range(len(freed) * 3 + 5):
        with store.session() as session:
            plan = session.get(Plan, plan_id)
            if plan.state != "running":
                break
            plans.advance(session, plan)
            for move in plan.moves:
                if move["state"] == "running":
                    session.get(Job, move["job"]).state = "succeeded"
                    session.get(VM, move["vm_id"]).host = move["to"]
    with store.session() as session:
        plan = session.get(Plan, plan_id)
        assert plan.state == "succeeded", plan.message
        assert sorted(plan.summary["standby"]) == sorted(freed)
        for name in freed:
            assert session.query(Host).filter_by(name=name).one().standby
            assert session.query(VM).filter_by(host=name).count() == 0
        standby_events = {e.resource_name for e in session.query(Event).filter(Event.type == "host.standby")}
        assert standby_events == set(freed)
    with store.session() as session:  # the pool is consolidated: the next round frees nothing, stores nothing
        assert plans.auto_consolidate(session) is None
        assert session.query(Plan).count() == 1


def test_automatic_consolidation_does_nothing_when_no_host_can_be_freed(store):
    with store.session() as session:
        _add_host(session, "a")
        _add_host(session, "b")
        _add_vm(session, "big0", "a", cpus=3, memory=4 * G)
        _add_vm(session, "big1", "b", cpus=3, memory=4 * G)
    with store.session() as session:
        # Both would fit on one host, but then nothing is left to stand in for it: N+1 keeps both awake.
        assert plans.auto_consolidate(session) is None
        assert session.query(Plan).count() == 0
        assert not any(host.standby for host in session.query(Host).all())
        assert plans.last_rounds()["consolidate"]["outcome"].startswith("no host to free")


def test_automatic_consolidation_never_runs_beside_an_open_plan(store, monkeypatch):
    monkeypatch.setattr(plans, "_auto_last", {})
    with store.session() as session:
        for name in ("a", "b", "c"):
            _add_host(session, name)
        for index in range(3):
            _add_vm(session, f"vm{index}", "abc"[index])
    with store.session() as session:  # a person's recommendation, not yet approved: left for them to decide
        mine = plans.recommend_consolidation(session, plans.ConsolidateRequest(solver_time_limit=0)).id
        assert session.get(Plan, mine).state == "recommended"
    with store.session() as session:
        assert plans.auto_consolidate(session) is None
        assert session.get(Plan, mine).state == "recommended"
        session.get(Plan, mine).state = "running"  # approved and running: still nothing beside it
    assert plans.auto_consolidate_tick(store, interval=3600) is None
    with store.session() as session:
        assert session.query(Plan).count() == 1
        session.get(Plan, mine).state = "succeeded"
    # The blocked pass did not count as the interval's round: the next pass runs it.
    started = plans.auto_consolidate_tick(store, interval=3600)
    assert started is not None
    with store.session() as session:
        assert session.get(Plan, started).state == "running"
    assert plans.auto_consolidate_tick(store, interval=3600) is None  # and then not before the interval


# -- balancing and balloons -------------------------------------------------------------------------------------


def test_balancing_counts_a_ballooned_vm_at_its_full_memory():
    # b and c look idle by usage (their VMs' balloons hold them at 1G of 7G) but have only 1G unallocated: a VM
    # moved there could not get its memory back when the balloon deflates. Only d has the room.
    hosts = {name: _host(name, cpus=4, memory=8 * G) for name in "abcd"}
    hosts, guests = _pool(
        hosts,
        [
            ("hot1", "a", 1, 4),
            ("hot2", "a", 1, 3),
            ("squeezed1", "b", 1, 7),
            ("squeezed2", "c", 1, 7),
            ("mid", "d", 1, 4),
        ],
        hot1={"cpu_used": 1.0, "memory_used": 3.5 * G},
        hot2={"cpu_used": 1.0, "memory_used": 3 * G},
        squeezed1={"cpu_used": 0.05, "memory_used": 1 * G},
        squeezed2={"cpu_used": 0.05, "memory_used": 1 * G},
        mid={"cpu_used": 0.5, "memory_used": 2 * G},
    )
    result = planner.balance(hosts, guests, threshold=5)
    assert result.loads_before["b"] < result.loads_before["d"]  # by usage, b was the better target
    assert result.moves, result.summary()
    assert {move.target for move in result.moves} == {"d"}
    assert {move.vm for move in result.moves} == {"hot2"}  # hot1 (4G) fits nowhere: d has 4G left
    assert hosts["d"].memory_alloc <= hosts["d"].mem_cap


def test_metrics_show_balloons_standby_hosts_and_plans(store):
    from corral.api.metrics import StoreCollector

    with store.session() as session:
        for name in ("a", "b", "c"):
            _add_host(session, name)
        for index in range(3):
            vm = _add_vm(session, f"vm{index}", "abc"[index])
            vm.stats = {"balloon_bytes": (512 + index) << 20}
        _add_host(session, "spare")
    with store.session() as session:
        plans.set_standby(session, "spare")
        plans.auto_consolidate(session)
    samples = {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in StoreCollector(store).collect()
        for sample in family.samples
    }
    assert samples[("corral_vm_balloon_bytes", (("project", "default"), ("vm", "vm1")))] == 513 << 20
    assert samples[("corral_plans", (("kind", "consolidate"), ("state", "running")))] == 1
    assert samples[("corral_host_standby", (("host", "spare"),))] == 1
    assert samples[("corral_host_standby", (("host", "a"),))] == 0


def test_pool_status_shows_the_automatic_modes_and_their_last_rounds(store, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from corral.api.app import create_app
    from corral.api.auth import trusted
    from corral.config import Settings

    monkeypatch.setattr(plans, "_auto_rounds", {})
    monkeypatch.setattr(plans, "_auto_last", {})
    with store.session() as session:
        for name in ("a", "b", "c"):
            _add_host(session, name)
        for index in range(3):
            vm = _add_vm(session, f"vm{index}", "abc"[index], memory=2 * G)
            vm.stats = {"balloon_bytes": G if index == 0 else 2 * G}  # vm0's balloon holds 1G back
    started = plans.auto_consolidate_tick(store, interval=3600)
    settings = Settings(home=tmp_path / "home", auto_consolidate=True, auto_consolidate_interval=600)
    with TestClient(trusted(create_app(settings, store))) as api:
        report = api.get("/pool/status").json()
    assert report["auto_balance"]["enabled"] is False and report["auto_balance"]["last_round"] is None
    consolidation = report["auto_consolidate"]
    assert consolidation["enabled"] is True and consolidation["interval"] == 600
    assert consolidation["last_round"]["plan"] == started and consolidation["last_round"]["outcome"].startswith(
        "freeing"
    )
    assert consolidation["last_plan"]["id"] == started and consolidation["last_plan"]["state"] == "running"
    assert report["open_plans"] == [{"id": started, "kind": "consolidate", "state": "running", "automatic": True}]
    assert report["autoballoon"]["vms_ballooned"] == 1 and report["autoballoon"]["bytes_reclaimed"] == G
    assert report["standby"] == []


def test_bad_automatic_mode_settings_are_one_clear_error(tmp_path, monkeypatch):
    from corral.config import load_settings

    monkeypatch.setenv("CORRAL_AUTO_CONSOLIDATE", "maybe")
    with pytest.raises(InvalidInput, match="auto_consolidate"):
        load_settings(tmp_path)
    monkeypatch.delenv("CORRAL_AUTO_CONSOLIDATE")
    (tmp_path / "config.toml").write_text("auto_consolidate = true\nauto_consolidate_interval = 0\n")
    with pytest.raises(InvalidInput, match="auto_consolidate_interval"):
        load_settings(tmp_path)
    (tmp_path / "config.toml").write_text("auto_consolidate = true\n")
    settings = load_settings(tmp_path)
    assert settings.auto_consolidate and settings.auto_consolidate_interval == 3600
