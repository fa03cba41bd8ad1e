"""The balancing and consolidation planners: pure functions over a pool view, no store and no side effects.

Both work on placement's own model (``placement.HostLoad``: capacity under the overcommit ratios, what is
allocated, and the filters a host applies: state, drain, standby, accelerator, bridges, storage reach), so a
planned move is one the scheduler would accept. Group rules are the pool's: a VM never lands beside a member of
its anti-affinity group, and VMs of an affinity group are never moved (moving one would split the group).

**Balancing** (like vSphere DRS). A host's *load* is the larger of its CPU and memory use, each over what the
host physically has: CPU from the VMs' average CPUs busy over the window (corral.cluster.usage), memory from
their average memory in use; a VM without history counts what it was given. The pool's *imbalance score* is the
standard deviation of the loads of the hosts that take work. A greedy search moves, at each step, the VM whose
move lowers the score most, and stops when the best move gains less than the threshold asks (1 = only large
gains, 5 = small ones too) or at ``max_moves``.

**Consolidation** (like DPM). Frees the most hosts with the fewest moves, counting capacity as placement does
(allocations, not usage: a consolidated host must still honour every VM's reservation). Hosts are tried from
the cheapest to empty (fewest VMs, then least allocated); each one's VMs go, largest first, to the fullest
remaining host that fits (best fit), and the host is freed only if all of them fit and **N+1** still holds: the
hosts left awake could lose their largest one and still hold every allocation in aggregate.

The plan's check against HiGHS (the optimum, or a bound no packing can beat) is corral.cluster.packing_bound.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, insort
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from corral.cluster.placement import HostLoad, PlacementRequest, Policy

# Threshold 1..5 -> the least a move must lower the imbalance score by (DRS's migration threshold).
THRESHOLDS = {1: 0.20, 2: 0.10, 3: 0.05, 4: 0.02, 5: 0.005}
DEFAULT_THRESHOLD = 3


@dataclass
class Guest:
    """One VM as the planners see it. ``request``: what it needs from a host (as for a migration: its disks
    count as storage unless the target shares its pool); ``cpu_used``/``memory_used``: averages from the
    history (None: none yet); ``movable``: running, not busy, not in an affinity group."""

    id: str
    name: str
    project: str
    host: str
    request: PlacementRequest
    movable: bool = True
    cpu_used: float | None = None
    memory_used: float | None = None
    why_pinned: str = ""

    @property
    def group(self) -> tuple[str, str] | None:
        if self.request.group and self.request.policy == Policy.ANTI_AFFINITY:
            return (self.project, self.request.group)
        return None


@dataclass
class Move:
    vm: str
    vm_id: str
    project: str
    source: str
    target: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "vm_id": self.vm_id,
            "project": self.project,
            "from": self.source,
            "to": self.target,
            "reason": self.reason,
        }


class Pool:
    """Hosts and guests with what each host holds, updated as moves are tried: the planners' working state."""

    def __init__(self, hosts: dict[str, HostLoad], guests: list[Guest]) -> None:
        self.hosts = hosts
        self.guests = guests
        self.on: dict[str, list[Guest]] = defaultdict(list)
        self.groups: dict[str, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        for guest in guests:
            self.on[guest.host].append(guest)
            if guest.group:
                self.groups[guest.host][guest.group] += 1

    @staticmethod
    def _shared(source: HostLoad | None, target: HostLoad) -> bool:
        ours = source.pool_ids.get("default") if source is not None else None
        return ours is not None and ours == target.pool_ids.get("default")

    def need(self, guest: Guest, target: HostLoad) -> PlacementRequest:
        """What ``guest`` asks of ``target``: without its disks when the two hosts share their storage pool."""
        request = guest.request
        if request.storage and self._shared(self.hosts.get(guest.host), target):
            request = request.model_copy(update={"storage": 0})
        return request

    def why_not(self, guest: Guest, target: HostLoad) -> str | None:
        """None when ``guest`` may move to ``target`` now, else placement's reason (or the group's)."""
        if target.name == guest.host:
            return "it is already there"
        reason = target.fits(self.need(guest, target))
        if reason is None and guest.group and self.groups[target.name].get(guest.group):
            reason = f"anti-affinity: a VM of group {guest.group[1]} is already here"
        return reason

    def move(self, guest: Guest, target: HostLoad) -> None:
        source = self.hosts[guest.host]
        request = self.need(guest, target)
        target.add(request.model_copy(update={"group": None}))
        source.cpus_alloc -= guest.request.cpus
        source.memory_alloc -= guest.request.memory
        source.storage_alloc -= request.storage
        source.vms -= 1
        self.on[guest.host].remove(guest)
        self.on[target.name].append(guest)
        if guest.group:
            self.groups[guest.host][guest.group] -= 1
            self.groups[target.name][guest.group] += 1
        guest.host = target.name


def takes_work(load: HostLoad) -> bool:
    return load.state == "online" and not load.drained and not load.standby and load.qemu


# -- balancing ------------------------------------------------------------------------------------------------


def demand(guest: Guest) -> tuple[float, float]:
    """CPUs busy and bytes in use: the history's averages, else what the VM was given."""
    cpu = guest.cpu_used if guest.cpu_used is not None else float(guest.request.cpus)
    memory = guest.memory_used if guest.memory_used is not None else float(guest.request.memory)
    return cpu, memory


def host_load(load: HostLoad, cpu: float, memory: float) -> float:
    cpu_share = cpu / load.cpus if load.cpus else 0.0
    memory_share = memory / load.mem_usable if load.mem_usable else 0.0
    return max(cpu_share, memory_share)


def _stddev(values: list[float]) -> float:
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(max(0.0, sum((v - mean) ** 2 for v in values) / len(values)))


@dataclass
class Balance:
    threshold: int
    score_before: float
    score_after: float
    loads_before: dict[str, float]
    loads_after: dict[str, float]
    moves: list[Move] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "min_gain": THRESHOLDS[self.threshold],
            "score_before": round(self.score_before, 4),
            "score_after": round(self.score_after, 4),
            "loads_before": {k: round(v, 4) for k, v in self.loads_before.items()},
            "loads_after": {k: round(v, 4) for k, v in self.loads_after.items()},
        }


