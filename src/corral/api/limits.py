"""What the network listener spends on one caller: who it is before any body byte is read, how large and how slow a
body may be, and how many long-lived requests (long-polls, event streams, log follows, consoles) a caller holds.

FastAPI reads a request's body before it runs the route's dependencies, so a token checked in a dependency is
checked too late: a 300 MB body sent without any token was read into memory first. :class:`RequestLimits` is a
plain ASGI middleware that runs before FastAPI: on the network listener it resolves the caller from the headers
alone (answering 401 and closing without reading the body), then lets the body through only up to the route's
limit and only while it keeps arriving. The unix socket's caller (local root, ``corral.local`` in the scope) is
trusted with its own machine and passes untouched.

Limits per route live in :func:`body_limits`: one line per route prefix, longest prefix first, so a route that
takes large bodies (uploads) adds its line there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.audit import PROBLEM as AUDIT_PROBLEM
from corral.api.auth import LOCAL, is_public, principal
from corral.config import Settings
from corral.errors import BodyTimeout, BodyTooLarge, CorralError, TooManyRequests
from corral.spec.sizes import format_size

PROBLEM_TYPE = "application/problem+json"
UPLOAD_PREFIX = "/uploads"


@dataclass(frozen=True)
class BodyLimit:
    """How large a route's body may be, and how long the whole of it may take (None: only the idle timeout,
    for uploads whose duration grows with their size)."""

    max_bytes: int
    deadline: float | None


def body_limits(settings: Settings) -> list[tuple[str, BodyLimit]]:
    """(path prefix, limit) pairs, the longest prefix first; a path no prefix matches gets the JSON default
    (``max_request_body``). A route that streams large bodies adds its prefix here with its own setting."""
    table = [("", BodyLimit(settings.max_request_body, settings.request_body_timeout))]
    table.append((UPLOAD_PREFIX, BodyLimit(settings.max_upload_size, None)))
    return sorted(table, key=lambda row: len(row[0]), reverse=True)


def limit_for(table: list[tuple[str, BodyLimit]], path: str) -> BodyLimit:
    for prefix, limit in table:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/") or not prefix:
            return limit
    raise LookupError(path)  # the table always ends with the "" default


class _Cut(Exception):
    """Raised into the app by the receive wrapper when a body is refused mid-stream."""


def _problem_response(error: CorralError) -> JSONResponse:
    # Connection: close: the rest of the body is never read, so the connection cannot carry another request.
    return JSONResponse(error.to_problem(), status_code=error.http_status, media_type=PROBLEM_TYPE,
                        headers={"Connection": "close"})  # fmt: skip


class RequestLimits:
    """The ASGI middleware described in the module's docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.table = body_limits(settings)
        self.idle = settings.request_body_timeout

    async def refuse(self, scope: Scope, receive: Receive, send: Send, error: CorralError) -> None:
        scope[AUDIT_PROBLEM] = error.message
        await _problem_response(error)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not scope.get(LOCAL):
            try:
                await asyncio.to_thread(principal, HTTPConnection(scope))
            except CorralError:
                # Closing before accepting answers the handshake with 403: no upgrade without a valid token.
                await send({"type": "websocket.close", "code": 1008})
                return
        if scope["type"] != "http" or scope.get(LOCAL):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if not is_public(path):
            try:
                # Headers only: the body stays unread in the socket's buffer (uvicorn reads ahead 64 KiB at most).
                await asyncio.to_thread(principal, HTTPConnection(scope))
            except CorralError as error:
                await self.refuse(scope, receive, send, error)
                return
        limit = limit_for(self.table, path)
        length = _content_length(scope)
        if length is not None and length > limit.max_bytes:
            await self.refuse(scope, receive, send, _too_large(limit))
            return
        await self.guarded(scope, receive, send, limit)

    async def guarded(self, scope: Scope, receive: Receive, send: Send, limit: BodyLimit) -> None:
        """Run the app with a receive that counts and times the body, and answer for it when the body is cut."""
        started = time.monotonic()
        received = 0
        # HTTP/1.1: no Content-Length and no chunked encoding is no body at all.
        done = _content_length(scope) in (None, 0) and not _chunked(scope)
        cut: CorralError | None = None
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, done, cut
            if cut is not None:
                return {"type": "http.disconnect"}
            if done:  # the body is complete: later receives wait for a disconnect, for as long as the response runs
                return await receive()
            timeout = self.idle
            if limit.deadline is not None:
                timeout = min(timeout, limit.deadline - (time.monotonic() - started))
            try:
                if timeout <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                cut = BodyTimeout(
                    f"the request body did not arrive in time ({received} bytes in {time.monotonic() - started:.0f} s)",
                    "send the body at once; a body that stalls is cut after "
                    f"{self.idle:g} s without data" + (f" or {limit.deadline:g} s in all" if limit.deadline else ""),
                )
                raise _Cut from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    cut = _too_large(limit)
                    raise _Cut
                if not message.get("more_body", False):
                    done = True
            else:
                done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if cut is not None:
                return  # the app's answer to a body it could not read; ours follows
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if cut is None:
                raise
        if cut is not None and not response_started:
            await self.refuse(scope, receive, send, cut)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 1 << 62  # unreadable: as good as too large
    return None


