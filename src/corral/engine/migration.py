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
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from corral.engine.process import QemuProcess
from corral.errors import CorralError, EngineError

log = logging.getLogger("corral.engine.migration")

UNTHROTTLED = 1 << 40  # bytes/s; QEMU's default migration bandwidth (128 MiB/s) would stretch every move
ACTIVE_STATES = ("setup", "active", "device", "pre-switchover", "postcopy-active", "wait-unplug")
EXPORT_PREFIX = "mig-"

PostcopyMode = Literal["never", "fallback", "always"]


# QEMU 7.2's TCG loses guest writes that race a dirty-bitmap sync done while the guest runs: the sync clears a
# page's dirty bit before the vCPUs' TLBs are re-armed to report writes, so a write in between is never sent
# again. Measured with a guest rewriting and checksumming 64 MiB (tests/integration/test_migration.py): 50 ms
# downtime limit, 3 of 9 moves corrupted or hung the guest; guest paused for the whole copy, 0 of 5; this limit,
# 0 of 9. With it QEMU stops the guest at its first convergence check (after ~0.1 s of live copying, before any
# sync while the guest runs) and copies the rest with the guest paused: a 256 MiB busy guest pauses ~0.3 s.
# KVM's dirty logging has no such race, so KVM keeps the short downtime limit.
TCG_DOWNTIME_LIMIT_MS = 600_000


class MigrationTuning(BaseModel):
    """How to send RAM. The defaults aim at the shortest pause of the guest, not at the least bandwidth."""

    model_config = ConfigDict(frozen=True)

    # multifd: RAM pages go over several TCP connections, each with its own thread. 0 turns it off (plain
    # precopy, which corrupted busy guests under TCG here: keep it on unless postcopy is forced).
    multifd_channels: int = 4
    max_bandwidth: int = UNTHROTTLED  # bytes/s
    # QEMU stops the source for the final copy only when what is left can be sent within this many ms.
    downtime_limit_ms: int = 50
    # Under TCG, copy RAM with the guest paused after the first pass (see TCG_DOWNTIME_LIMIT_MS). Only a test of
    # the live machinery itself should turn this off.
    tcg_safe: bool = True
    # never: multifd precopy only (fails after ``timeout`` if it does not converge); fallback: multifd precopy
    # for ``converge_within`` seconds, then cancel and start over in postcopy (raises NotConverging to let the
    # caller make a fresh destination); always: postcopy (single channel) once the first pass of RAM is sent.
    postcopy: PostcopyMode = "fallback"
    converge_within: float = 20.0
    # Slow the guest's vCPU when precopy does not converge (auto-converge), starting at this percentage.
    auto_converge: bool = True
    throttle_initial: int = 30
    throttle_increment: int = 20
    timeout: float = 900.0  # the whole move, disks included
    poll_interval: float = 0.1

    @property
    def uses_postcopy(self) -> bool:
        """This attempt arms postcopy (and so, in QEMU 7.2, gives up multifd)."""
        return self.postcopy == "always"

    def as_postcopy(self) -> MigrationTuning:
        """The tuning of the second attempt after precopy did not converge."""
        return self.model_copy(update={"postcopy": "always"})


class NbdEndpoint(BaseModel):
    """Where the destination's NBD server listens for disk mirroring."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int


class IncomingEndpoint(BaseModel):
    """What the destination tells the source: where to send RAM and, without shared storage, disks."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    nbd: NbdEndpoint | None = None
    exports: dict[str, str] = {}  # disk node -> NBD export name
    postcopy: bool = False  # the destination accepted postcopy (userfaultfd usable there)
    multifd_channels: int = 0

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


