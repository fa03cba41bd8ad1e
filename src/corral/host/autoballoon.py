"""Automatic ballooning: each agent steers its host's memory use under a target with the guests' balloons.

As oVirt's MoM and Proxmox do: when the host's memory use passes ``balloon_target`` (80 % by default), the
balloons of guests with free memory inflate a few percent of the VM's memory per round, never under the VM's
floor (`vm set --min-memory`, or corral.spec.vm.memory_floor) and never leaving the guest less than
``balloon_guest_min_free`` of its memory free; as pressure falls (a band under the target) they deflate back to
the VM's memory, and a guest whose free memory runs low gets memory back whatever the host's pressure.

What a round knows of a guest comes from virtio-balloon's own statistics (QMP ``qom-get`` of ``guest-stats``,
polled by QEMU every few seconds once ``guest-stats-polling-interval`` is set): a guest whose statistics are older
than a few polls (no driver, a hung guest) is never shrunk. A VM with a job running (a migration, a resize, a
snapshot) or its lock held is left alone, and so is one whose balloon has not yet reached what the last round
asked. The cgroup memory limit is left where the VM's memory puts it (host/resize_jobs.py): the balloon never
goes over that memory, and deflate-on-oom lets a squeezed guest take pages back at once, which a lowered limit
would turn into QEMU being killed. Every move is a ``vm.balloon`` event with the sizes before and after and why.

The decision is :func:`decide`, a pure function of the host's use and the guests' figures (tests/unit).

A round runs every few seconds on every host, so one with nothing to do must cost next to nothing (issue 17,
docs/performance.md): the VMs' rows and their busy jobs are two queries whatever their number, a spec is validated
once (until it changes), and when every guest has all its memory and the host is well under its target, no QMP
command is sent at all (see :func:`_nothing_to_do`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from corral.engine.argv import BALLOON_ID
from corral.errors import CorralError
from corral.spec.job import JobState
from corral.spec.sizes import format_size
from corral.spec.vm import PowerState, VMSpec, memory_floor
from corral.store import events
from corral.store.models import VM, Job

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.vm_lifecycle import RunningVM

log = logging.getLogger("corral.agent")
MiB = 1 << 20
BALLOON_PATH = f"/machine/peripheral/{BALLOON_ID}"
STATS_POLL = 2  # seconds between the guest driver's statistics reports
STALE_AFTER = 10.0  # statistics older than this (five polls missed) are not believed
SETTLE_TIME = 30.0  # a balloon that has not reached what was asked by then is taken as it is


@dataclass(frozen=True)
class Policy:
    """The knobs of a round (config.py's balloon_* settings)."""

    target: float = 0.8  # host memory use, as a fraction of its total, above which balloons inflate
    step: float = 0.05  # the most a balloon moves per round, as a fraction of the VM's memory
    guest_min_free: float = 0.15  # a guest keeps at least this fraction of its current memory free
    band: float = 0.05  # memory is given back only while use stays this fraction of the total under the target
    stale_after: float = STALE_AFTER


@dataclass(frozen=True)
class Guest:
    """One VM as a round sees it. ``available`` is the guest's own estimate of what it could use without
    swapping (MemAvailable), None when it reported nothing; ``stats_age`` is seconds since that report."""

    vm_id: str
    name: str
    memory: int  # the most the balloon gives back: the VM's memory (no more than it booted with)
    floor: int
    actual: int  # what the guest has now
    available: int | None = None
    stats_age: float | None = None
    busy: str | None = None  # why the VM is left alone this round, if it is


@dataclass(frozen=True)
class Move:
    vm_id: str
    name: str
    before: int
    after: int
    reason: str


def _mib(value: float) -> int:
    return int(value) // MiB * MiB


def _step(guest: Guest, policy: Policy) -> int:
    return max(MiB, _mib(policy.step * guest.memory))


def _fresh(guest: Guest, policy: Policy) -> bool:
    return guest.available is not None and guest.stats_age is not None and 0 <= guest.stats_age <= policy.stale_after


def _percent(value: int, total: int) -> str:
    return f"{100 * value / total:.0f} %"


def decide(used: int, total: int, guests: list[Guest], policy: Policy) -> list[Move]:
    """The balloon moves of one round for a host using ``used`` of ``total`` bytes (at most one per VM).

    1. A guest low on free memory (under ``guest_min_free`` of what it has) gets a step back, pressure or not.
    2. Over the target: guests shrink, those with the most free memory first, each by at most a step, never under
       the floor nor leaving less than ``guest_min_free`` free, and all together by no more than the excess.
    3. Under the target less the band: guests under their memory grow back, the least free first, by at most a
       step each and together by no more than the room left under that mark.
    Busy guests and guests without fresh statistics are never shrunk; a busy one is not touched at all."""
    moves: list[Move] = []
    idle = [guest for guest in guests if guest.busy is None]
    low: set[str] = set()
    for guest in idle:
        if not _fresh(guest, policy) or guest.actual >= guest.memory:
            continue
        assert guest.available is not None
        if guest.available < policy.guest_min_free * guest.actual:
            after = min(guest.memory, guest.actual + _step(guest, policy))
            moves.append(Move(guest.vm_id, guest.name, guest.actual, after, "the guest is low on free memory"))
            low.add(guest.vm_id)
            used += after - guest.actual
    target = policy.target * total
    if used > target:
        excess = used - target
        why = f"host memory use {_percent(used, total)} is over the target {_percent(int(target), total)}"
        shrinkable = [guest for guest in idle if guest.vm_id not in low and _fresh(guest, policy)]
        for guest in sorted(shrinkable, key=lambda guest: (-(guest.available or 0), guest.name)):
            assert guest.available is not None
            # What keeps the guest's free memory at guest_min_free of its new size: a - s >= f * (actual - s).
            keep_free = (guest.available - policy.guest_min_free * guest.actual) / (1 - policy.guest_min_free)
            shrink = _mib(min(_step(guest, policy), guest.actual - guest.floor, keep_free, excess + MiB - 1))
            if shrink < MiB:
                continue
            moves.append(Move(guest.vm_id, guest.name, guest.actual, guest.actual - shrink, why))
            excess -= shrink
            if excess <= 0:
                break
    elif used < target - policy.band * total:
        room = target - policy.band * total - used
        why = f"host memory use {_percent(used, total)} is under the target {_percent(int(target), total)}"
        growable = [guest for guest in idle if guest.vm_id not in low and guest.actual < guest.memory]

        def free_share(guest: Guest) -> float:
            return (guest.available or 0) / guest.actual if _fresh(guest, policy) and guest.actual else 0.0

        for guest in sorted(growable, key=lambda guest: (free_share(guest), guest.name)):
            grow = _mib(min(_step(guest, policy), guest.memory - guest.actual, room))
            if grow < MiB:
                break
            moves.append(Move(guest.vm_id, guest.name, guest.actual, guest.actual + grow, why))
            room -= grow
    return moves


# -- the agent's side ---------------------------------------------------------------------------------------------


@dataclass
class _Asked:
    target: int
    at: float


@dataclass
class _HostState:
    last_round: float = float("-inf")
    polling: dict[str, int] = field(default_factory=dict)  # vm_id -> QEMU pid whose stats polling is on
    boot_memory: dict[str, tuple[int, int]] = field(default_factory=dict)  # vm_id -> (pid, bytes)
    asked: dict[str, _Asked] = field(default_factory=dict)  # vm_id -> the last balloon size asked for
    specs: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)  # vm_id -> (spec, its memory)


