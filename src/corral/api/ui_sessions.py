"""The web console's logins: in-memory sessions behind an HttpOnly cookie, and one-time login codes for `corral ui`.

A session never holds a principal, only how to find one again: the token's secret, authenticated afresh on every
request so that revoking the token or deleting its user ends the session at once, or (for a `corral ui` login
link, which only local root can mint on the unix socket) the local root itself. Sessions live in the daemon's
memory: a restart logs everyone out, and no session secret is ever written to disk.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

COOKIE = "corral_ui"
CSRF_HEADER = "x-corral-ui"  # sent by the UI on every call; a cross-site page cannot send it without CORS
SESSION_TTL = 12 * 3600.0  # seconds a browser session lasts, however active
LINK_TTL = 60.0  # seconds a `corral ui` login link stays usable (once)
MAX_SESSIONS = 10000  # beyond this, the oldest sessions are forgotten: a login flood cannot fill the memory


@dataclass(frozen=True)
class Login:
    """What a session stands for: a token's secret, or the local root (``secret`` None)."""

    secret: str | None
    expires: float


class Sessions:
    """Session id -> login, and one-time link codes -> pending root logins. Thread-safe: auth runs in threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Login] = {}
        self._codes: dict[str, float] = {}

    def open(self, secret: str | None) -> str:
        """A new session for ``secret`` (None: local root); the id to put in the cookie."""
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session_id] = Login(secret, now + SESSION_TTL)
        return session_id

    def get(self, session_id: str) -> Login | None:
        with self._lock:
            login = self._sessions.get(session_id)
            if login is not None and login.expires < time.monotonic():
                del self._sessions[session_id]
                return None
            return login

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def new_code(self) -> str:
        """A one-time code for a root login link, usable once within LINK_TTL seconds."""
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(time.monotonic())
            self._codes[code] = time.monotonic() + LINK_TTL
        return code

    def redeem(self, code: str) -> bool:
        """Whether ``code`` was a live link code; it is spent either way."""
        with self._lock:
            deadline = self._codes.pop(code, None)
        return deadline is not None and deadline >= time.monotonic()

    def _expire(self, now: float) -> None:
        for key in [key for key, login in self._sessions.items() if login.expires < now]:
            del self._sessions[key]
        for key in [key for key, deadline in self._codes.items() if deadline < now]:
            del self._codes[key]


def of(app: object) -> Sessions:
    """The app's sessions (made on first use)."""
    state = app.state  # type: ignore[attr-defined]
    sessions = getattr(state, "ui_sessions", None)
    if sessions is None:
        sessions = Sessions()
        state.ui_sessions = sessions
    return sessions
