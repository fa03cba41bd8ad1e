"""The destination's half of a live migration: a QEMU started with ``-incoming defer`` listens for the RAM stream
and, without shared storage, exports its blank disks over NBD for the source to mirror into (see the package's
docstring for the whole sequence)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from corral.engine.live_migration.common import (
    EXPORT_PREFIX,
    IncomingEndpoint,
    MigrationFailed,
    MigrationTuning,
    NbdEndpoint,
    event_time,
    log,
    set_capabilities,
)
from corral.engine.process import QemuProcess
from corral.errors import EngineError


class IncomingMigration:
    """The destination's side: a QEMU started with ``-incoming defer`` from the VM's launch plan.

    ``prepare()`` returns the endpoint to hand to the source; ``wait()`` resolves once the VM runs here (it
    returns the wall-clock time of the RESUME event); ``abort()`` kills this QEMU, which is always safe before
    the move has completed, since the source keeps the VM until the end.
    """

    def __init__(self, proc: QemuProcess, tuning: MigrationTuning | None = None) -> None:
        self.proc = proc
        self.tuning = tuning or MigrationTuning()
        self.endpoint: IncomingEndpoint | None = None
        self._listener: Any = None
        self._events = contextlib.ExitStack()
        self._resumed_at: float | None = None

    async def prepare(
        self, host: str, port: int = 0, nbd_port: int | None = None, export_nodes: Sequence[str] = ()
    ) -> IncomingEndpoint:
        """Listen on ``host:port`` (port 0: QEMU picks one) and export ``export_nodes`` over NBD on
        ``nbd_port`` for storage migration. The disk files behind those nodes must be blank images of the same
        virtual size as the source's, writable by this QEMU (its sandbox uid)."""
        if await self.proc.run_state() != "inmigrate":
            raise EngineError("the destination QEMU was not started with -incoming defer")
        postcopy = False
        if self.tuning.uses_postcopy:
            # Checked here, in the inmigrate state, where QEMU asks the kernel for userfaultfd: a sandboxed
            # QEMU without the right to use it refuses, and the move then stays precopy.
            try:
                await set_capabilities(self.proc, {"postcopy-ram": True})
                postcopy = True
            except EngineError as exc:
                log.info("postcopy unavailable on the destination: %s", exc)
        if self.tuning.multifd_channels and not postcopy:
            await set_capabilities(self.proc, {"multifd": True})
            await self.proc.execute("migrate-set-parameters", {"multifd-channels": self.tuning.multifd_channels})
        exports: dict[str, str] = {}
        nbd = None
        if export_nodes:
            if nbd_port is None:
                raise EngineError("storage migration needs a port for the NBD server")
            nbd = NbdEndpoint(host=host, port=nbd_port)
            await self.proc.execute(
                "nbd-server-start", {"addr": {"type": "inet", "data": {"host": host, "port": str(nbd_port)}}}
            )
            for node in export_nodes:
                name = f"{EXPORT_PREFIX}{node}"
                # A block export activates its node (QEMU clears the inactive flag for exactly this use).
                await self.proc.execute(
                    "block-export-add", {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": True}
                )
                exports[node] = name
        self._listener = self._events.enter_context(self.proc.listener("RESUME"))
        host_uri = f"[{host}]" if ":" in host else host
        await self.proc.execute("migrate-incoming", {"uri": f"tcp:{host_uri}:{port}"})
        if port == 0:
            info = await self.proc.execute("query-migrate")
            addresses = info.get("socket-address") or []
            if not addresses:
                raise EngineError("QEMU did not say which port it listens on for the migration")
            port = int(addresses[0]["port"])
        self.endpoint = IncomingEndpoint(
            host=host,
            port=port,
            nbd=nbd,
            exports=exports,
            postcopy=postcopy,
            multifd_channels=0 if postcopy else self.tuning.multifd_channels,
        )
        return self.endpoint

    async def wait(self, timeout: float | None = None) -> float | None:
        """Until the incoming stream has completed and the VM runs here; raises MigrationFailed if this QEMU
        exits first (QEMU 7.2 exits when an incoming migration fails). Returns the RESUME event's time."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.tuning.timeout)
        delay = 0.01
        while True:
            if self.proc.exited:
                info = await self.proc.until_exit()
                raise MigrationFailed(f"the destination QEMU exited during the move: {info.describe()}")
            try:
                status = (await self.proc.execute("query-migrate")).get("status")
            except EngineError:
                if self.proc.exited:
                    continue
                raise
            if status == "completed":
                break
            if status == "failed":
                raise MigrationFailed("the destination could not load the migration stream")
            if time.monotonic() > deadline:
                raise MigrationFailed("the incoming migration did not complete in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.tuning.poll_interval)
        self._collect_resume()
        if self._resumed_at is None and await self.proc.run_state() == "running":
            # The RESUME event may trail the status change by a moment.
            await asyncio.sleep(0.05)
            self._collect_resume()
        return self._resumed_at

    def _collect_resume(self) -> None:
        if self._listener is None:
            return
        for event in self._listener.clear():
            if self._resumed_at is None:
                self._resumed_at = event_time(event)

    async def finish(self, grace: float = 5.0) -> None:
        """After the move: remove the NBD exports. The source drops its connections when it cancels its mirror
        jobs; one that has not within ``grace`` seconds is cut off (the data is all here by then)."""
        self._close_listener()
        if self.endpoint is None or not self.endpoint.exports:
            return
        for name in self.endpoint.exports.values():
            deadline = time.monotonic() + grace
            while True:
                try:
                    await self.proc.execute("block-export-del", {"id": name})
                    break
                except EngineError:
                    if time.monotonic() > deadline:
                        with contextlib.suppress(EngineError):
                            await self.proc.execute("block-export-del", {"id": name, "mode": "hard"})
                        break
                    await asyncio.sleep(0.05)
        await _wait_exports_gone(self.proc, set(self.endpoint.exports.values()), grace)
        with contextlib.suppress(EngineError):
            await self.proc.execute("nbd-server-stop")

    async def abort(self) -> None:
        """Tear the destination down: the VM never ran here, or the source has it back."""
        self._close_listener()
        if not self.proc.exited:
            await self.proc.kill()
        else:
            await self.proc.wait(10.0)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._collect_resume()
            with contextlib.suppress(Exception):
                self._events.close()
            self._listener = None


async def _wait_exports_gone(proc: QemuProcess, names: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exports = {e["id"] for e in await proc.execute("query-block-exports")}
        if not names & exports:
            return
        await asyncio.sleep(0.02)
