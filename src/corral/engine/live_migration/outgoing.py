"""The source's half of a live migration: mirror the disks into the destination's NBD exports (without shared
storage), then send RAM, and roll back (the source keeps running) on any failure (see the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from corral.engine.live_migration.common import (
    ACTIVE_STATES,
    EXPORT_PREFIX,
    TCG_DOWNTIME_LIMIT_MS,
    IncomingEndpoint,
    MigrationFailed,
    MigrationProgress,
    MigrationResult,
    MigrationTuning,
    NotConverging,
    ProgressCallback,
    event_time,
    kvm_enabled,
    log,
    set_capabilities,
)
from corral.engine.process import QemuProcess
from corral.errors import CorralError, EngineError


class OutgoingMigration:
    """The source's side: mirror disks (without shared storage), send RAM, hand over, clean up.

    ``run()`` either returns a MigrationResult, with the source QEMU left paused in ``postmigrate`` (the caller
    quits it once it knows the destination runs), or raises with the source running the guest as before: any
    failure, a cancelled task, or a progress callback that raises (a cancelled job) rolls back.
    """

    def __init__(
        self,
        proc: QemuProcess,
        endpoint: IncomingEndpoint,
        tuning: MigrationTuning | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.proc = proc
        self.endpoint = endpoint
        self.tuning = tuning or MigrationTuning()
        self.progress = progress
        self._started = 0.0
        self._mirrors: list[str] = []  # disk nodes with a mirror job / nbd target node
        self._targets: list[str] = []
        self._migrating = False
        self._postcopy_started = False
        self._was_running = True
        self.paused_copy = False  # the guest is paused for most of the RAM copy (TCG: see TCG_DOWNTIME_LIMIT_MS)

    def _report(self, sample: MigrationProgress) -> None:
        if self.progress is not None:
            self.progress(sample)  # may raise (a cancelled job): that aborts the move

    async def run(self, confirm: Callable[[], Awaitable[bool]] | None = None) -> MigrationResult:
        """The whole move. ``confirm`` (optional) is asked after the RAM stream completed whether the
        destination runs the VM; if it says no, the source resumes and the move fails."""
        self._started = time.monotonic()
        self._was_running = await self.proc.run_state() == "running"
        result = MigrationResult(total_s=0.0)
        try:
            with self.proc.listener("STOP") as stops:
                if self.endpoint.exports:
                    await self._mirror_disks()
                    result.disk_s = time.monotonic() - self._started
                ram_started = time.monotonic()
                await self._send_ram(result)
                result.ram_s = time.monotonic() - ram_started
                events = stops.clear()
                if events:
                    result.stopped_at = event_time(events[-1])
            if confirm is not None and not await confirm():
                raise MigrationFailed("the destination does not run the VM after the move")
            await self._finish_mirrors()
        except BaseException as exc:
            await self._roll_back()
            if isinstance(exc, CorralError | asyncio.CancelledError):
                raise
            raise MigrationFailed(f"the migration failed: {exc}") from exc
        result.total_s = time.monotonic() - self._started
        return result

    # disks

    async def _mirror_disks(self) -> None:
        nbd = self.endpoint.nbd
        assert nbd is not None
        for node, export in self.endpoint.exports.items():
            target = f"{EXPORT_PREFIX}{node}"
            await self.proc.execute(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": target,
                    "export": export,
                    "server": {"type": "inet", "host": nbd.host, "port": str(nbd.port)},
                },
            )
            self._targets.append(target)
            await self.proc.execute(
                "blockdev-mirror",
                {
                    "job-id": target,
                    "device": node,
                    "target": target,
                    "sync": "full",
                    "copy-mode": "write-blocking",
                    "auto-dismiss": False,
                },
            )
            self._mirrors.append(target)
        deadline = self._started + self.tuning.timeout
        while True:
            jobs = {job["device"]: job for job in await self.proc.execute("query-block-jobs")}
            total = done = 0
            for job_id in self._mirrors:
                job = jobs.get(job_id)
                if job is None or job.get("status") in ("concluded", "null", "aborting"):
                    error = job.get("error") if job else None
                    raise MigrationFailed(
                        f"mirroring {job_id.removeprefix(EXPORT_PREFIX)} to the destination "
                        f"stopped: {error or 'the job ended'}"
                    )
                total += int(job.get("len", 0))
                done += int(job.get("offset", 0))
            ready = all(jobs[job_id].get("ready") for job_id in self._mirrors)
            self._report(
                MigrationProgress(
                    phase="disks", elapsed=time.monotonic() - self._started, disk_total=total, disk_done=done
                )
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise MigrationFailed(f"the disks were not mirrored within {self.tuning.timeout:.0f} s")
            await asyncio.sleep(self.tuning.poll_interval)

    async def _finish_mirrors(self) -> None:
        """The destination runs on its own copy: stop mirroring without pivoting (a ready mirror's cancel)."""
        for job_id in self._mirrors:
            with contextlib.suppress(EngineError):
                await self.proc.execute("block-job-cancel", {"device": job_id})
        await self._dismiss_jobs()

    async def _dismiss_jobs(self, force: bool = False) -> None:
        deadline = time.monotonic() + 30.0
        pending = list(self._mirrors)
        while pending:
            jobs = {job["id"]: job for job in await self.proc.execute("query-jobs")}
            for job_id in list(pending):
                job = jobs.get(job_id)
                if job is None:
                    pending.remove(job_id)
                elif job.get("status") == "concluded":
                    with contextlib.suppress(EngineError):
                        await self.proc.execute("job-dismiss", {"id": job_id})
                    pending.remove(job_id)
            if not pending:
                break
            if time.monotonic() > deadline:
                if not force:
                    raise MigrationFailed("the disk mirror jobs did not stop")
                log.warning("mirror jobs %s did not stop", pending)
                break
            await asyncio.sleep(0.02)
        self._mirrors = []
        for target in self._targets:
            with contextlib.suppress(EngineError):
                await self.proc.execute("blockdev-del", {"node-name": target})
        self._targets = []

    # RAM

    async def _configure(self) -> bool:
        """Capabilities and parameters for this move; returns whether postcopy is armed."""
        tuning = self.tuning
        postcopy = tuning.uses_postcopy and self.endpoint.postcopy
        multifd = tuning.multifd_channels > 0 and self.endpoint.multifd_channels > 0 and not postcopy
        await set_capabilities(
            self.proc,
            {
                "multifd": multifd,
                "postcopy-ram": postcopy,
                "auto-converge": tuning.auto_converge,
                # A fork leaves it on in its parent and children (engine/fork.py): a move sends all the RAM.
                "x-ignore-shared": False,
            },
        )
        self.paused_copy = tuning.tcg_safe and not await kvm_enabled(self.proc)
        parameters: dict[str, Any] = {
            "max-bandwidth": tuning.max_bandwidth,
            "downtime-limit": TCG_DOWNTIME_LIMIT_MS if self.paused_copy else tuning.downtime_limit_ms,
            "cpu-throttle-initial": tuning.throttle_initial,
            "cpu-throttle-increment": tuning.throttle_increment,
        }
        if multifd:
            parameters["multifd-channels"] = self.endpoint.multifd_channels
        await self.proc.execute("migrate-set-parameters", parameters)
        return postcopy

    async def _send_ram(self, result: MigrationResult) -> None:
        postcopy_armed = await self._configure()
        started = time.monotonic()
        await self.proc.execute("migrate", {"uri": self.endpoint.uri})
        self._migrating = True
        deadline = self._started + self.tuning.timeout
        while True:
            info = await self.proc.execute("query-migrate")
            status = info.get("status")
            ram = info.get("ram", {})
            sample = MigrationProgress(
                phase="postcopy" if status == "postcopy-active" else "ram",
                elapsed=time.monotonic() - self._started,
                ram_total=int(ram.get("total", 0)),
                ram_transferred=int(ram.get("transferred", 0)),
                ram_remaining=int(ram.get("remaining", 0)),
                dirty_rate=int(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096)),
                throughput_mbps=float(ram.get("mbps", 0.0)),
                passes=int(ram.get("dirty-sync-count", 0)),
                throttle_percent=int(info.get("cpu-throttle-percentage", 0)),
            )
            if status == "completed":
                self._migrating = False
                result.downtime_ms = float(info["downtime"]) if "downtime" in info else None
                result.ram_transferred = sample.ram_transferred
                result.passes = sample.passes
                result.postcopy = self._postcopy_started
                result.paused_copy = self.paused_copy
                result.throttle_percent = sample.throttle_percent
                self._report(sample.model_copy(update={"phase": "finishing"}))
                return
            if status in ("failed", "cancelled", "postcopy-paused", "postcopy-recover"):
                self._migrating = status.startswith("postcopy")
                raise MigrationFailed(
                    f"the migration {status}: {info.get('error-desc', 'no reason given')}",
                    vm_lost=status.startswith("postcopy"),
                )
            self._report(sample)
            now = time.monotonic()
            if postcopy_armed and not self._postcopy_started and status == "active" and sample.passes >= 2:
                log.info("switching to postcopy after %.1f s (pass %d)", now - started, sample.passes)
                await self.proc.execute("migrate-start-postcopy")
                self._postcopy_started = True
            if (
                self.tuning.postcopy == "fallback"
                and not postcopy_armed
                and now - started > self.tuning.converge_within
            ):
                raise NotConverging(
                    f"precopy did not converge within {self.tuning.converge_within:.0f} s "
                    f"(guest dirties {sample.dirty_rate >> 20} MiB/s)",
                    "retry in postcopy mode",
                )
            if now > deadline and not self._postcopy_started:
                raise MigrationFailed(
                    f"precopy did not converge within {self.tuning.timeout:.0f} s",
                    "allow postcopy, or raise the bandwidth or the downtime limit",
                )
            await asyncio.sleep(self.tuning.poll_interval)

    async def _roll_back(self) -> None:
        """Give the guest back to the source: cancel the stream and the mirror jobs, resume if needed."""
        if self.proc.exited:
            return
        with contextlib.suppress(EngineError):
            status = (await self.proc.execute("query-migrate")).get("status")
            if status in ACTIVE_STATES:
                if status == "postcopy-active" or self._postcopy_started:
                    log.error("a postcopy migration failed: the VM's state is split between the two hosts")
                else:
                    await self.proc.execute("migrate_cancel")
                    await _wait_status_left(self.proc, (*ACTIVE_STATES, "cancelling"), 10.0)
        for job_id in self._mirrors:
            with contextlib.suppress(EngineError):
                await self.proc.execute("block-job-cancel", {"device": job_id, "force": True})
        with contextlib.suppress(EngineError):
            await self._dismiss_jobs(force=True)
        if self._postcopy_started:
            return
        with contextlib.suppress(EngineError):
            state = await self.proc.run_state()
            # postmigrate: the stream completed but the destination did not take over; cont re-activates the
            # disks (QEMU inactivated them for the handover) and runs the guest here again.
            if self._was_running and state in ("paused", "postmigrate", "finish-migrate"):
                await self.proc.resume()


async def _wait_status_left(proc: QemuProcess, states: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await proc.execute("query-migrate")).get("status") not in states:
            return
        await asyncio.sleep(0.02)
