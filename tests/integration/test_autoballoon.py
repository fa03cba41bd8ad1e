"""Automatic ballooning with real QEMU and real guests (corral.host.autoballoon): one daemon of the module's own,
given a host memory budget (balloon_host_memory) so that two tiny guests make pressure on any machine. Under
pressure the idle guests' balloons inflate toward their floors and never under them; when one VM goes away the
other gets its memory back; the guests keep answering throughout (no OOM).

Budget 400M, target 80 %: 320M. Two 256M guests with floors of 160M use 512M, so both are driven to their floors
(together exactly the target). Deleting one leaves 160M in use, well under the target less its band (300M), so
the other is given back its 256M. About 65 s on a busy 2-core machine, half of it booting the two guests.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Daemon, new_home, unique

pytestmark = [pytest.mark.integration]
MiB = 1 << 20
FLOOR = 160 * MiB


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def daemon(qemu_available: None) -> Iterator[Daemon]:
    home = new_home()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f"balloon_host_memory = {400 * MiB}\nballoon_target = 0.8\nballoon_step = 0.1\nballoon_interval = 1\n"
    )
    corral = Daemon(home)
    try:
        corral.start()
        corral.cli("image", "build", "tiny", timeout=1800)
        yield corral
    finally:
        corral.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def actual(daemon: Daemon, vm: str) -> int:
    return int(daemon.cli_json("vm", "show", vm)["memory_actual"] or 0)  # type: ignore[index]


def balloon_events(daemon: Daemon, vm: str) -> list[dict[str, Any]]:
    with daemon.client() as corral:
        return [e for e in corral.events(types=["vm.balloon"], limit=1000) if e["resource"]["name"] == vm]


def guest_answers(daemon: Daemon, vm: str) -> int:
    """MemAvailable in the guest, through the guest agent: a command runs, so the guest is alive and not OOM."""
    lines = daemon.cli("vm", "exec", vm, "--", "cat", "/proc/meminfo").stdout.splitlines()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}["MemAvailable"]


def refused(daemon: Daemon, *argv: str) -> str:
    result = daemon.cli(*argv, check=False)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_pressure_shrinks_idle_guests_to_their_floors_and_memory_comes_back(daemon: Daemon) -> None:
    first, second = unique("ba"), unique("bb")
    began = time.monotonic()
    for vm in (first, second):  # both boot at once; the balloon rounds wait for their drivers' statistics
        daemon.cli("vm", "run", vm, "--image", "tiny", "--memory", "256M", "--no-wait", timeout=300)
    # Bad floors: one line each, nothing changed (the default floor of a 256M VM is 128M).
    for value, words in (("512M", "above the VM's memory"), ("16M", "below the least floor"), ("x", "invalid")):
        assert words in refused(daemon, "vm", "set", first, "--min-memory", value)
    shown = daemon.cli_json("vm", "show", first)
    assert shown["min_memory"] is None and shown["memory_floor"] == 128 * MiB  # type: ignore[index]
    for vm in (first, second):
        shown = daemon.cli_json("vm", "set", vm, "--min-memory", "160M")
        assert shown["job"] is None and shown["vm"]["min_memory"] == FLOOR  # type: ignore[index]
    assert "160M" in daemon.cli("vm", "show", first).stdout
    until(lambda: actual(daemon, first) == FLOOR and actual(daemon, second) == FLOOR, 120, "both at their floors")
    print(f"\nunder pressure: both guests at their 160M floors {time.monotonic() - began:.1f} s after their start")
    events = balloon_events(daemon, first) + balloon_events(daemon, second)
    assert events and all(e["data"]["after"] >= FLOOR for e in events), events
    assert all("over the target" in e["data"]["reason"] for e in events)
    assert all(e["data"]["before"] - e["data"]["after"] <= 26 * MiB for e in events), "a step is 10 % of 256M"
    for vm in (first, second):
        assert guest_answers(daemon, vm) < 160 * MiB  # the guest itself sees its memory taken, and answers

    daemon.cli("vm", "delete", second, "--force")
    began = time.monotonic()
    until(lambda: actual(daemon, first) == 256 * MiB, 60, "the memory to come back")
    print(f"pressure gone: 256M back in {time.monotonic() - began:.1f} s")
    events = balloon_events(daemon, first)
    assert any("under the target" in e["data"]["reason"] for e in events)
    assert all(e["data"]["after"] >= FLOOR for e in events), events
    assert guest_answers(daemon, first) > 160 * MiB
    # The usage history samples every 10 s (a point needs two samples): within a few rounds it shows the return.
    history = until(
        lambda: (h := daemon.cli_json("vm", "stats", first, "--since", "10m"))["peak"]["balloon"] == 256 * MiB and h,  # type: ignore[index]
        40,
        "the usage history to record the memory given back",
    )
    assert history["points"][-1]["balloon"] == 256 * MiB, history
    daemon.cli("vm", "delete", first, "--force")
