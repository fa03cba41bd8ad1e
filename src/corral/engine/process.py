"""A running QEMU: launched detached or adopted from its runtime record, watched through a pidfd and QMP.

QEMU is started in its own session so it outlives the daemon. Its exit is noticed through a pidfd, which works
for our own children (we also get the exit status) and for processes adopted from an earlier daemon (exit
status unknown, so the last QMP SHUTDOWN event tells a clean power-off from a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from qemu.qmp import QMPClient, QMPError

from corral.engine.argv import build_argv
from corral.engine.plan import LaunchPlan
from corral.engine.qmp_client import QuietQMPClient
from corral.engine.runtime import RuntimeRecord, is_same_process, process_start_ticks
from corral.errors import EngineError

EventCallback = Callable[[str, dict[str, Any]], None]
QMP_CONNECT_TIMEOUT = 15.0


class ExitInfo(BaseModel):
    """How a QEMU process ended, with enough to tell a user why."""

    returncode: int | None = None  # None when the process was not our child (adopted)
    signal: int | None = None
    shutdown_reason: str | None = None  # from QMP SHUTDOWN: guest-shutdown, host-qmp-quit, host-signal...
    guest_initiated: bool | None = None
    last_serial_lines: list[str] = []
    stderr_tail: list[str] = []

    @property
    def crashed(self) -> bool:
        """A crash is an exit nobody asked for: neither the guest (power-off) nor the host (quit, power-down)."""
        if self.shutdown_reason is not None:
            return self.shutdown_reason in ("guest-panic", "host-error")
        if self.signal is not None:
            return True
        return self.returncode != 0

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            text = f"QEMU was killed by {name}"
        elif self.returncode is not None:
            text = f"QEMU exited with status {self.returncode}"
        else:
            text = "QEMU exited"
        if self.shutdown_reason:
            text += f" after shutdown ({self.shutdown_reason})"
        if self.stderr_tail and self.crashed:
            text += f": {self.stderr_tail[-1]}"
        return text


def tail_lines(path: Path, count: int = 10, max_bytes: int = 16384) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    lines = [line.strip() for line in data.decode(errors="replace").splitlines()]
    return [line for line in lines if line][-count:]


class QemuProcess:
    """One QEMU process and its QMP session."""

    def __init__(self, record: RuntimeRecord, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.record = record
        self._popen = popen
        self._qmp: QMPClient | None = None
        self._events_task: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[ExitInfo] | None = None
        self._pidfd: int | None = None
        self._last_shutdown: dict[str, Any] | None = None
        self.on_event: EventCallback | None = None

    @property
    def pid(self) -> int:
        return self.record.pid

    # -- life -------------------------------------------------------------------------------------------------

    @classmethod
    async def launch(
        cls, plan: LaunchPlan, on_event: EventCallback | None = None, preexec: Callable[[], None] | None = None
    ) -> QemuProcess:
        """Start QEMU detached and return once QMP answers; on failure nothing is left running."""
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        previous = RuntimeRecord.load(plan.runtime_record)
        if previous is not None and is_same_process(previous):
            # Its sockets are live: removing them would orphan that QEMU for good.
            raise EngineError(
                f"a QEMU of this VM is still running (pid {previous.pid})",
                "it will be adopted again; stop it with `corral vm stop --force` if it hangs",
            )
        for stale in (plan.qmp_socket, plan.console_socket, plan.guest_agent_socket):
            stale.unlink(missing_ok=True)
        argv = build_argv(plan)
        with plan.stderr_log.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting QEMU\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=preexec,
                )
            except FileNotFoundError as exc:
                raise EngineError(
                    f"QEMU binary {argv[0]!r} not found", "install qemu-system-x86 (apt-get install qemu-system-x86)"
                ) from exc
        record = RuntimeRecord(
            name=plan.name,
            uuid=plan.uuid,
            pid=popen.pid,
            argv=argv,
            start_ticks=process_start_ticks(popen.pid) or 0,
            qmp_socket=plan.qmp_socket,
            console_socket=plan.console_socket,
            guest_agent_socket=plan.guest_agent_socket if plan.guest_agent else None,
            serial_log=plan.serial_log,
            stderr_log=plan.stderr_log,
        )
        # Recorded before anything can go wrong: an agent killed while QMP comes up leaves a QEMU its successor
        # finds and adopts (or ends), never one nobody knows about holding the VM's disk locks.
        record.save(plan.runtime_record)
        proc = cls(record, popen)
        proc.on_event = on_event
        proc._watch_exit()
        try:
            await proc._connect(QMP_CONNECT_TIMEOUT)
        except BaseException:
            await proc.kill()
            plan.runtime_record.unlink(missing_ok=True)
            raise
        return proc

    @classmethod
    async def adopt(cls, record_path: Path, on_event: EventCallback | None = None) -> QemuProcess | None:
        """Re-attach to a QEMU started by an earlier daemon; None when it is gone (the record is removed)."""
        record = RuntimeRecord.load(record_path)
        if record is None or not is_same_process(record):
            record_path.unlink(missing_ok=True)
            return None
        proc = cls(record)
        proc.on_event = on_event
        proc._watch_exit()
        try:
            await proc._connect(5.0)
        except EngineError:
            if proc.exited:
                record_path.unlink(missing_ok=True)
                return None
            await proc.close()  # alive but not answering: let go for now, the caller retries
            raise
        return proc

    def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._finish_exit()
            return
        loop.add_reader(self._pidfd, self._finish_exit)

    def _finish_exit(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        info = ExitInfo()
        if self._popen is not None:
            returncode = self._popen.wait()
            if returncode < 0:
                info.signal = -returncode
            else:
                info.returncode = returncode
        if self._last_shutdown is not None:
            info.shutdown_reason = self._last_shutdown.get("reason")
            info.guest_initiated = self._last_shutdown.get("guest")
        info.last_serial_lines = tail_lines(self.record.serial_log)
        info.stderr_tail = [line for line in tail_lines(self.record.stderr_log) if not line.startswith("---")]
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(info)

    async def until_exit(self) -> ExitInfo:
        """Resolves when QEMU exits; lets long QMP waits give up as soon as there is no QEMU left."""
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    @property
    def exited(self) -> bool:
        return self._exited is not None and self._exited.done()

    async def wait(self, timeout: float | None = None) -> ExitInfo:
        """The exit information once QEMU is gone; raises TimeoutError after ``timeout`` seconds."""
        assert self._exited is not None
        info = await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        await self._disconnect()
        return info

    # -- QMP --------------------------------------------------------------------------------------------------

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.exited:
                info = self._exited.result() if self._exited else ExitInfo()
                detail = info.stderr_tail[-1] if info.stderr_tail else info.describe()
                raise EngineError(f"QEMU exited during start-up: {detail}", f"see {self.record.stderr_log}")
            if self.record.qmp_socket.exists():
                client = QuietQMPClient(self.record.name)
                try:
                    await client.connect(str(self.record.qmp_socket))
                except (QMPError, OSError) as exc:
                    last_error = exc
                else:
                    self._qmp = client
                    self._events_task = asyncio.get_running_loop().create_task(self._pump_events(client))
                    return
            await asyncio.sleep(0.01)
        raise EngineError(f"QEMU's monitor did not answer within {timeout:.0f} s: {last_error}")

    async def _pump_events(self, client: QMPClient) -> None:
        with client.listener() as listener:
            async for event in listener:
                name = str(event["event"])
                payload = event.get("data", {})
                data: dict[str, Any] = dict(payload) if isinstance(payload, dict) else {}
                if name == "SHUTDOWN":
                    self._last_shutdown = data
                if self.on_event is not None:
                    self.on_event(name, data)

    async def _disconnect(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events_task
            self._events_task = None
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command; QEMU's error becomes an EngineError naming the command."""
        if self._qmp is None or self.exited:
            raise EngineError(f"cannot run {command}: QEMU is not running")
        try:
            return await self._qmp.execute(command, arguments)
        except QMPError as exc:
            raise EngineError(f"QMP {command} failed: {exc}") from exc

    async def pass_fd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file descriptor (SCM_RIGHTS over the monitor socket) under ``name``."""
        if self._qmp is None:
            raise EngineError("QEMU's monitor is not connected")
        self._qmp.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def add_fd(self, fd: int) -> int:
        """Put an open file into a new fd set and return its id: block nodes open it as ``/dev/fdset/<id>``, so
        a sandboxed QEMU can write a file that only root can open (a backup target, say)."""
        if self._qmp is None:
            raise EngineError("QEMU's monitor is not connected")
        self._qmp.send_fd_scm(fd)
        return int((await self.execute("add-fd", {}))["fdset-id"])

    def listener(self, names: str | tuple[str, ...]) -> Any:
        """A QMP event listener context (see qemu.qmp's EventListener)."""
        if self._qmp is None:
            raise EngineError("QEMU's monitor is not connected")
        return self._qmp.listener(names)

    async def run_state(self) -> str:
        result = await self.execute("query-status")
        return str(result["status"])

    # -- verbs ------------------------------------------------------------------------------------------------

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def powerdown(self) -> None:
        """Press the ACPI power button: the guest decides how to shut down."""
        await self.execute("system_powerdown")

    async def reset(self) -> None:
        await self.execute("system_reset")

    async def quit(self, timeout: float = 5.0) -> ExitInfo:
        """Ask QEMU to exit now (no guest shutdown); fall back to SIGKILL if it does not."""
        with contextlib.suppress(EngineError):
            await self.execute("quit")
        try:
            return await self.wait(timeout)
        except TimeoutError:
            return await self.kill()

    async def kill(self) -> ExitInfo:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        return await self.wait(10.0)

    async def close(self) -> None:
        """Let go of QEMU without stopping it (daemon shutdown): it keeps running and is adopted later."""
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        await self._disconnect()
