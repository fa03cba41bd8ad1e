"""A client for the QEMU guest agent (qemu-ga), spoken over the VM's virtio-serial port.

The protocol is QMP-like JSON but has no greeting, and requests written while the agent was not yet running sit
in the channel and are answered later. ``guest-sync-delimited`` solves both: its reply is preceded by a 0xFF byte
that resets the agent's parser state on our side, and carries an id so stale replies can be skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from corral.errors import GuestAgentError, Timeout


class ExecResult(BaseModel):
    exit_code: int | None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False


class GuestAgent:
    """One connection to a guest agent socket; use as ``async with GuestAgent(path) as agent``."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> GuestAgent:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError as exc:
            raise GuestAgentError(f"cannot reach the guest agent socket: {exc}", "is the VM running?") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._writer is not None
        try:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
        except OSError as exc:
            raise GuestAgentError(f"the guest agent connection broke: {exc}") from exc

    async def _read_message(self) -> dict[str, Any]:
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readline()
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise GuestAgentError(f"the guest agent connection broke: {exc}") from exc
            if not line:
                raise GuestAgentError("the guest agent closed the connection")
            line = line.strip(b"\xff \r\n")
            if not line:
                continue
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue

    async def sync(self, timeout: float) -> None:
        """Flush stale traffic and prove the agent answers; raises TimeoutError if it does not in time."""
        reader = self._reader
        assert reader is not None
        token = random.randint(1, 2**31 - 1)
        await self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})

        async def wait_token() -> None:
            while True:
                try:
                    await reader.readuntil(b"\xff")
                except asyncio.LimitOverrunError:
                    await reader.read(65536)  # skip a long stale reply
                    continue
                except (OSError, asyncio.IncompleteReadError) as exc:
                    raise GuestAgentError("the guest agent connection closed (did the VM stop?)") from exc
                message = await self._read_message()
                if message.get("return") == token:
                    return

        await asyncio.wait_for(wait_token(), timeout)

    async def call(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0, reply: bool = True
    ) -> Any:
        await self.sync(timeout)
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        await self._send(message)
        if not reply:
            return None
        try:
            response = await asyncio.wait_for(self._read_message(), timeout)
        except TimeoutError as exc:
            raise Timeout(f"the guest agent did not answer {command} within {timeout:.0f} s") from exc
        if "error" in response:
            raise GuestAgentError(f"guest agent {command} failed: {response['error'].get('desc', response)}")
        return response.get("return")

    async def exec(self, argv: list[str], timeout: float = 60.0, stdin: bytes | None = None) -> ExecResult:
        """Run a program in the guest and collect its output and exit code."""
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        started = await self.call("guest-exec", arguments)
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            status = await self.call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(
                    exit_code=status.get("exitcode"),
                    signal=status.get("signal"),
                    stdout=base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                    stderr=base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
                    truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
                )
            if time.monotonic() > deadline:
                raise Timeout(f"{argv[0]} did not finish in the guest within {timeout:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def addresses(self) -> list[dict[str, Any]]:
        """Interfaces with their MAC and IP addresses, loopback left out."""
        interfaces = await self.call("guest-network-get-interfaces")
        return [
            {
                "name": iface.get("name"),
                "mac": iface.get("hardware-address"),
                "addresses": [f"{addr['ip-address']}/{addr['prefix']}" for addr in iface.get("ip-addresses", [])],
            }
            for iface in interfaces
            if iface.get("name") != "lo"
        ]

    async def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest OS to shut down; qemu-ga sends no reply when it succeeds."""
        await self.call("guest-shutdown", {"mode": mode}, reply=False)


async def wait_until_ready(socket_path: Path, timeout: float, is_alive: Any = None) -> None:
    """Poll until the guest agent answers a sync; ``is_alive()`` lets a dead QEMU end the wait early."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(
                f"the guest agent did not answer within {timeout:.0f} s",
                "check `corral vm logs` for the guest's boot messages",
            )
        if is_alive is not None and not is_alive():
            raise GuestAgentError("QEMU exited before the guest agent answered", "see `corral vm show`")
        try:
            async with GuestAgent(socket_path) as agent:
                # One long-lived connection with periodic syncs: requests written before the agent started are
                # buffered by QEMU and answered on start, so the first answer comes as soon as the agent runs.
                while time.monotonic() < deadline:
                    if is_alive is not None and not is_alive():
                        break
                    try:
                        await agent.sync(min(0.5, max(0.05, deadline - time.monotonic())))
                        return
                    except TimeoutError:
                        continue
        except GuestAgentError:
            await asyncio.sleep(0.05)
