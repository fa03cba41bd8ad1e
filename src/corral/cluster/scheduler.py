"""The scheduler: filters, then weights, over a view of the pool (corral.cluster.host_loads).

**Weights** order the hosts that pass the filters: ``spread`` (the default) takes the least allocated host,
``pack`` the most allocated one that still fits, so that whole hosts stay free. Allocation is the largest of the
CPU, memory and storage fractions in use. An affinity / anti-affinity group can rule a host out too.

The view and the scheduler also place many VMs at once (:func:`place_many`): the pool is read once and a heap keeps
hosts in weight order, which is how 10,000 VMs find hosts among 1,000 in well under two seconds
(benchmarks/scheduler.py). A refusal names what is short, in words for whoever asks: the hosts and their numbers
for the pool's operators, neither for a tenant (``NoRoom``).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from corral.cluster.host_loads import (
    TENANT_HINT,
    HostLoad,
    HostVerdict,
    NoHostOnline,
    NoRoom,
    PlacementPlan,
    PlacementRequest,
    Policy,
    Strategy,
    group_policy,
    load_pool,
    settings,
)
from corral.errors import Conflict, InsufficientResources, InvalidInput, NotFound
from corral.spec.sizes import format_size

# A host in one of these states takes nothing: when every host is in one, no agent is online to take a VM.
DOWN_REASONS = ("host is unreachable", "host is offline", "host is fenced", "host is dead")


def _short_of(reasons: Iterable[str]) -> str:
    """What the refusals are about, in words that name no host and no number of the pool."""
    words = []
    for reason in reasons:
        for key, word in (
            ("vCPUs", "vCPUs"),
            ("memory", "memory"),
            ("storage", "storage"),
            ("affinity", "the VM's placement group"),
            ("bridge", "its network's uplink"),
            ("volume", "its volumes' storage pool"),
            ("host is", "hosts that are up"),
        ):
            if key in reason and word not in words:
                words.append(word)
    return ", ".join(words) or "room"


def _needs(request: PlacementRequest) -> str:
    parts = [f"{request.cpus} vCPUs", f"{format_size(request.memory)} of memory"]
    if request.storage:
        parts.append(f"{format_size(request.storage)} of storage")
    return ", ".join(parts)


class Scheduler:
    """Filters and weights over a pool view. ``place`` updates the view, so successive calls see earlier ones."""

    def __init__(self, view: dict[str, HostLoad], strategy: Strategy | str | None = None) -> None:
        self.view = view
        self.strategy = Strategy(strategy or settings.strategy)
        self._key: dict[str, float] = {load.name: self.weight(load) for load in view.values()}
        # One heap per request shape, without the hosts that can no longer take that shape: in a batch,
        # allocations only grow, so a host too full (or unsuitable) for a shape stays so. Without this, packing
        # would pop every full host again for every VM.
        self._heaps: dict[tuple[Any, ...], list[tuple[float, str]]] = {}
        self._dead: dict[tuple[Any, ...], set[str]] = {}

    def weight(self, load: HostLoad) -> float:
        """Lower is better: spread wants the least allocated host, pack the most allocated one."""
        return load.utilisation() if self.strategy == Strategy.SPREAD else -load.utilisation()

    @staticmethod
    def _shape(request: PlacementRequest) -> tuple[Any, ...]:
        running = request.will_run
        return (
            request.cpus if running else 0,
            request.memory if running else 0,
            request.storage,
            request.accel,
            request.bridged,
            tuple(request.uplinks),
            tuple((v.host, v.pool, v.pool_id) for v in request.volumes),
        )

    def _heap_for(self, shape: tuple[Any, ...]) -> list[tuple[float, str]]:
        heap = self._heaps.get(shape)
        if heap is None:
            dead = self._dead.setdefault(shape, set())
            heap = [(key, name) for name, key in self._key.items() if name not in dead]
            heapq.heapify(heap)
            self._heaps[shape] = heap
        return heap

    def _push(self, load: HostLoad) -> None:
        key = self.weight(load)
        self._key[load.name] = key
        for shape, heap in self._heaps.items():
            if load.name not in self._dead[shape]:
                heapq.heappush(heap, (key, load.name))

    def _group_rule(self, load: HostLoad, request: PlacementRequest) -> str | None:
        if not request.group:
            return None
        members_here = load.groups.get(request.group, 0)
        if request.policy == Policy.ANTI_AFFINITY and members_here:
            return f"anti-affinity: a VM of group {request.group} is already here"
        if request.policy == Policy.AFFINITY and not members_here and self._group_hosts(request.group):
            return f"affinity: group {request.group} runs on {', '.join(self._group_hosts(request.group))}"
        return None

    def _group_hosts(self, group: str) -> list[str]:
        return sorted(name for name, load in self.view.items() if load.groups.get(group))

    def verdict(self, load: HostLoad, request: PlacementRequest) -> str | None:
        if request.host is not None and load.name != request.host:
            return f"--host {request.host} was asked for"
        return load.fits(request) or self._group_rule(load, request)

    def candidates(self, request: PlacementRequest) -> Iterable[HostLoad]:
        """Hosts in weight order, lazily: a heap with stale entries skipped."""
        if request.host is not None:
            if request.host in self.view:
                yield self.view[request.host]
            return
        if request.group and request.policy == Policy.AFFINITY:
            members = self._group_hosts(request.group)
            if members:
                yield from sorted((self.view[name] for name in members), key=self.weight)
                return
        shape = self._shape(request)
        heap, dead = self._heap_for(shape), self._dead[shape]
        popped: list[tuple[float, str]] = []
        try:
            while heap:
                key, name = heapq.heappop(heap)
                if self._key.get(name) != key or name in dead:
                    continue  # stale: the host's weight changed since this entry
                popped.append((key, name))
                yield self.view[name]
        finally:
            for entry in popped:
                if self._key.get(entry[1]) == entry[0] and entry[1] not in dead:
                    heapq.heappush(heap, entry)

    def place(self, request: PlacementRequest) -> HostLoad:
        """The best host that passes every filter; raises with every host's reason when none does."""
        for load in self.candidates(request):
            if request.host is None and load.fits(request) is not None:
                self._dead[self._shape(request)].add(load.name)  # stays true for the rest of this batch
                continue
            if self.verdict(load, request) is None:
                self.commit(load, request)
                return load
        raise self.no_host(request)

    def commit(self, load: HostLoad, request: PlacementRequest) -> None:
        load.add(request)
        self._push(load)

    def no_host(self, request: PlacementRequest) -> Exception:
        if request.host is not None and request.host not in self.view:
            return NotFound(f"host {request.host!r} is not registered", "list hosts with `corral host list`")
        verdicts = self.explain(request)
        if not verdicts:
            return Conflict("no host agent is registered", "start one with `corral serve` or `corral agent`")
        reasons = [f"{v.host}: {v.reason}" for v in verdicts if not v.fits]
        if all("QEMU is not installed" in r for r in reasons):
            return NoHostOnline(
                f"cannot run VMs on {'; '.join(reasons)}",
                "install qemu-system-x86 (apt-get install qemu-system-x86), then restart corral",
            )
        if not any(v.reason not in DOWN_REASONS for v in verdicts):
            return NoHostOnline(
                "no host agent is online: " + "; ".join(reasons),
                "start the daemon with `corral serve` (or the hosts' `corral agent`)",
            )
        shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        tenant = f"no host can take this VM now (it needs {_needs(request)}; short of {_short_of(reasons)})"
        if len(verdicts) == 1:
            return NoRoom(
                f"host {shown}",
                "stop a VM, ask for less, or raise the overcommit ratios",
                tenant=tenant,
                tenant_hint=TENANT_HINT,
            )
        if request.host is not None:
            reason = next(v.reason for v in verdicts if v.host == request.host)
            return NoRoom(
                f"host {request.host} cannot take this VM: " + reason,
                "see why with --dry-run, or leave --host out",
                tenant=f"host {request.host} cannot take this VM now (short of {_short_of([reason])})",
                tenant_hint="leave --host out, or ask for less",
            )
        return NoRoom(
            f"no host can take this VM: {shown}",
            "see why with --dry-run; stop VMs, add hosts or undrain one",
            tenant=tenant,
            tenant_hint=TENANT_HINT,
        )

    def explain(self, request: PlacementRequest) -> list[HostVerdict]:
        """Every host's verdict, in weight order; the first that fits is the one ``place`` would choose."""
        loads = sorted(self.view.values(), key=lambda load: (self.weight(load), load.name))
        if request.group and request.policy == Policy.AFFINITY and self._group_hosts(request.group):
            members = set(self._group_hosts(request.group))
            loads.sort(key=lambda load: load.name not in members)
        verdicts, chosen = [], False
        for load in loads:
            reason = self.verdict(load, request)
            pick = reason is None and not chosen
            chosen = chosen or pick
            verdicts.append(
                HostVerdict(
                    host=load.name,
                    chosen=pick,
                    fits=reason is None,
                    reason=reason or ("chosen: " if pick else "fits: ") + self._why_weight(load),
                    weight=round(load.utilisation(), 4),
                    allocation=load.summary(),
                )
            )
        return verdicts

    def _why_weight(self, load: HostLoad) -> str:
        word = "least" if self.strategy == Strategy.SPREAD else "most"
        return f"{self.strategy} ({word} allocated first), {load.utilisation():.0%} allocated"


