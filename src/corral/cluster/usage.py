"""Usage history: what the agents sample, kept as points in the store, rolled up and pruned as it ages.

Agents sample each running VM every 10 s (corral.host.observe) and write one raw point per VM and one for the
host per round (:func:`corral.store.usage.record`). Points age in three tiers, like RRD files:

- raw points (``resolution`` 0) for the last hour,
- 1-minute averages for a day,
- 10-minute averages for a month.

Each agent rolls its own host's points up and prunes them about once a minute (:func:`corral.store.usage.maintain`),
so the work is spread over the pool and never grows with it. That writing side lives in corral.store.usage
because the agents reach the control plane only through the store; this module reads. Decisions (balancing,
consolidation) read **averages over a window** (:func:`averages`), never a single sample: a busy minute does not
move VMs around.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.errors import InvalidInput
from corral.store.models import UsagePoint, utcnow
from corral.store.usage import FIGURES, KEEP, MINUTE, RAW, TEN_MINUTES

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, default: timedelta = timedelta(hours=1)) -> timedelta:
    """``30m``, ``1h``, ``1d``, ``90s`` or a number of seconds: how far back a history goes (at most 31 days)."""
    if text is None or text == "":
        return default
    match = _SINCE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise InvalidInput(f"since {text!r} is not a duration", "write it like 30m, 1h, 1d or 90s")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > KEEP[TEN_MINUTES].total_seconds():
        raise InvalidInput(f"since {text!r} is older than the history kept (31 days)", "ask for 31d or less")
    return timedelta(seconds=seconds)


def resolution_for(span: timedelta) -> int:
    """The finest tier that still covers ``span``."""
    if span <= KEEP[RAW]:
        return RAW
    return MINUTE if span <= KEEP[MINUTE] else TEN_MINUTES


# -- reading ----------------------------------------------------------------------------------------------------


class Point(BaseModel):
    at: datetime
    host: str | None
    cpu: float
    memory: int
    balloon: int | None = None
    disk_read: float
    disk_write: float
    net_rx: float
    net_tx: float
    load: float | None = None


class History(BaseModel):
    """``vm stats`` / ``host stats``: points over the window at the finest tier that covers it, and averages."""

    kind: str
    name: str
    since: datetime
    resolution: int
    points: list[Point]
    average: dict[str, float | None]
    peak: dict[str, float | None]


def history(
    session: Session, kind: str, resource_id: str, name: str, span: timedelta, now: datetime | None = None
) -> History:
    now = now or utcnow()
    since = now - span
    resolution = resolution_for(span)
    rows = list(
        session.scalars(
            select(UsagePoint)
            .where(
                UsagePoint.kind == kind,
                UsagePoint.resource_id == resource_id,
                UsagePoint.resolution == resolution,
                UsagePoint.at >= since,
            )
            .order_by(UsagePoint.at)
        )
    )
    if not rows and resolution != RAW:  # a young history has no roll-up yet: the raw points still say something
        resolution = RAW
        rows = list(
            session.scalars(
                select(UsagePoint)
                .where(
                    UsagePoint.kind == kind,
                    UsagePoint.resource_id == resource_id,
                    UsagePoint.resolution == RAW,
                    UsagePoint.at >= since,
                )
                .order_by(UsagePoint.at)
            )
        )
    points = [Point.model_validate(row, from_attributes=True) for row in rows]
    average: dict[str, float | None] = {}
    peak: dict[str, float | None] = {}
    for figure in FIGURES:
        values = [getattr(p, figure) for p in points if getattr(p, figure) is not None]
        average[figure] = round(sum(values) / len(values), 4) if values else None
        peak[figure] = max(values) if values else None
    return History(kind=kind, name=name, since=since, resolution=resolution, points=points, average=average, peak=peak)


class Average(BaseModel):
    cpu: float
    memory: float
    samples: int


def averages(
    session: Session, kind: str, window: timedelta = timedelta(minutes=10), now: datetime | None = None
) -> dict[str, Average]:
    """Each VM's (by id) or host's (by name) mean CPU and memory over the last ``window``, in one grouped query:
    what the planners weigh. A resource without points in the window is absent (callers fall back to what is
    allocated)."""
    now = now or utcnow()
    resolution = resolution_for(window)
    query = (
        select(UsagePoint.resource_id, func.avg(UsagePoint.cpu), func.avg(UsagePoint.memory), func.count())
        .where(UsagePoint.kind == kind, UsagePoint.resolution == resolution, UsagePoint.at >= now - window)
        .group_by(UsagePoint.resource_id)
    )
    return {
        resource: Average(cpu=float(cpu or 0), memory=float(memory or 0), samples=int(count))
        for resource, cpu, memory, count in session.execute(query)
    }
