"""What happens when things die: QEMU killed, the guest powering itself off, the daemon killed and restarted."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import alive, unique

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def test_killed_qemu_is_seen_as_crashed_and_restarted_on_failure(daemon, tiny):
    name = unique("crashy")
    try:
        first = daemon.cli_json("vm", "run", name, "--restart", "on-failure")
        os.kill(first["pid"], signal.SIGKILL)
        crashed_or_back = _wait_for(
            lambda: (vm := daemon.cli_json("vm", "show", name))["restart_count"] >= 1 and vm, timeout=20
        )
        # The restart may already be under way ("starting QEMU", ~0.1 s after the kill): the exit is in last_exit.
        exit_info = crashed_or_back["last_exit"] or {}
        assert "SIGKILL" in crashed_or_back["status"] or exit_info.get("signal") == signal.SIGKILL, crashed_or_back
        again = _wait_for(lambda: (vm := daemon.cli_json("vm", "show", name))["ready"] and vm, timeout=60)
        assert again["state"] == "running" and again["pid"] != first["pid"]
        assert daemon.cli("vm", "exec", name, "--", "hostname").stdout.strip() == name
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)


def test_killed_qemu_with_policy_never_stays_crashed_with_its_last_words(daemon, tiny):
    name = unique("never")
    try:
        first = daemon.cli_json("vm", "run", name)
        started = time.monotonic()
        os.kill(first["pid"], signal.SIGKILL)
        vm = _wait_for(lambda: (v := daemon.cli_json("vm", "show", name))["state"] == "crashed" and v, timeout=10)
        assert time.monotonic() - started < 5, "a dead VM must be noticed within seconds"
        assert vm["last_exit"]["signal"] == signal.SIGKILL
        assert "corral-guest-ready" in "\n".join(vm["last_exit"]["last_serial_lines"])
        assert "killed by SIGKILL" in vm["status"]
        assert vm["desired_state"] == "stopped" and vm["pid"] is None
        time.sleep(2.5)  # longer than a reconcile pass: nothing restarts it
        assert daemon.cli_json("vm", "show", name)["state"] == "crashed"
        # A crashed VM starts again like a stopped one.
        assert daemon.cli_json("vm", "start", name, "--wait")["vm"]["ready"] is True
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)


def test_guest_poweroff_is_a_stop_not_a_crash_and_always_restarts(daemon, tiny):
    quiet, always = unique("off"), unique("always")
    try:
        daemon.cli("vm", "run", quiet)
        daemon.cli("vm", "exec", quiet, "--", "poweroff", check=False)
        vm = _wait_for(lambda: (v := daemon.cli_json("vm", "show", quiet))["state"] != "running" and v)
        assert vm["state"] == "stopped" and "powered off" in vm["status"]

        first = daemon.cli_json("vm", "run", always, "--restart", "always")
        daemon.cli("vm", "exec", always, "--", "poweroff", check=False)
        back = _wait_for(
            lambda: (v := daemon.cli_json("vm", "show", always))["ready"] and v["pid"] != first["pid"] and v,
            timeout=60,
        )
        assert back["restart_count"] == 1
    finally:
        daemon.cli("vm", "delete", quiet, "--force", check=False)
        daemon.cli("vm", "delete", always, "--force", check=False)


def test_daemon_killed_and_restarted_adopts_running_vms(fresh_daemon, tiny):
    corral = fresh_daemon()
    corral.start()
    corral.cli("image", "build", "tiny")
    names = [unique("adopt"), unique("adopt")]
    pids = {name: corral.cli_json("vm", "run", name)["pid"] for name in names}
    corral.cli("vm", "pause", names[1])
    corral.kill(signal.SIGKILL)
    assert all(alive(pid) for pid in pids.values()), "QEMU must outlive the daemon"
    corral.start()
    shown = {name: corral.cli_json("vm", "show", name) for name in names}
    assert {name: vm["pid"] for name, vm in shown.items()} == pids
    assert shown[names[0]]["state"] == "running" and shown[names[1]]["state"] == "paused"
    assert corral.cli("vm", "exec", names[0], "--", "hostname").stdout.strip() == names[0]
    for name in names:
        assert corral.cli_json("vm", "stop", name)["vm"]["state"] == "stopped"
    assert not any(alive(pid) for pid in pids.values())


def test_vm_that_died_while_the_daemon_was_down_is_recorded(fresh_daemon, tiny):
    corral = fresh_daemon()
    corral.start()
    corral.cli("image", "build", "tiny")
    name = unique("gone")
    pid = corral.cli_json("vm", "run", name)["pid"]
    corral.kill(signal.SIGTERM)
    os.kill(pid, signal.SIGKILL)
    corral.start()
    vm = corral.cli_json("vm", "show", name)
    assert vm["state"] == "crashed" and "not running" in vm["status"]


def test_ten_vms_at_once(daemon, tiny):
    from concurrent.futures import ThreadPoolExecutor

    names = [unique(f"ten{index}") for index in range(10)]
    with daemon.client() as corral:
        try:
            accepted = [
                corral.create_vm({"name": n, "image": "tiny", "memory": "128M"}, start=True, wait=True) for n in names
            ]
            with ThreadPoolExecutor(10) as pool:
                list(pool.map(lambda a: corral.wait_job(a["job"]["id"], timeout=240), accepted))
            vms = {vm["name"]: vm for vm in corral.vms() if vm["name"] in names}
            assert all(vm["state"] == "running" and vm["ready"] for vm in vms.values())
            assert len({vm["pid"] for vm in vms.values()}) == 10
            for name in names:
                assert corral.exec_vm(name, ["hostname"])["stdout"].strip() == name
        finally:
            jobs = [corral.delete_vm(n, force=True)["job"]["id"] for n in names if _exists(corral, n)]
            for job in jobs:
                corral.wait_job(job, timeout=60)


def _exists(corral, name: str) -> bool:  # type: ignore[no-untyped-def]
    from corral.errors import NotFound

    try:
        corral.vm(name)
    except NotFound:
        return False
    return True
