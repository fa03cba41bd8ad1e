"""Snapshots, clones, templates and forks on real VMs."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from tests.conftest import unique

pytestmark = pytest.mark.integration

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done"


def _exec(daemon, vm: str, script: str) -> str:  # type: ignore[no-untyped-def]
    return daemon.cli("vm", "exec", vm, "--", "sh", "-c", script).stdout


def _counter(daemon, vm: str) -> int:  # type: ignore[no-untyped-def]
    return int(_exec(daemon, vm, "cat /run/counter").strip())


def _start_counter(daemon, vm: str) -> None:  # type: ignore[no-untyped-def]
    _exec(daemon, vm, f"setsid sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _exec(daemon, vm, "cat /run/counter 2>/dev/null || true").strip():
            return
        time.sleep(0.1)
    raise AssertionError("the counter did not start")


def _disks_intact(daemon, vm: str) -> None:  # type: ignore[no-untyped-def]
    """qemu-img check finds no corruption. Exit 3 means leaked clusters only (space a failed write allocated and
    never used): wasted, not damaged, and what qemu-img itself calls a consistent image."""
    pool = daemon.home / "pools" / "default"
    for disk in daemon.cli_json("vm", "show", vm)["disks"]:
        result = subprocess.run(["qemu-img", "check", "-U", str(pool / disk["path"])], capture_output=True, text=True)
        assert result.returncode in (0, 3), result.stdout + result.stderr
        assert "ERROR" not in result.stdout


@pytest.fixture
def vm(daemon, tiny):  # type: ignore[no-untyped-def]
    name = unique("snap")
    daemon.cli("vm", "run", name)
    yield name
    daemon.cli("vm", "delete", name, "--force", check=False)


def test_snapshot_with_memory_brings_back_the_disk_and_the_running_state(daemon, vm):
    _exec(daemon, vm, "echo before > /root/marker; sync")
    _start_counter(daemon, vm)
    daemon.cli("snapshot", "create", vm, "first", "--memory")
    at_snapshot = _counter(daemon, vm)
    _exec(daemon, vm, "echo after > /root/marker; sync")
    time.sleep(1.5)
    before_revert = _counter(daemon, vm)
    assert before_revert > at_snapshot + 5
    daemon.cli("snapshot", "revert", vm, "first")
    assert _exec(daemon, vm, "cat /root/marker") == "before\n"
    resumed = _counter(daemon, vm)
    # The counter resumed from the snapshot's value, not from zero and not from where it had got to.
    assert at_snapshot - 3 <= resumed < before_revert
    time.sleep(0.5)
    assert _counter(daemon, vm) > resumed, "the guest keeps running after a revert"
    tree = daemon.cli_json("snapshot", "list", vm)
    assert tree[0]["name"] == "first" and tree[0]["current"] and tree[0]["memory"]
    _disks_intact(daemon, vm)


def test_a_tree_of_five_snapshots_survives_reverts_and_deletes_in_random_order(daemon, vm):
    rng = random.Random(7)
    names = [f"s{index}" for index in range(5)]
    expected = {}
    for index, name in enumerate(names):
        if index == 3:
            daemon.cli("snapshot", "revert", vm, "s1")  # branch: s3 hangs from s1, beside s2
        _exec(daemon, vm, f"echo {name} > /root/marker; sync")
        daemon.cli("snapshot", "create", vm, name, "--memory" if index % 2 == 0 else "--disk-only")
        expected[name] = f"{name}\n"
    tree = {s["name"]: s for s in daemon.cli_json("snapshot", "list", vm)}
    assert tree["s3"]["parent"] == "s1" and tree["s2"]["parent"] == "s1"
    assert sorted(tree["s1"]["children"]) == ["s2", "s3"]
    alive = list(names)
    for _ in range(4):
        target = rng.choice(alive)
        daemon.cli("snapshot", "revert", vm, target)
        assert _exec(daemon, vm, "cat /root/marker") == expected[target]
        victim = rng.choice([n for n in alive if n != target])
        daemon.cli("snapshot", "delete", vm, victim)
        alive.remove(victim)
        _disks_intact(daemon, vm)
    tree = {s["name"]: s for s in daemon.cli_json("snapshot", "list", vm)}
    assert sorted(tree) == sorted(alive)
    for name in alive:  # every survivor still holds exactly what it held
        daemon.cli("snapshot", "revert", vm, name)
        assert _exec(daemon, vm, "cat /root/marker") == expected[name]


def test_snapshot_bad_input(daemon, vm):
    other = unique("other")
    daemon.cli("vm", "create", other)
    try:
        daemon.cli("snapshot", "create", other, "theirs")
        cases = [
            (["snapshot", "create", "ghost-vm", "x"], "not found"),
            (["snapshot", "revert", vm, "ghost"], "has no snapshot 'ghost'"),
            (["snapshot", "revert", vm, "theirs"], "has no snapshot 'theirs'"),  # another VM's snapshot
            (["snapshot", "delete", vm, "ghost"], "has no snapshot"),
            (["snapshot", "create", vm, "Bad Name"], "invalid snapshot name"),
            (["snapshot", "create", other, "mem", "--memory"], "no memory to save"),
        ]
        for args, words in cases:
            result = daemon.cli(*args, check=False)
            assert result.returncode != 0 and words in result.stderr, (args, result.stderr)
        daemon.cli("snapshot", "create", vm, "dup")
        dup = daemon.cli("snapshot", "create", vm, "dup", check=False)
        assert dup.returncode != 0 and "already has a snapshot" in dup.stderr
    finally:
        daemon.cli("vm", "delete", other, "--force", check=False)


def test_full_and_linked_clones_get_their_own_identity(daemon, vm):
    _exec(daemon, vm, "echo original > /root/marker; sync")
    full, linked = unique("full"), unique("linked")
    try:
        daemon.cli("vm", "clone", vm, full, "--full", "--start", "--wait")  # from a running source
        daemon.cli("vm", "stop", vm)
        daemon.cli("vm", "clone", vm, linked, "--linked", "--start", "--wait")
        daemon.cli("vm", "start", vm, "--wait")
        macs, hosts, ids = set(), set(), set()
        for name in (vm, full, linked):
            shown = daemon.cli_json("vm", "show", name)
            assert _exec(daemon, name, "cat /root/marker") == "original\n"
            hosts.add(_exec(daemon, name, "hostname").strip())
            macs.add(_exec(daemon, name, "cat /sys/class/net/eth0/address").strip())
            ids.add(_exec(daemon, name, "cat /etc/machine-id").strip())
            assert shown["spec"]["nics"][0]["mac"] in macs
        assert hosts == {vm, full, linked} and len(macs) == 3 and len(ids) == 3
        # Linked: the clone and the source write independently on a shared frozen base.
        _exec(daemon, linked, "echo mine > /root/marker; sync")
        assert _exec(daemon, vm, "cat /root/marker") == "original\n"
        bases = list((daemon.home / "pools" / "default" / "bases").glob("*.qcow2"))
        assert bases, "a linked clone shares a base"
    finally:
        daemon.cli("vm", "delete", full, "--force", check=False)
        daemon.cli("vm", "delete", linked, "--force", check=False)


def test_clone_from_a_snapshot_and_template_rules(daemon, vm):
    _exec(daemon, vm, "echo at-snapshot > /root/marker; sync")
    daemon.cli("snapshot", "create", vm, "base", "--disk-only")
    _exec(daemon, vm, "echo later > /root/marker; sync")
    clone, template, child = unique("fromsnap"), unique("tpl"), unique("tplvm")
    try:
        daemon.cli("vm", "clone", vm, clone, "--from-snapshot", "base", "--start", "--wait")
        assert _exec(daemon, clone, "cat /root/marker") == "at-snapshot\n"
        linked_with_snapshots = daemon.cli("vm", "clone", vm, unique("x"), "--linked", check=False)
        assert linked_with_snapshots.returncode != 0 and "running" in linked_with_snapshots.stderr

        daemon.cli("template", "create", template, "--from", vm)
        daemon.cli("vm", "run", child, "--template", template)
        assert _exec(daemon, child, "cat /root/marker") == "later\n"
        assert _exec(daemon, child, "hostname").strip() == child
        listed = {t["name"]: t for t in daemon.cli_json("template", "list")}
        assert listed[template]["used_by"] == [child]
        refused = daemon.cli("template", "delete", template, check=False)
        assert refused.returncode != 0 and child in refused.stderr
        daemon.cli("vm", "delete", child, "--force")
        daemon.cli("template", "delete", template)
        assert template not in {t["name"] for t in daemon.cli_json("template", "list")}
    finally:
        for name in (clone, child):
            daemon.cli("vm", "delete", name, "--force", check=False)
        daemon.cli("template", "delete", template, check=False)


def test_fork_children_continue_from_the_parent_while_it_keeps_counting(daemon, tiny):
    parent = unique("parent")
    children = [f"{parent}-k-1", f"{parent}-k-2"]
    grandchild, great, warm = f"{parent}-g", f"{parent}-gg", f"{parent}-w"
    try:
        daemon.cli("vm", "run", parent, "--forkable")
        _start_counter(daemon, parent)
        time.sleep(1.0)
        at_fork = _counter(daemon, parent)
        result = daemon.cli_json("vm", "fork", parent, f"{parent}-k", "--count", "2")
        assert [c["name"] for c in result["children"]] == children
        assert result["job"]["result"]["parent_pause_ms"] < 2000
        for child in children:
            value = _counter(daemon, child)
            assert value >= at_fork, "a child starts from the parent's memory, not from a boot"
            assert _exec(daemon, child, "hostname").strip() == child
        time.sleep(1.0)
        parent_now = _counter(daemon, parent)
        assert parent_now > at_fork + 5, "the parent keeps running"
        for child in children:
            assert _counter(daemon, child) > at_fork + 5, "each child keeps counting on its own"
        macs = {_exec(daemon, name, "cat /sys/class/net/eth0/address").strip() for name in [parent, *children]}
        assert len(macs) == 3

        # A warm template: kept paused (it costs no CPU) and forked from; the children run, it stays paused.
        daemon.cli("vm", "pause", parent)
        result = daemon.cli_json("vm", "fork", parent, warm)
        assert result["job"]["result"]["path"] == "shared-ram"
        first = _counter(daemon, warm)
        assert first >= parent_now and _exec(daemon, warm, "hostname").strip() == warm
        assert daemon.cli_json("vm", "show", parent)["state"] == "paused"
        deadline = time.monotonic() + 30
        while _counter(daemon, warm) == first:  # the child counts: it runs while its template does not
            assert time.monotonic() < deadline, "the warm template's child does not run"
        assert daemon.cli_json("vm", "show", parent)["state"] == "paused"

        # A fork of a fork: the child's RAM is a private mapping, so its RAM goes through the state file.
        _exec(daemon, children[0], "echo from-the-child > /root/marker; sync")
        at_second_fork = _counter(daemon, children[0])
        result = daemon.cli_json("vm", "fork", children[0], grandchild)
        assert result["job"]["result"]["path"] == "full-state"
        assert _exec(daemon, grandchild, "hostname").strip() == grandchild
        assert _exec(daemon, grandchild, "cat /etc/machine-id").strip() == result["children"][0]["id"]
        assert _exec(daemon, grandchild, "cat /root/marker") == "from-the-child\n"
        assert _counter(daemon, grandchild) >= at_second_fork, "it resumes the child's memory"
        # ... and the grandchild, holding its RAM in a file of its own, is a fast-path parent in turn.
        result = daemon.cli_json("vm", "fork", grandchild, great)
        assert result["job"]["result"]["path"] == "shared-ram"
        assert _exec(daemon, great, "hostname").strip() == great
        assert _exec(daemon, great, "cat /root/marker") == "from-the-child\n"
        assert _exec(daemon, children[1], "cat /root/marker 2>/dev/null || echo none") == "none\n"
    finally:
        for name in [warm, great, grandchild, *children, parent]:
            daemon.cli("vm", "delete", name, "--force", check=False)


def test_fork_a_vm_started_without_forkable_and_no_wait(daemon, vm):
    child, quick = unique("plainchild"), unique("quick")
    try:
        _exec(daemon, vm, "echo written-before > /root/marker; sync")
        result = daemon.cli_json("vm", "fork", vm, child)
        assert result["job"]["result"]["path"] == "full-state"
        assert _exec(daemon, child, "hostname").strip() == child, "usable with its identity when fork returns"
        assert _exec(daemon, child, "cat /root/marker") == "written-before\n"
        assert _exec(daemon, vm, "hostname").strip() == vm, "the parent keeps its own identity"
        assert _exec(daemon, vm, "cat /root/marker") == "written-before\n"

        result = daemon.cli_json("vm", "fork", vm, quick, "--no-wait")
        assert result["job"]["result"]["waited_for_identity"] is False
        assert "usable_ms" not in result["job"]["result"]
        assert result["children"][0]["state"] == "running"
        deadline = time.monotonic() + 60  # the renewal has no event to wait for: it shows in the guest
        while _exec(daemon, quick, "hostname").strip() != quick:
            assert time.monotonic() < deadline, "the child never took its new name"
            time.sleep(0.2)
    finally:
        for name in (quick, child):
            daemon.cli("vm", "delete", name, "--force", check=False)


def test_a_full_pool_fails_cleanly_and_the_vm_keeps_running(fresh_daemon, tmp_path):
    import os

    from tests.conftest import require

    require(os.geteuid() == 0, "mounting a small tmpfs pool needs root")
    corral = fresh_daemon()
    pool = corral.home / "pools" / "default"
    pool.mkdir(parents=True, exist_ok=True)
    # Only the storage pool is small; the daemon's own state lives elsewhere, as it would in production.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(pool)], check=True)
    try:
        corral.start()
        corral.cli("image", "build", "tiny")
        name = unique("full")
        corral.cli("vm", "run", name)
        _exec(corral, name, "echo safe > /root/marker; sync")
        result = corral.cli("snapshot", "create", name, "big", "--memory", check=False)
        assert result.returncode != 0, "a memory snapshot of a 256M guest cannot fit in a 64M pool"
        assert "ran out of space" in result.stderr, result.stderr
        shown = corral.cli_json("vm", "show", name)
        assert shown["state"] == "running"
        assert _exec(corral, name, "cat /root/marker") == "safe\n"
        assert corral.cli_json("snapshot", "list", name) == []
        _disks_intact(corral, name)
        # The failed save left the overlay grown (qcow2 keeps its size), so a flattened copy cannot fit either.
        clone = corral.cli("vm", "clone", name, unique("c"), "--full", check=False)
        assert clone.returncode != 0 and "ran out of space" in clone.stderr, clone.stderr
        assert [v["name"] for v in corral.cli_json("vm", "list")] == [name]
        assert corral.cli_json("vm", "show", name)["state"] == "running"
        assert _exec(corral, name, "cat /root/marker") == "safe\n"
        _disks_intact(corral, name)
    finally:
        corral.cleanup()
        subprocess.run(["umount", "-l", str(pool)], check=False)


def test_linked_clones_keep_their_bases_alive_and_the_last_one_out_removes_them(daemon, tiny):
    source = unique("src")
    bases = daemon.home / "pools" / "default" / "bases"
    before = set(bases.glob("*.qcow2")) if bases.exists() else set()
    try:
        daemon.cli("vm", "run", source)
        _exec(daemon, source, "echo kept > /root/marker; sync")
        daemon.cli("vm", "stop", source)
        for _ in range(2):  # the second clone freezes an overlay that already sits on a base: a chain
            clone = unique("lk")
            daemon.cli("vm", "clone", source, clone, "--linked", "--start", "--wait")
            assert _exec(daemon, clone, "cat /root/marker") == "kept\n"
            daemon.cli("vm", "delete", clone, "--force")
        daemon.cli("vm", "start", source, "--wait")
        assert _exec(daemon, source, "cat /root/marker") == "kept\n"
        _disks_intact(daemon, source)
    finally:
        daemon.cli("vm", "delete", source, "--force", check=False)
    assert set(bases.glob("*.qcow2")) == before
