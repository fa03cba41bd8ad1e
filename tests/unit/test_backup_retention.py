"""Backup retention (corral.cluster.backup_schedules.prune): which backups a schedule deletes, never a chain's base."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from corral.cluster.backup_schedules import Item, check_policy, keep_by_policy, prune
from corral.errors import InvalidInput
from corral.spec.backup import parse_duration

T0 = datetime(2026, 1, 5, 0, 30, tzinfo=UTC)  # a Monday


def _hourly(count: int, start: datetime = T0, every: timedelta = timedelta(hours=1)) -> list[Item]:
    return [Item(f"b{n}", None, start + n * every) for n in range(count)]


def _chained(kinds: str, start: datetime = T0) -> list[Item]:
    """``F`` a full, ``i`` an incremental on the previous backup; one an hour."""
    items: list[Item] = []
    for n, kind in enumerate(kinds):
        parent = items[-1].id if kind == "i" else None
        items.append(Item(f"{kind}{n}", parent, start + timedelta(hours=n)))
    return items


def test_keep_last_keeps_the_newest() -> None:
    items = _hourly(5)
    assert prune(items, keep_last=2, keep_daily=0, keep_weekly=0) == ["b2", "b1", "b0"]


def test_daily_and_weekly_keep_the_newest_of_each_bucket() -> None:
    items = _hourly(24 * 10, every=timedelta(hours=1))  # ten days, hourly
    kept = keep_by_policy(items, keep_last=0, keep_daily=3, keep_weekly=2)
    newest_per_day = {}
    for item in items:
        newest_per_day[item.created_at.date()] = item.id
    days = sorted(newest_per_day)
    assert {newest_per_day[d] for d in days[-3:]} <= kept
    # Two ISO weeks: the last backup of the first week (Sunday 11 Jan, 23:30) and the newest of all.
    sunday = next(i.id for i in items if i.created_at == datetime(2026, 1, 11, 23, 30, tzinfo=UTC))
    assert sunday in kept
    assert len(kept) == 4  # the newest is both the newest day's and the newest week's


def test_a_full_with_live_incrementals_stays() -> None:
    items = _chained("FiiFii")
    # Keeping only the newest keeps its whole chain: F3 i4 i5; the older chain goes, children first.
    assert prune(items, keep_last=1, keep_daily=0, keep_weekly=0) == ["i2", "i1", "F0"]


def test_nothing_kept_ever_loses_its_base() -> None:
    items = _chained("FiiiiFiiFiiii")
    by_id = {i.id: i for i in items}
    for keep in range(0, len(items) + 1):
        doomed = set(prune(items, keep_last=keep, keep_daily=0, keep_weekly=0))
        for item in items:
            if item.id not in doomed and item.parent_id is not None:
                assert item.parent_id not in doomed, (keep, item.id)
        # Deleting in the returned order never deletes a parent before its children.
        order = prune(items, keep_last=keep, keep_daily=0, keep_weekly=0)
        for position, item_id in enumerate(order):
            later_children = [c for c in order[position + 1 :] if by_id[c].parent_id == item_id]
            assert not later_children


def test_other_backups_are_never_pruned_and_protect_their_bases() -> None:
    items = _chained("Fii")
    # A backup taken by hand on top of the schedule's chain (not a candidate) keeps the chain.
    manual = Item("manual", "i2", T0 + timedelta(hours=5), candidate=False)
    assert prune([*items, manual], keep_last=0, keep_daily=0, keep_weekly=1) == []
    # A manual full is never pruned, even when older than everything kept.
    old = Item("old", None, T0 - timedelta(days=30), candidate=False)
    assert "old" not in prune([old, *_hourly(3)], keep_last=1, keep_daily=0, keep_weekly=0)


def test_bad_policies_are_refused() -> None:
    with pytest.raises(InvalidInput, match="shorter than the minimum"):
        check_policy(5, 1, 0, 0, 0, minimum=60)
    with pytest.raises(InvalidInput, match="keeps nothing"):
        check_policy(3600, 0, 0, 0, 0, minimum=60)
    with pytest.raises(InvalidInput, match="out of range"):
        check_policy(3600, -1, 1, 0, 0, minimum=60)
    check_policy(3600, 24, 7, 4, 3, minimum=60)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("90", 90), (" 1H ", 3600)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "0", "-1h", "x", "1y", "", "nan", "inf", "400d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_duration(text)
