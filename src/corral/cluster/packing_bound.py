"""How far a consolidation plan is from the best: the heuristic's plan (corral.cluster.planner) is checked against
HiGHS, so the plan always shows how many hosts no packing could beat, beside how many it uses.

:func:`exact` solves the assignment MILP itself when it is small enough to finish within the time limit,
otherwise a bound from the host shapes alone (the fewest hosts whose capacity, less the largest, covers the
demand). It lives apart from the planner, which never imports it (sibling modules may not import each other
both ways): the callers that want the reference (a recommended plan, the benchmark, the tests) call it on the
heuristic's result, right after :func:`corral.cluster.planner.consolidate`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

from corral.cluster.placement import HostLoad
from corral.cluster.planner import Consolidation, Guest, Pool, takes_work

EXACT_MAX_VARIABLES = 60_000


def exact(
    hosts: dict[str, HostLoad], guests: list[Guest], result: Consolidation, keep_spare: bool, time_limit: float
) -> None:
    """Fill ``result``'s optimum (the assignment MILP, when small enough and solved within ``time_limit``) or
    bound (from host shapes). ``hosts``/``guests`` are the heuristic's end state; demand is the same."""
    started = time.perf_counter()
    try:
        import highspy
    except ImportError:  # pragma: no cover - highspy is a dependency; a broken install still plans
        result.solver = "unavailable (highspy not installed)"
        return
    awake = [name for name, load in sorted(hosts.items()) if takes_work(load) or load.vms]
    pinned_hosts = {g.host for g in guests if not g.movable}
    variables = len([g for g in guests if g.movable]) * len(awake)
    if variables <= EXACT_MAX_VARIABLES:
        solved = _assignment(highspy, hosts, guests, awake, pinned_hosts, keep_spare, time_limit)
        if solved is not None:
            optimal, value = solved
            if optimal:
                result.optimum_hosts_used = value
            else:
                result.bound_hosts_used = value
            result.solver = "HiGHS assignment MILP" + ("" if optimal else " (time limit: best bound)")
            result.solver_seconds = time.perf_counter() - started
            return
    result.bound_hosts_used = _shape_bound(highspy, hosts, awake, pinned_hosts, keep_spare, time_limit)
    result.solver = "HiGHS bound from host shapes"
    result.solver_seconds = time.perf_counter() - started


def _solve(highspy: Any, h: Any, time_limit: float) -> tuple[bool, float] | None:
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 0.0)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    if status == highspy.HighsModelStatus.kOptimal:
        return True, float(info.objective_function_value)
    bound = float(info.mip_dual_bound)
    if math.isfinite(bound):
        return False, bound
    return None