_hosts: dict[str, _HostState] = {}


def policy_of(agent: Agent) -> Policy:
    settings = agent.settings
    return Policy(
        target=settings.balloon_target, step=settings.balloon_step, guest_min_free=settings.balloon_guest_min_free
    )


def host_memory() -> tuple[int, int]:
    """(in use, total) from /proc/meminfo: MemTotal less MemAvailable, what the kernel could not hand out now."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"], fields["MemTotal"]


async def _guest_stats(running: RunningVM, state: _HostState) -> tuple[int | None, float | None]:
    """(available bytes, age in seconds) from virtio-balloon's statistics, turning polling on the first time."""
    pid = running.proc.pid
    if state.polling.get(running.vm_id) != pid:
        await running.proc.execute(
            "qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": STATS_POLL}
        )
        state.polling[running.vm_id] = pid
        return None, None  # the first report comes one poll later
    answer = await running.proc.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
    stats, updated = answer.get("stats", {}), int(answer.get("last-update", 0))
    available = stats.get("stat-available-memory", -1)
    if available is None or available < 0:
        available = stats.get("stat-free-memory", -1)
    if updated <= 0 or available is None or available < 0:
        return None, None
    return int(available), time.time() - updated


async def _boot_memory(running: RunningVM, state: _HostState) -> int:
    known = state.boot_memory.get(running.vm_id)
    if known is not None and known[0] == running.proc.pid:
        return known[1]
    boot = int((await running.proc.execute("query-memory-size-summary"))["base-memory"])
    state.boot_memory[running.vm_id] = (running.proc.pid, boot)
    return boot