def _chunked(scope: Scope) -> bool:
    return any(key == b"transfer-encoding" for key, _ in scope.get("headers", ()))


def _too_large(limit: BodyLimit) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request body is larger than this route takes ({format_size(limit.max_bytes)})",
        "send less; files go through an upload, not a JSON body",
    )


# -- long-lived requests per caller ------------------------------------------------------------------------


def caller_key(connection: HTTPConnection) -> str | None:
    """Whose share a long-lived request counts against: the token (or the user, for a token-less principal);
    None for the local root on the unix socket, which is never capped."""
    if connection.scope.get(LOCAL):
        return None
    who = principal(connection)
    return f"token:{who.token_id}" if who.token_id else f"user:{who.user}"


class CallerSlots:
    """How many long-lived requests of each kind every caller holds now, capped at ``cap`` each. An async wait
    holds no thread, but each one still holds a connection, a coroutine and periodic reads of the store: one
    token must not be able to take them all."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def take(self, connection: HTTPConnection, kind: str) -> Callable[[], None]:
        """Take one slot of ``kind`` for the caller (TooManyRequests over the cap); returns its release, which
        may be called more than once."""
        key = caller_key(connection)
        if key is None:
            return lambda: None
        slot = (key, kind)
        with self._lock:
            held = self._held.get(slot, 0)
            if held >= self.cap:
                raise TooManyRequests(
                    f"this token already holds {held} {kind} requests open (at most {self.cap} at once)",
                    "end one of them first, or ask without waiting (the administrator sets max_waits_per_caller)",
                )
            self._held[slot] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._held.get(slot, 1) - 1
                if left > 0:
                    self._held[slot] = left
                else:
                    self._held.pop(slot, None)

        return release

    @contextlib.contextmanager
    def hold(self, connection: HTTPConnection, kind: str) -> Iterator[None]:
        release = self.take(connection, kind)
        try:
            yield
        finally:
            release()

    def held(self, kind: str) -> int:
        """How many requests of ``kind`` are held now, every caller together (for tests and metrics)."""
        with self._lock:
            return sum(count for (_, held_kind), count in self._held.items() if held_kind == kind)


def slots(connection: HTTPConnection) -> CallerSlots:
    """The app's slot counter (made by create_app)."""
    return connection.app.state.caller_slots


class HeldStream(StreamingResponse):
    """A streaming response that gives its caller's slot back when it ends, however it ends (finished,
    disconnected, cancelled): the slot is taken by the route, before the 200 is sent, so that over the cap the
    caller gets a 429 rather than an empty stream."""

    def __init__(self, *args: object, release: Callable[[], None], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