def _assignment(
    highspy: Any,
    hosts: dict[str, HostLoad],
    guests: list[Guest],
    names: list[str],
    pinned_hosts: set[str],
    keep_spare: bool,
    time_limit: float,
) -> tuple[bool, int] | None:
    """min hosts used: x[v,h] (VM v on host h) and y[h] (h awake); capacity, filters and anti-affinity as the
    heuristic sees them; N+1 as one constraint per host and resource."""
    h = highspy.Highs()
    inf = highspy.kHighsInf
    index = {name: i for i, name in enumerate(names)}
    pool = Pool(hosts, [])
    # y variables first.
    for name in names:
        low = 1.0 if name in pinned_hosts else 0.0
        h.addVar(low, 1.0)
        h.changeColCost(index[name], 1.0)
    count = len(names)
    x: dict[tuple[int, int], int] = {}
    fixed_cpu: defaultdict[str, float] = defaultdict(float)
    fixed_mem: defaultdict[str, float] = defaultdict(float)
    movable = [g for g in guests if g.movable]
    for g in guests:
        if not g.movable and g.host in index:
            fixed_cpu[g.host] += g.request.cpus
            fixed_mem[g.host] += g.request.memory
    for v, guest in enumerate(movable):
        for name in names:
            load = hosts[name]
            if not takes_work(load) and name != guest.host:
                continue
            empty = HostLoad.__new__(HostLoad)
            for slot in HostLoad.__slots__:
                setattr(empty, slot, getattr(load, slot))
            empty.cpus_alloc = empty.memory_alloc = empty.storage_alloc = 0
            request = pool.need(guest, load) if name != guest.host else guest.request
            if name != guest.host and empty.fits(request.model_copy(update={"storage": 0})) is not None:
                continue
            h.addVar(0.0, 1.0)
            x[(v, index[name])] = count
            count += 1
    h.changeColsIntegrality(count, list(range(count)), [highspy.HighsVarType.kInteger] * count)
    by_guest: dict[int, list[int]] = defaultdict(list)
    by_host: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (v, i), col in x.items():
        by_guest[v].append(col)
        by_host[i].append((v, col))
    for v in range(len(movable)):
        cols = by_guest[v]
        if not cols:
            return None
        h.addRow(1.0, 1.0, len(cols), cols, [1.0] * len(cols))
    groups: dict[tuple[tuple[str, str], int], list[int]] = defaultdict(list)
    fixed_groups: dict[tuple[tuple[str, str], str], int] = defaultdict(int)
    for g in guests:
        if not g.movable and g.group:
            fixed_groups[(g.group, g.host)] += 1
    for i, name in enumerate(names):
        load = hosts[name]
        entries = by_host[i]
        cols = [col for _, col in entries]
        # sum cpu x - cap y <= -fixed
        h.addRow(
            -inf,
            -fixed_cpu[name],
            len(cols) + 1,
            [*cols, i],
            [*(float(movable[v].request.cpus) for v, _ in entries), -float(load.cpu_cap)],
        )
        h.addRow(
            -inf,
            -fixed_mem[name],
            len(cols) + 1,
            [*cols, i],
            [*(float(movable[v].request.memory) for v, _ in entries), -float(load.mem_cap)],
        )
        for v, col in entries:
            pair = movable[v].group
            if pair:
                groups[(pair, i)].append(col)
    for (group, i), cols in groups.items():
        room = 1.0 - fixed_groups.get((group, names[i]), 0)
        h.addRow(-inf, max(0.0, room), len(cols), cols, [1.0] * len(cols))
    if keep_spare:
        cpu_need = sum(g.request.cpus for g in guests)
        mem_need = float(sum(g.request.memory for g in guests))
        caps_cpu = [float(hosts[n].cpu_cap) for n in names]
        caps_mem = [float(hosts[n].mem_cap) for n in names]
        for i in range(len(names)):
            h.addRow(
                cpu_need,
                inf,
                len(names),
                list(range(len(names))),
                [c if j != i else 0.0 for j, c in enumerate(caps_cpu)],
            )
            h.addRow(
                mem_need,
                inf,
                len(names),
                list(range(len(names))),
                [c if j != i else 0.0 for j, c in enumerate(caps_mem)],
            )
    solved = _solve(highspy, h, time_limit)
    if solved is None:
        return None
    optimal, value = solved
    return optimal, round(value) if optimal else math.ceil(value - 1e-6)


def _shape_bound(
    highspy: Any,
    hosts: dict[str, HostLoad],
    names: list[str],
    pinned_hosts: set[str],
    keep_spare: bool,
    time_limit: float,
) -> int | None:
    """The fewest hosts, chosen by shape, whose capacity (less the largest chosen one, for N+1) covers the
    pool's CPU and memory allocations: no packing can use fewer."""
    shapes: dict[tuple[float, float], list[str]] = defaultdict(list)
    for name in names:
        shapes[(hosts[name].cpu_cap, hosts[name].mem_cap)].append(name)
    keys = sorted(shapes)
    cpu_need = float(sum(hosts[n].cpus_alloc for n in names))
    mem_need = float(sum(hosts[n].memory_alloc for n in names))
    h = highspy.Highs()
    inf = highspy.kHighsInf
    t = len(keys)
    # n_t (how many hosts of shape t), then b_t (a host of shape t is awake: the largest one is spared).
    for key in keys:
        pinned = sum(1 for n in shapes[key] if n in pinned_hosts)
        h.addVar(float(pinned), float(len(shapes[key])))
        h.changeColCost(keys.index(key), 1.0)
    for _ in keys:
        h.addVar(0.0, 1.0)
    h.changeColsIntegrality(2 * t, list(range(2 * t)), [highspy.HighsVarType.kInteger] * (2 * t))
    for j, key in enumerate(keys):
        # b_t >= n_t / N_t: any host of the shape awake makes b_t one.
        h.addRow(0.0, inf, 2, [t + j, j], [1.0, -1.0 / len(shapes[key])])
    for resource, need in ((0, cpu_need), (1, mem_need)):
        caps = [key[resource] for key in keys]
        if keep_spare:
            for j in range(t):
                # sum cap n - cap_j b_j >= need, for each shape j (the largest awake shape binds).
                h.addRow(need, inf, t + 1, [*range(t), t + j], [*caps, -caps[j]])
        else:
            h.addRow(need, inf, t, list(range(t)), caps)
    solved = _solve(highspy, h, time_limit)
    if solved is None:  # infeasible: the pool holds more than N+1 allows already
        return None
    return math.ceil(solved[1] - 1e-6)