@dataclass(frozen=True)
class _Row:
    """What a round needs of one VM's row: its memory, floor and why it is busy, and the balloon size the sampler
    last read (corral.host.observe), None when it has none."""

    name: str
    memory: int
    floor: int
    busy: str | None
    sampled: int | None


def _memory_of(state: _HostState, vm_id: str, spec: dict[str, Any]) -> int:
    """The VM's memory from its spec, validated once per spec: comparing the stored dicts is far cheaper than
    validating 30 specs every round, and any change to the spec (a resize) makes a new one."""
    known = state.specs.get(vm_id)
    if known is not None and known[0] == spec:
        return known[1]
    memory = VMSpec.model_validate(spec).memory
    state.specs[vm_id] = (spec, memory)
    return memory


def _rows(agent: Agent, state: _HostState) -> dict[str, _Row]:
    """vm_id -> its _Row, for the running VMs this host holds: two queries whatever the number of VMs."""
    ids = list(agent.vms)
    found: dict[str, _Row] = {}
    if not ids:
        return found
    with agent.store.reading() as session:
        columns = (VM.id, VM.name, VM.host, VM.spec, VM.observed_state, VM.min_memory, VM.stats)
        vms = session.execute(select(*columns).where(VM.id.in_(ids))).all()
        active = session.execute(
            select(Job.target_id, Job.kind)
            .where(
                Job.target_kind == "vm",
                Job.target_id.in_(ids),
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
            )
            .order_by(Job.created_at)
        ).all()
    running_jobs: dict[str, str] = {}
    for target_id, kind in active:
        if target_id is not None:
            running_jobs.setdefault(target_id, kind)
    for vm_id, name, host, spec, observed, min_memory, stats in vms:
        if host != agent.host_name:
            continue
        memory = _memory_of(state, vm_id, spec)
        busy = None
        if observed != PowerState.RUNNING:
            busy = f"the VM is {observed}"
        elif vm_id in running_jobs:
            busy = f"a {running_jobs[vm_id]} job is running"
        sampled = (stats or {}).get("balloon_bytes")
        found[vm_id] = _Row(name, memory, memory_floor(memory, min_memory), busy, sampled)
    for gone in set(state.specs) - set(ids):
        del state.specs[gone]
    return found


def _nothing_to_do(agent: Agent, state: _HostState, rows: dict[str, _Row], policy: Policy) -> bool:
    """True when no move is possible without asking QEMU anything: every guest has all its memory (as the sampler
    last read it), none has a balloon still moving, and the host is at least a band under its target. Then
    nothing may shrink (no pressure) and nothing has anything to get back (decide's rules 1 and 3 only touch a
    guest under its memory), so the round's QMP reads (three per VM) are skipped."""
    if state.asked or not rows:
        return False
    if any(row.sampled is None or row.sampled < row.memory for row in rows.values()):
        return False
    budget = agent.settings.balloon_host_memory
    if budget is not None:
        used, total = sum(row.sampled or 0 for row in rows.values()), budget
    else:
        used, total = host_memory()
    return used <= (policy.target - policy.band) * total


