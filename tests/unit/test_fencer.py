"""The fencer's deadline logic with real processes (corral.host.fencer, docs/ha.md "The fencer"): a sleeping
Python process named like QEMU, with a QMP socket argument under the home's run directory and a runtime record,
stands in for each VM's QEMU."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.runtime import RuntimeRecord, process_start_ticks
from corral.host import fencer


def _exits_within(pid: int, timeout: float) -> bool:
    """Wait for the exit of any process (a pidfd turns readable when it ends): no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class FakeQemu:
    """A process whose command line looks like one of our QEMUs (argv[0] qemu-system-..., -qmp unix:RUN/...)."""

    def __init__(self, home: Path, vm_id: str) -> None:
        run_dir = home / "run" / vm_id[:12]
        run_dir.mkdir(parents=True)
        argv = ["-c", "import time; time.sleep(600)", "-qmp", f"unix:{run_dir}/qmp.sock,server=on,wait=off"]
        self.proc = subprocess.Popen(
            [str(run_dir / "qemu-system-x86_64"), *argv], executable=sys.executable, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while b"qemu-system" not in Path(f"/proc/{self.proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in never exec'd"
            time.sleep(0.01)
        RuntimeRecord(
            name=vm_id,
            uuid=vm_id,
            pid=self.proc.pid,
            argv=argv,
            start_ticks=process_start_ticks(self.proc.pid) or 0,
            qmp_socket=run_dir / "qmp.sock",
            console_socket=run_dir / "console.sock",
            guest_agent_socket=None,
            serial_log=run_dir / "serial.log",
            stderr_log=run_dir / "qemu.log",
        ).save(run_dir / "runtime.json")

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "run").mkdir()
    yield tmp_path
    pid = fencer.running_fencer(tmp_path)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _exits_within(pid, 10)


def _start(home: Path, deadline_in: float, non_ha: set[str] = frozenset()) -> int:  # type: ignore[assignment]
    fencer.write_state(home, deadline=time.monotonic() + deadline_in, non_ha=set(non_ha))
    pid = fencer.ensure_running(home)
    assert pid is not None
    return pid


def test_the_fencer_kills_ha_qemus_at_the_deadline_and_spares_non_ha_ones(home: Path) -> None:
    ha, other = FakeQemu(home, "a" * 32), FakeQemu(home, "b" * 32)
    try:
        started = time.monotonic()
        fencer_pid = _start(home, 4.0, {"b" * 32})
        again = fencer.ensure_running(home)
        log = (home / "logs" / "fencer.log").read_text(errors="replace")
        assert again is None, (
            f"a running fencer is kept, not doubled (first {fencer_pid}, pidfile "
            f"{fencer.pid_path(home).read_text()!r}, log: {log!r})"
        )
        # Renewals move the deadline: nothing dies while they come in time.
        while time.monotonic() - started < 6.0:
            last = time.monotonic()
            fencer.write_state(home, deadline=last + 4.0, non_ha={"b" * 32})
            assert not _exits_within(ha.proc.pid, 0.5)
        assert ha.proc.wait(10) == -signal.SIGKILL
        gone = time.monotonic() - last
        print(f"\nfencer: HA stand-in killed {gone - 4.0:.3f} s after its deadline")
        assert 4.0 <= gone < 6.0, f"killed {gone:.2f} s after the last renewal, deadline 4 s"
        assert other.alive(), "a non-HA VM keeps running"
        assert fencer.running_fencer(home) == fencer_pid, "it keeps watching"
        log = (home / "logs" / "fencer.log").read_text()
        assert f"fenced: killed QEMU {ha.proc.pid}" in log, log
        # What the agent reports as a host.fenced event once it holds the lease again, then forgets.
        assert [(k["pid"], k["vm"]) for k in fencer.take_killed(home)] == [(ha.proc.pid, "a" * 12)]
        assert fencer.take_killed(home) == []
    finally:
        for qemu in (ha, other):
            qemu.proc.kill()
            qemu.proc.wait()


def test_a_clean_release_ends_the_fencer_without_killing(home: Path) -> None:
    ha = FakeQemu(home, "c" * 32)
    try:
        fencer_pid = _start(home, 30.0)
        fencer.write_state(home, deadline=time.monotonic(), non_ha=set(), released=True)
        assert _exits_within(fencer_pid, 10), "the fencer ends once the lease was given up"
        assert ha.alive()
    finally:
        ha.proc.kill()
        ha.proc.wait()


def test_a_stale_or_missing_deadline_fences(home: Path) -> None:
    state = {"deadline": time.monotonic() + 3600, "boot_id": fencer.boot_id(), "released": False}
    assert not fencer.fence_due(state)
    assert fencer.fence_due({**state, "boot_id": "another boot"}), "a file from before a reboot means nothing"
    assert fencer.fence_due({**state, "deadline": time.monotonic() - 0.01})
    assert not fencer.fence_due({**state, "deadline": 0.0, "released": True})
    # An agent dead for good: past the deadline with nothing left to guard, the fencer ends by itself.
    ha = FakeQemu(home, "d" * 32)
    dead = subprocess.Popen(["true"])
    dead.wait()
    fencer.write_state(home, deadline=time.monotonic() + 1.0, non_ha=set())
    state_file = fencer.state_path(home)
    forged = state_file.read_text().replace(f'"agent_pid": {os.getpid()}', f'"agent_pid": {dead.pid}')
    state_file.write_text(forged)
    pid = fencer.ensure_running(home)
    assert pid is not None
    assert ha.proc.wait(10) == -signal.SIGKILL
    assert _exits_within(pid, 10)
