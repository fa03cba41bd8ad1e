"""The web console's sessions and login codes: expiry, single use, and a bounded table."""

from __future__ import annotations

import pytest

from corral.api import ui_sessions
from corral.api.auth import is_public
from corral.api.ui_sessions import Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(ui_sessions.time, "monotonic", clock)
    return clock


def test_a_session_lasts_its_ttl_and_ends_on_close(clock: Clock) -> None:
    sessions = Sessions()
    sid = sessions.open("corral_secret")
    assert sessions.get(sid).secret == "corral_secret"  # type: ignore[union-attr]
    clock.now += ui_sessions.SESSION_TTL + 1
    assert sessions.get(sid) is None
    other = sessions.open(None)
    sessions.close(other)
    assert sessions.get(other) is None
    assert sessions.get("made-up") is None


def test_a_login_code_works_once_and_only_within_its_minute(clock: Clock) -> None:
    sessions = Sessions()
    code = sessions.new_code()
    assert sessions.redeem(code) is True
    assert sessions.redeem(code) is False  # spent
    late = sessions.new_code()
    clock.now += ui_sessions.LINK_TTL + 1
    assert sessions.redeem(late) is False
    assert sessions.redeem("") is False


def test_the_table_is_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui_sessions, "MAX_SESSIONS", 3)
    sessions = Sessions()
    made = [sessions.open(f"s{i}") for i in range(5)]
    assert [sessions.get(sid) is not None for sid in made] == [False, False, True, True, True]


def test_only_the_console_shell_is_public() -> None:
    assert is_public("/ui") and is_public("/ui/") and is_public("/ui/app.js") and is_public("/health")
    assert not is_public("/uix") and not is_public("/vms") and not is_public("/u")
