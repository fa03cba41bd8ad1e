"""What both sides of a live migration share: its tuning, the endpoint the destination publishes, progress
samples, the result, the errors, and the small QMP steps both take (capabilities, event times)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from corral.engine.process import QemuProcess
from corral.errors import CorralError, EngineError

log = logging.getLogger("corral.engine.live_migration")  # one logger for both sides and the package

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


def event_time(event: Any) -> float:
    """The wall-clock time QEMU put on an event, in seconds."""
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


async def kvm_enabled(proc: QemuProcess) -> bool:
    try:
        return bool((await proc.execute("query-kvm")).get("enabled"))
    except CorralError:
        return False


async def set_capabilities(proc: QemuProcess, capabilities: dict[str, bool]) -> None:
    caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
    await proc.execute("migrate-set-capabilities", {"capabilities": caps})