def plan(session: Session, request: PlacementRequest, strategy: Strategy | str | None = None) -> PlacementPlan:
    """The dry run: what ``pick`` would do now, and why for every host. Changes nothing."""
    request = request.model_copy(
        update={"policy": group_policy(session, request.project, request.group, request.policy)}
    )
    scheduler = Scheduler(load_pool(session, request.project), strategy)
    verdicts = scheduler.explain(request)
    if request.host is not None and request.host not in scheduler.view:
        raise NotFound(f"host {request.host!r} is not registered", "list hosts with `corral host list`")
    chosen = next((v.host for v in verdicts if v.chosen), None)
    return PlacementPlan(
        strategy=scheduler.strategy, group=request.group, policy=request.policy, chosen=chosen, hosts=verdicts
    )


def place_many(
    session: Session, requests: list[PlacementRequest], strategy: Strategy | str | None = None
) -> list[str | None]:
    """Hosts for many VMs at once (a drain, a batch, the benchmark): the pool is read once. A request that fits
    nowhere gets None; the others still get hosts. Callers hold ``placement_lock`` and write in the same
    transaction (on PostgreSQL, lock the hosts first with ``load_pool(..., lock=True)``)."""
    projects = {request.project for request in requests} or {"default"}
    if len(projects) > 1:
        raise InvalidInput("place_many places one project's VMs at a time", "call it once per project")
    project = projects.pop()
    scheduler = Scheduler(load_pool(session, project, lock=session.get_bind().dialect.name == "postgresql"), strategy)
    policies: dict[str, Policy | None] = {}
    chosen: list[str | None] = []
    for request in requests:
        if request.group and request.group not in policies:
            policies[request.group] = group_policy(session, project, request.group, request.policy)
        if request.group:
            request = request.model_copy(update={"policy": policies[request.group]})
        try:
            chosen.append(scheduler.place(request).name)
        except (InsufficientResources, Conflict, NotFound):
            chosen.append(None)
    return chosen