async def _guest(agent: Agent, running: RunningVM, row: _Row, state: _HostState) -> Guest:
    name, memory, floor, busy = row.name, row.memory, row.floor, row.busy
    if busy is None and agent.vm_locks[running.vm_id].locked():
        busy = "another change holds the VM"
    actual = int((await running.proc.execute("query-balloon"))["actual"])
    ceiling = min(memory, await _boot_memory(running, state))
    asked = state.asked.get(running.vm_id)
    if asked is not None and busy is None:
        if abs(actual - asked.target) <= MiB or time.monotonic() - asked.at > SETTLE_TIME:
            del state.asked[running.vm_id]
        else:
            busy = f"the balloon is still moving to {format_size(asked.target)}"
    available, age = await _guest_stats(running, state) if busy is None else (None, None)
    return Guest(running.vm_id, name, ceiling, min(floor, ceiling), actual, available, age, busy)


async def _apply(agent: Agent, move: Move, used: int, total: int, state: _HostState) -> None:
    running = agent.vms.get(move.vm_id)
    if running is None or running.proc.exited:
        return
    lock = agent.vm_locks[move.vm_id]
    if lock.locked():
        return
    async with lock:
        await running.proc.execute("balloon", {"value": move.after})
    state.asked[move.vm_id] = _Asked(move.after, time.monotonic())
    log.info("VM %s: balloon %s -> %s (%s)", move.name, format_size(move.before), format_size(move.after), move.reason)
    data: dict[str, Any] = {
        "before": move.before,
        "after": move.after,
        "reason": move.reason,
        "host_used": used,
        "host_total": total,
    }
    with agent.store.session() as session:
        vm = session.get(VM, move.vm_id)
        if vm is not None:
            vm.stats = {**(vm.stats or {}), "balloon_bytes": move.after, "balloon_target": move.after}
            session.add(events.make(session, vm, "vm", "vm.balloon", data))
    agent.store.notifier.notify()


async def balance(agent: Agent) -> list[Move]:
    """One round: read the host's and the guests' memory, decide, move the balloons. Returns the moves made."""
    state = _hosts.setdefault(agent.host_name, _HostState())
    rows = _rows(agent, state)
    policy = policy_of(agent)
    if _nothing_to_do(agent, state, rows, policy):
        return []
    guests: list[Guest] = []
    for vm_id, running in list(agent.vms.items()):
        if running.proc.exited or vm_id not in rows:
            continue
        try:
            guests.append(await _guest(agent, running, rows[vm_id], state))
        except (CorralError, KeyError, TypeError, ValueError) as exc:  # no balloon device, QEMU going away
            log.debug("VM %s left out of the balloon round: %s", vm_id, exc)
    for gone in set(state.polling) - set(agent.vms):
        state.polling.pop(gone, None)
        state.boot_memory.pop(gone, None)
        state.asked.pop(gone, None)
    budget = agent.settings.balloon_host_memory
    if budget is not None:
        # The guests' memory is the host's use: a pending target counts as reached (it will be, within seconds).
        used = sum(state.asked[g.vm_id].target if g.vm_id in state.asked else g.actual for g in guests)
        total = budget
    else:
        used, total = host_memory()
    moves = decide(used, total, guests, policy)
    for move in moves:
        try:
            await _apply(agent, move, used, total, state)
        except CorralError as exc:
            log.warning("VM %s: the balloon did not move: %s", move.name, exc)
    return moves


async def tick(agent: Agent) -> None:
    """Run a round when one is due (called from the agent's reconcile pass); its trouble never stops the agent."""
    if not agent.settings.autoballoon:
        return
    state = _hosts.setdefault(agent.host_name, _HostState())
    now = time.monotonic()
    if now - state.last_round < agent.settings.balloon_interval:
        return
    state.last_round = now
    try:
        await balance(agent)
    except Exception:
        log.exception("automatic ballooning round failed on host %s", agent.host_name)
