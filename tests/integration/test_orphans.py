"""A QEMU that no runtime record names (the agent died between starting it and writing the record) is found by
the next agent and adopted or ended as the VM's desired state says: never left running unknown, never twice."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.conftest import alive, qemu_pids_under, unique

pytestmark = pytest.mark.integration


def _forget_record(corral, vm: dict) -> None:  # type: ignore[no-untyped-def]
    """What an agent killed right after starting QEMU leaves: the process, but no runtime record."""
    records = list((corral.home / "run").glob(f"{vm['id'][:12]}*/runtime.json"))
    assert records, "the running VM has a runtime record"
    for record in records:
        record.unlink()


def _wait_for(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")


def test_unrecorded_qemus_are_adopted_or_ended_after_an_agent_crash(fresh_daemon):
    corral = fresh_daemon()
    corral.start()
    corral.cli("image", "build", "tiny", timeout=1800)
    kept, unwanted = unique("kept"), unique("unwanted")
    first = corral.cli_json("vm", "run", kept)
    second = corral.cli_json("vm", "run", unwanted)
    corral.kill()  # SIGKILL: the agent dies, its QEMUs live on
    _forget_record(corral, first)
    _forget_record(corral, second)
    # While no agent ran, someone asked for `unwanted` to stop: nothing should keep its QEMU.
    with sqlite3.connect(corral.home / "corral.db") as db:
        db.execute("UPDATE vms SET desired_state = 'stopped' WHERE name = ?", (unwanted,))
    assert alive(first["pid"]) and alive(second["pid"])

    corral.start()
    adopted = _wait_for(lambda: (vm := corral.cli_json("vm", "show", kept))["state"] == "running" and vm)
    assert adopted["pid"] == first["pid"], "the same QEMU is adopted, not a second one started"
    _wait_for(lambda: not alive(second["pid"]), timeout=10)
    assert corral.cli_json("vm", "show", unwanted)["state"] in ("stopped", "crashed")
    assert sorted(qemu_pids_under(corral.home)) == [first["pid"]], "exactly one QEMU: the adopted one"
    # The adopted VM is fully managed again: its guest answers and a stop ends its process.
    assert corral.cli("vm", "exec", kept, "--", "hostname").stdout.strip() == kept
    corral.cli("vm", "stop", kept, "--force")
    _wait_for(lambda: not alive(first["pid"]), timeout=10)
    assert qemu_pids_under(corral.home) == []
