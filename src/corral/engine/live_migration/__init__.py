"""Live migration: move a running VM to a QEMU started with ``-incoming defer`` from the same launch plan.

Ganeti's shape: explicit steps on each side, so that the two sides may live in two agents on two hosts.

- Destination (``IncomingMigration``): set the migration capabilities, listen for the RAM stream on TCP
  (``migrate-incoming``), and, without shared storage, export its blank disks over NBD so that the source can
  mirror into them. It then waits for the stream to end and removes the exports.
- Source (``OutgoingMigration``): without shared storage, mirror every disk into the destination's NBD exports
  (``blockdev-mirror sync=full copy-mode=write-blocking``: once ready, every guest write reaches both sides
  before it completes, so the copies stay equal until the switch-over); then send RAM with multifd at full
  bandwidth and a short downtime limit. Once the destination runs, the mirror jobs are cancelled (which for a
  ready mirror means "stop, do not pivot").
- Postcopy: QEMU 7.2 cannot combine it with multifd (the destination aborts at the end of the move on an
  assertion in yank.c, after the guest already ran there: the VM is lost). So a move is either multifd precopy
  or single-channel postcopy. The ``fallback`` mode tries multifd precopy for ``converge_within`` seconds; if
  it does not converge, it cancels (the source never stopped), and ``migrate()`` starts over with a fresh
  destination in postcopy mode, which always converges (each page crosses once after the switch).
- ``migrate()`` runs both sides in one process (tests, benchmarks, a move between two run directories of one
  host), and guarantees what a cluster must guarantee too: whatever fails, the source keeps running and the
  destination is torn down, so exactly one copy of the VM runs at the end.

Why multifd and postcopy: plain precopy of a memory-busy guest under TCG in QEMU 7.2 corrupted guest memory on
the destination in about half the runs on these machines (docs/migration.md); multifd and postcopy never did.
Why not ``exec:``: the sandbox (``spawn=deny``) kills a QEMU that forks. Shared storage needs nothing special:
a QEMU started with ``-incoming`` opens its disks inactive (no write lock, no metadata cached) and activates
them only at the switch-over, after the source has flushed and inactivated its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

from corral.engine.live_migration.common import (
    ACTIVE_STATES,
    EXPORT_PREFIX,
    TCG_DOWNTIME_LIMIT_MS,
    UNTHROTTLED,
    IncomingEndpoint,
    MigrationFailed,
    MigrationProgress,
    MigrationResult,
    MigrationTuning,
    NbdEndpoint,
    NotConverging,
    PostcopyMode,
    ProgressCallback,
    log,
)
from corral.engine.live_migration.incoming import IncomingMigration
from corral.engine.live_migration.outgoing import OutgoingMigration
from corral.engine.process import QemuProcess

__all__ = [
    "ACTIVE_STATES",
    "EXPORT_PREFIX",
    "TCG_DOWNTIME_LIMIT_MS",
    "UNTHROTTLED",
    "IncomingEndpoint",
    "IncomingMigration",
    "MigrationFailed",
    "MigrationProgress",
    "MigrationResult",
    "MigrationTuning",
    "NbdEndpoint",
    "NotConverging",
    "OutgoingMigration",
    "PostcopyMode",
    "ProgressCallback",
    "migrate",
]


async def migrate(
    source: QemuProcess,
    destination: QemuProcess,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    storage_nodes: Sequence[str] = (),
    nbd_port: int | None = None,
    tuning: MigrationTuning | None = None,
    progress: ProgressCallback | None = None,
    relaunch: Callable[[], Awaitable[QemuProcess]] | None = None,
    quit_source: bool = True,
) -> MigrationResult:
    """Move the VM of ``source`` into ``destination`` (started with ``-incoming defer`` from the same plan).

    ``storage_nodes``: disk nodes to copy over NBD (no shared storage); empty when both open the same files.
    ``relaunch``: starts a fresh destination (same plan, blank disks again) for the postcopy attempt that
    follows a precopy that did not converge (``tuning.postcopy == "fallback"``); without it, NotConverging is
    raised instead. On success the destination runs the guest and the source QEMU has exited
    (``quit_source``); on any failure or cancellation the destination is killed and the source runs as before,
    then the error propagates. ``MigrationResult.attempts`` says whether a retry happened.
    """
    tuning = tuning or MigrationTuning()
    started = time.monotonic()
    try:
        result = await _migrate_once(source, destination, host, port, storage_nodes, nbd_port, tuning, progress)
        result.attempts = 1
    except NotConverging:
        if relaunch is None or tuning.postcopy != "fallback":
            raise
        log.info("precopy did not converge; starting over in postcopy mode")
        destination = await relaunch()
        result = await _migrate_once(
            source, destination, host, port, storage_nodes, nbd_port, tuning.as_postcopy(), progress
        )
        result.attempts = 2
        result.total_s = time.monotonic() - started
    if quit_source:
        await source.quit()
    return result


async def _migrate_once(
    source: QemuProcess,
    destination: QemuProcess,
    host: str,
    port: int,
    storage_nodes: Sequence[str],
    nbd_port: int | None,
    tuning: MigrationTuning,
    progress: ProgressCallback | None,
) -> MigrationResult:
    incoming = IncomingMigration(destination, tuning)
    try:
        endpoint = await incoming.prepare(host, port, nbd_port, storage_nodes)
        outgoing = OutgoingMigration(source, endpoint, tuning, progress)
        waiter = asyncio.ensure_future(incoming.wait(tuning.timeout + 30))

        async def confirm() -> bool:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), 30.0)
            except TimeoutError as exc:
                raise MigrationFailed("the destination did not report the end of the move within 30 s") from exc
            state = await destination.run_state()
            if state not in ("running", "paused"):
                raise MigrationFailed(f"the destination is {state} after the move")
            return True

        try:
            result = await outgoing.run(confirm)
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(BaseException):
                await waiter
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            result.resumed_at = waiter.result()
        await incoming.finish()
    except BaseException:
        await incoming.abort()
        raise
    if result.stopped_at is not None and result.resumed_at is not None:
        result.paused_ms = (result.resumed_at - result.stopped_at) * 1000
    return result