def balance(
    hosts: dict[str, HostLoad], guests: list[Guest], threshold: int = DEFAULT_THRESHOLD, max_moves: int = 10
) -> Balance:
    """Moves that lower the imbalance score by at least the threshold's gain each, best first."""
    pool = Pool(hosts, guests)
    active = sorted(name for name, load in hosts.items() if takes_work(load))
    cpu = {name: 0.0 for name in active}
    memory = {name: 0.0 for name in active}
    for guest in guests:
        if guest.host in cpu:
            c, m = demand(guest)
            cpu[guest.host] += c
            memory[guest.host] += m

    def loads() -> dict[str, float]:
        return {name: host_load(hosts[name], cpu[name], memory[name]) for name in active}

    before = loads()
    current = dict(before)
    n = len(active)
    total, squares = sum(current.values()), sum(v * v for v in current.values())

    def score(total: float, squares: float) -> float:
        return math.sqrt(max(0.0, squares / n - (total / n) ** 2)) if n else 0.0

    gain_needed = THRESHOLDS[threshold]
    moves: list[Move] = []
    while len(moves) < max_moves and n > 1:
        now = score(total, squares)
        best: tuple[float, Guest, str, float, float] | None = None
        # Sources: the busiest hosts; a move from a host below the mean cannot lower the deviation much.
        mean = total / n
        for source in sorted((name for name in active if current[name] > mean), key=lambda h: -current[h])[:8]:
            for guest in pool.on[source]:
                if not guest.movable:
                    continue
                c, m = demand(guest)
                src_after = host_load(hosts[source], cpu[source] - c, memory[source] - m)
                for target in active:
                    if target == source or current[target] >= current[source]:
                        continue
                    tgt_after = host_load(hosts[target], cpu[target] + c, memory[target] + m)
                    new_total = total - current[source] - current[target] + src_after + tgt_after
                    new_squares = squares - current[source] ** 2 - current[target] ** 2 + src_after**2 + tgt_after**2
                    gain = now - score(new_total, new_squares)
                    if (best is None or gain > best[0]) and pool.why_not(guest, hosts[target]) is None:
                        best = (gain, guest, target, src_after, tgt_after)
        if best is None or best[0] < gain_needed:
            break
        gain, guest, target, src_after, tgt_after = best
        source = guest.host
        c, m = demand(guest)
        total += src_after + tgt_after - current[source] - current[target]
        squares += src_after**2 + tgt_after**2 - current[source] ** 2 - current[target] ** 2
        cpu[source] -= c
        memory[source] -= m
        cpu[target] += c
        memory[target] += m
        current[source], current[target] = src_after, tgt_after
        moves.append(
            Move(
                guest.name,
                guest.id,
                guest.project,
                source,
                target,
                f"{source} {before[source]:.0%} -> {src_after:.0%} loaded, {target} "
                f"{tgt_after:.0%}; the score falls by {gain:.3f}",
            )
        )
        pool.move(guest, hosts[target])
    return Balance(
        threshold=threshold,
        score_before=_stddev(list(before.values())),
        score_after=_stddev(list(current.values())),
        loads_before=before,
        loads_after=current,
        moves=moves,
    )


# -- consolidation --------------------------------------------------------------------------------------------