class MigrationProgress(BaseModel):
    """A sample of a running migration, for a job's progress bar and log."""

    phase: Literal["disks", "ram", "postcopy", "finishing"]
    elapsed: float
    disk_total: int = 0
    disk_done: int = 0
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    dirty_rate: int = 0  # bytes/s the guest dirties, as QEMU measured during the last pass
    throughput_mbps: float = 0.0
    passes: int = 0  # dirty-sync-count: how many times RAM was (re)scanned
    throttle_percent: int = 0

    @property
    def fraction(self) -> float:
        """A rough 0..1 for a progress bar: disks first, then RAM (its remaining part can grow again)."""
        if self.phase == "disks":
            return 0.5 * self.disk_done / self.disk_total if self.disk_total else 0.0
        start = 0.5 if self.disk_total else 0.0
        if self.phase == "finishing":
            return 0.99
        sent = self.ram_total - self.ram_remaining if self.ram_total else 0
        return min(0.98, start + (1 - start) * (sent / self.ram_total if self.ram_total else 0.0))

    def describe(self) -> str:
        mib = 1 << 20
        if self.phase == "disks":
            return f"mirroring disks: {self.disk_done // mib}/{self.disk_total // mib} MiB"
        text = (
            f"{self.phase}: {self.ram_transferred // mib} MiB sent, {self.ram_remaining // mib} MiB left, "
            f"pass {self.passes}, guest dirties {self.dirty_rate // mib} MiB/s"
        )
        return text + (f", throttled {self.throttle_percent}%" if self.throttle_percent else "")


ProgressCallback = Callable[[MigrationProgress], Any]


class MigrationResult(BaseModel):
    """What a finished move cost."""

    total_s: float  # from the first command to the destination running on its own
    disk_s: float = 0.0  # of which disk mirroring until ready
    ram_s: float = 0.0  # of which RAM
    downtime_ms: float | None = None  # QEMU's own figure (query-migrate "downtime")
    # The guest's pause as the QMP events show it: source STOP to destination RESUME (wall-clock timestamps,
    # so across hosts it includes their clock offset).
    paused_ms: float | None = None
    postcopy: bool = False
    attempts: int = 1  # 2 when precopy did not converge and postcopy finished the move
    paused_copy: bool = False  # the guest was paused for most of the RAM copy (TCG)
    ram_transferred: int = 0
    passes: int = 0
    throttle_percent: int = 0
    stopped_at: float | None = None  # wall-clock time of the source's STOP event
    resumed_at: float | None = None  # wall-clock time of the destination's RESUME event


class MigrationFailed(EngineError):
    """The move did not happen; the source still runs the VM (unless ``vm_lost``)."""

    code = "migration-failed"

    def __init__(self, message: str, hint: str | None = None, vm_lost: bool = False) -> None:
        super().__init__(message, hint)
        self.vm_lost = vm_lost


class NotConverging(MigrationFailed):
    """Precopy did not converge within the bound; the source runs on, the destination must be started anew
    for a postcopy attempt (QEMU exits when an incoming migration is cancelled)."""

    code = "migration-not-converging"


def _stamp(event: Any) -> float:
    """The wall-clock time QEMU put on an event, in seconds."""
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


async def _kvm_enabled(proc: QemuProcess) -> bool:
    try:
        return bool((await proc.execute("query-kvm")).get("enabled"))
    except CorralError:
        return False


async def _set_capabilities(proc: QemuProcess, capabilities: dict[str, bool]) -> None:
    caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
    await proc.execute("migrate-set-capabilities", {"capabilities": caps})


# -- destination ----------------------------------------------------------------------------------------------


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
                await _set_capabilities(self.proc, {"postcopy-ram": True})
                postcopy = True
            except EngineError as exc:
                log.info("postcopy unavailable on the destination: %s", exc)
        if self.tuning.multifd_channels and not postcopy:
            await _set_capabilities(self.proc, {"multifd": True})
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
                self._resumed_at = _stamp(event)

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


# -- source ---------------------------------------------------------------------------------------------------


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
                    result.stopped_at = _stamp(events[-1])
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
        await _set_capabilities(
            self.proc,
            {
                "multifd": multifd,
                "postcopy-ram": postcopy,
                "auto-converge": tuning.auto_converge,
            },
        )
        self.paused_copy = tuning.tcg_safe and not await _kvm_enabled(self.proc)
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


# -- both sides in one process --------------------------------------------------------------------------------


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
