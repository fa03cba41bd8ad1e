"""Usage history, the writing side: what the agents sample becomes points in the store, rolled up and pruned as it
ages.

Agents sample each running VM every 10 s (corral.host.observe); :func:`record` turns two successive samples into
one raw point (counters become rates per second over the interval) and adds one point for the host (the sum of its
VMs, plus its load average). Points age in three tiers, like RRD files: raw points (``resolution`` 0) for the
last hour, 1-minute averages for a day, 10-minute averages for a month. :func:`maintain` rolls completed spans up
and prunes what is past its tier's age.

These are pure store writes, here rather than in corral.cluster.usage (which reads the history for the API and the
planners) because the host agent writes them and reaches the control plane only through the store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from corral.store.models import UsagePoint, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

RAW, MINUTE, TEN_MINUTES = 0, 60, 600
# How long each tier is kept.
KEEP = {RAW: timedelta(hours=1), MINUTE: timedelta(days=1), TEN_MINUTES: timedelta(days=31)}
FIGURES = ("cpu", "memory", "balloon", "disk_read", "disk_write", "net_rx", "net_tx", "load")


def _total(stats: dict[str, Any], group: str, key: str) -> int:
    return sum(int(entry.get(key, 0) or 0) for entry in (stats.get(group) or {}).values())


def vm_point(vm_id: str, host: str, before: dict[str, Any] | None, now: dict[str, Any]) -> UsagePoint | None:
    """One raw point from two successive samples of ``corral.host.observe`` (None without a usable previous one:
    a rate needs two counters, and a restarted VM's counters start again from zero)."""
    if not before or "sampled_at" not in before or "sampled_at" not in now:
        return None
    interval = float(now["sampled_at"]) - float(before["sampled_at"])
    if interval <= 0 or interval > 600:
        return None

    def rate(after: float, earlier: float) -> float:
        return max(0.0, (after - earlier) / interval)

    cpu = 0.0
    if now.get("cpu_seconds") is not None and before.get("cpu_seconds") is not None:
        cpu = rate(float(now["cpu_seconds"]), float(before["cpu_seconds"]))
    return UsagePoint(
        kind="vm",
        resource_id=vm_id,
        host=host,
        resolution=RAW,
        at=datetime.fromtimestamp(float(now["sampled_at"]), tz=utcnow().tzinfo),
        cpu=round(cpu, 4),
        memory=int(now.get("memory_bytes") or 0),
        balloon=int(now["balloon_bytes"]) if now.get("balloon_bytes") is not None else None,
        disk_read=rate(_total(now, "disks", "read_bytes"), _total(before, "disks", "read_bytes")),
        disk_write=rate(_total(now, "disks", "write_bytes"), _total(before, "disks", "write_bytes")),
        net_rx=rate(_total(now, "nics", "receive_bytes"), _total(before, "nics", "receive_bytes")),
        net_tx=rate(_total(now, "nics", "transmit_bytes"), _total(before, "nics", "transmit_bytes")),
    )


def host_point(
    host: str, vm_points: Iterable[UsagePoint], load: float | None, at: datetime | None = None
) -> UsagePoint:
    """The host's point: what its VMs used together (CPU, memory, I/O) and its load average."""
    points = list(vm_points)
    return UsagePoint(
        kind="host",
        resource_id=host,
        host=host,
        resolution=RAW,
        at=at or utcnow(),
        samples=1,
        cpu=round(sum(p.cpu for p in points), 4),
        memory=sum(p.memory for p in points),
        balloon=sum(p.balloon for p in points if p.balloon is not None) if points else None,
        disk_read=sum(p.disk_read for p in points),
        disk_write=sum(p.disk_write for p in points),
        net_rx=sum(p.net_rx for p in points),
        net_tx=sum(p.net_tx for p in points),
        load=load,
    )


def record(
    session: Session,
    host: str,
    samples: Iterable[tuple[str, dict[str, Any] | None, dict[str, Any]]],
    load: float | None = None,
) -> list[UsagePoint]:
    """Write one sampling round of ``host``: ``samples`` are (VM id, previous stats, new stats)."""
    points = [p for vm_id, before, now in samples if (p := vm_point(vm_id, host, before, now)) is not None]
    session.add_all(points)
    session.add(host_point(host, points, load, max((p.at for p in points), default=None)))
    return points


def _aware(at: datetime, like: datetime) -> datetime:
    """``at`` in ``like``'s time zone: an aggregate's result may come back naive (SQLite) where the ORM's are UTC."""
    return at.replace(tzinfo=like.tzinfo) if at.tzinfo is None else at


def _bucket(at: datetime, width: int) -> datetime:
    seconds = int(at.timestamp())
    return datetime.fromtimestamp(seconds - seconds % width, tz=at.tzinfo)


def _average(
    points: list[UsagePoint], kind: str, resource_id: str, host: str | None, width: int, at: datetime
) -> UsagePoint:
    weights = [p.samples or 1 for p in points]
    total = sum(weights)

    def mean(name: str) -> float | None:
        values = [(getattr(p, name), w) for p, w in zip(points, weights, strict=True) if getattr(p, name) is not None]
        if not values:
            return None
        return sum(v * w for v, w in values) / sum(w for _, w in values)

    balloon, load = mean("balloon"), mean("load")
    return UsagePoint(
        kind=kind,
        resource_id=resource_id,
        host=host,
        resolution=width,
        at=at,
        samples=total,
        cpu=round(mean("cpu") or 0.0, 4),
        memory=int(mean("memory") or 0),
        balloon=int(balloon) if balloon is not None else None,
        disk_read=mean("disk_read") or 0.0,
        disk_write=mean("disk_write") or 0.0,
        net_rx=mean("net_rx") or 0.0,
        net_tx=mean("net_tx") or 0.0,
        load=round(load, 3) if load is not None else None,
    )


def _roll_up(session: Session, host: str, source: int, width: int, now: datetime) -> int:
    """Average ``source`` points measured on ``host`` into ``width``-second points, for spans that have ended
    and have no roll-up yet. Looks back ten minutes (three spans for the longer tier), so an agent that missed a
    few rounds catches up, the query stays small, and no span is rolled twice."""
    start = _bucket(now - min(KEEP[source], timedelta(seconds=max(width * 3, 600))), width)
    end = _bucket(now, width)
    # Spans up to the host's last roll-up are done (its agent rolls every span of all its resources at once, after
    # the span ended): read only the points after it, not ten minutes of every VM's points every minute.
    last = session.scalar(
        select(func.max(UsagePoint.at)).where(
            UsagePoint.host == host, UsagePoint.resolution == width, UsagePoint.at >= start
        )
    )
    if last is not None:
        start = max(start, _bucket(_aware(last, now) + timedelta(seconds=width), width))
    if end <= start:
        return 0
    rows = session.scalars(
        select(UsagePoint).where(
            UsagePoint.host == host, UsagePoint.resolution == source, UsagePoint.at >= start, UsagePoint.at < end
        )
    )
    groups: dict[tuple[str, str, datetime], list[UsagePoint]] = defaultdict(list)
    for point in rows:
        groups[(point.kind, point.resource_id, _bucket(point.at, width))].append(point)
    if not groups:
        return 0
    done = set(
        session.execute(
            select(UsagePoint.kind, UsagePoint.resource_id, UsagePoint.at).where(
                UsagePoint.host == host, UsagePoint.resolution == width, UsagePoint.at >= start, UsagePoint.at < end
            )
        )
    )
    made = 0
    for (kind, resource_id, at), points in groups.items():
        if (kind, resource_id, at) in done:
            continue
        session.add(_average(points, kind, resource_id, host, width, at))
        made += 1
    return made


def maintain(session: Session, host: str, now: datetime | None = None) -> dict[str, int]:
    """Roll ``host``'s points up and prune those past their tier's age: called by its agent about once a
    minute, so each host keeps its own history in shape."""
    now = now or utcnow()
    made = {
        "minute": _roll_up(session, host, RAW, MINUTE, now),
        "ten_minutes": _roll_up(session, host, MINUTE, TEN_MINUTES, now),
    }
    pruned = 0
    for tier, age in KEEP.items():
        result = session.execute(
            delete(UsagePoint).where(UsagePoint.host == host, UsagePoint.resolution == tier, UsagePoint.at < now - age)
        )
        pruned += cast("CursorResult[Any]", result).rowcount or 0  # a DELETE's result is a cursor result
    return {**made, "pruned": pruned}