@dataclass
class Consolidation:
    hosts_before: int  # hosts taking work, before
    hosts_used: int  # hosts left awake by the heuristic (those with VMs, and the N+1 spare capacity)
    freed: list[str]
    moves: list[Move]
    seconds: float
    optimum_hosts_used: int | None = None
    bound_hosts_used: int | None = None
    solver: str = ""
    solver_seconds: float = 0.0

    @property
    def reference(self) -> int | None:
        return self.optimum_hosts_used if self.optimum_hosts_used is not None else self.bound_hosts_used

    @property
    def gap(self) -> float | None:
        ref = self.reference
        return None if not ref else round((self.hosts_used - ref) / ref, 4)

    def summary(self) -> dict[str, Any]:
        return {
            "hosts_before": self.hosts_before,
            "hosts_used": self.hosts_used,
            "hosts_freed": len(self.freed),
            "freed": self.freed,
            "optimum_hosts_used": self.optimum_hosts_used,
            "bound_hosts_used": self.bound_hosts_used,
            "gap": self.gap,
            "solver": self.solver,
            "seconds": round(self.seconds, 3),
            "solver_seconds": round(self.solver_seconds, 3),
            "moves_per_freed_host": round(len(self.moves) / len(self.freed), 2) if self.freed else None,
        }


def _spare_ok(hosts: dict[str, HostLoad], awake: set[str]) -> bool:
    """N+1: the awake hosts less their largest still hold every allocation (CPU and memory, in aggregate)."""
    if not awake:
        return True
    cpu_caps = [hosts[name].cpu_cap for name in awake]
    mem_caps = [hosts[name].mem_cap for name in awake]
    cpu_need = sum(hosts[name].cpus_alloc for name in awake)
    mem_need = sum(hosts[name].memory_alloc for name in awake)
    return sum(cpu_caps) - max(cpu_caps) >= cpu_need and sum(mem_caps) - max(mem_caps) >= mem_need


class _Free:
    """Awake hosts ordered by memory left, for best fit: the fullest host that still has room comes first."""

    def __init__(self, hosts: dict[str, HostLoad], names: set[str]) -> None:
        self.hosts = hosts
        self.keys: list[tuple[float, str]] = sorted((self._left(hosts[n]), n) for n in names)

    @staticmethod
    def _left(load: HostLoad) -> float:
        return load.mem_cap - load.memory_alloc

    def remove(self, name: str) -> None:
        key = (self._left(self.hosts[name]), name)
        index = bisect_left(self.keys, key)
        if index < len(self.keys) and self.keys[index] == key:
            del self.keys[index]

    def add(self, name: str) -> None:
        insort(self.keys, (self._left(self.hosts[name]), name))

    def candidates(self, memory: int) -> Any:
        start = bisect_left(self.keys, (float(memory), ""))
        for index in range(start, len(self.keys)):
            yield self.keys[index][1]


def consolidate(hosts: dict[str, HostLoad], guests: list[Guest], keep_spare: bool = True) -> Consolidation:
    """The heuristic plan (packing_bound.exact puts the solver's optimum or bound beside it)."""
    started = time.perf_counter()
    pool = Pool(hosts, guests)
    awake = {name for name, load in hosts.items() if takes_work(load)}
    used_before = len(awake)
    free = _Free(hosts, awake)
    freed: list[str] = []
    moves: list[Move] = []

    def emptiable(name: str) -> bool:
        return all(guest.movable for guest in pool.on[name])

    # Small hosts first (the big ones hold more of what the pool needs awake), and among alike hosts the empty
    # ones (freed without a move), then the cheapest to empty.
    top_cpu = max((hosts[name].cpu_cap for name in awake), default=1.0) or 1.0
    top_mem = max((hosts[name].mem_cap for name in awake), default=1.0) or 1.0
    order = sorted(
        (name for name in awake if emptiable(name)),
        key=lambda name: (
            round(hosts[name].cpu_cap / top_cpu + hosts[name].mem_cap / top_mem, 3),
            len(pool.on[name]),
            hosts[name].utilisation(),
            name,
        ),
    )
    for name in order:
        if name not in awake or len(awake) <= 1:
            continue
        free.remove(name)
        placed: list[tuple[Guest, str]] = []
        ok = True
        for guest in sorted(pool.on[name], key=lambda g: (-g.request.memory, -g.request.cpus, g.name)):
            target = None
            for candidate in free.candidates(guest.request.memory):
                if pool.why_not(guest, hosts[candidate]) is None:
                    target = candidate
                    break
            if target is None:
                ok = False
                break
            free.remove(target)
            pool.move(guest, hosts[target])
            free.add(target)
            placed.append((guest, target))
        awake.discard(name)
        if ok and (not keep_spare or _spare_ok(hosts, awake)):
            freed.append(name)
            moves.extend(
                Move(g.name, g.id, g.project, name, target, f"empties host {name} (consolidation)")
                for g, target in placed
            )
            continue
        # Undo: the host stays awake with its VMs.
        awake.add(name)
        for guest, target in reversed(placed):
            free.remove(target)
            guest_request_back(pool, guest, hosts[name])
            free.add(target)
        free.add(name)
    return Consolidation(
        hosts_before=used_before, hosts_used=len(awake), freed=freed, moves=moves, seconds=time.perf_counter() - started
    )


def guest_request_back(pool: Pool, guest: Guest, home: HostLoad) -> None:
    """Undo a tried move: the guest goes back to ``home`` (bypassing the filters: it was there)."""
    pool.move(guest, home)
