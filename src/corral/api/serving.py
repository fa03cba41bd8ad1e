"""Two listeners, one app: the unix socket (plain HTTP, local root, trusted) and the network one (HTTPS, tokens).

They are two uvicorn servers in one event loop because TLS is a per-server setting in uvicorn and the unix socket
must stay plain; it is also how the unix-socket side gets marked trusted (corral.api.auth.trusted) in a way no
network client can imitate. The daemon owns SIGINT/SIGTERM and stops both servers together.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from corral.api.auth import trusted
from corral.api.tls import TLSFiles

HEADER_TIMEOUT = 10.0  # seconds a network client has to send a request's headers, on a new or kept-alive connection


class HeadersInTime(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers. Without one, a client that opens a
    connection and trickles a header line every minute holds a socket (a file descriptor of the process the unix
    socket's root also needs) forever: uvicorn times out idle kept-alive connections, but not partial requests.
    The body's own timeouts are corral.api.limits'."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self.arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.arm_header_deadline()

    header_deadline: asyncio.TimerHandle | None = None

    def arm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()  # one pending deadline per connection, however many requests it carries
        waiting_for = self.cycle  # the request cycle as it is now: a new request replaces it

        def expire() -> None:
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # closed, or upgraded to a websocket (the console), which is no longer ours to time
            busy = self.cycle is not None and not self.cycle.response_complete
            if self.cycle is waiting_for and not busy:
                self.transport.close()

        self.header_deadline = self.loop.call_later(HEADER_TIMEOUT, expire)


class _Server(uvicorn.Server):
    """uvicorn's server, ticking once a second rather than ten times.

    uvicorn's ``main_loop`` wakes every 0.1 s to see whether it should stop and, every tenth wake-up, to refresh
    the Date header: a tenth of an idle daemon's CPU with 30 VMs (docs/performance.md). Here it wakes once a
    second for the header, and at once when :meth:`stop` asks it to end."""

    _wake: asyncio.Event | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Each uvicorn server would install its own handlers and only the last would stop; serve_all handles them.
        yield

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # every tick is a whole second: on_tick refreshes the header
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            should_exit = await self.on_tick(counter)

    def stop(self) -> None:
        """Ask the server to end (a second call forces it), from the event loop's thread."""
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
        if self._wake is not None:
            self._wake.set()


def _config(app: object, log_level: str, tls: TLSFiles | None = None) -> uvicorn.Config:
    # The network listener (TLS) also gets a deadline for headers; the unix socket's caller is the local root.
    extra = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key), "http": HeadersInTime} if tls else {}
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level=log_level,
        log_config=None,  # keep corral's own (JSON) logging
        lifespan="off",
        timeout_graceful_shutdown=3,
        ws_ping_interval=None,
        **extra,  # type: ignore[arg-type]
    )


async def _serve_all(servers: list[tuple[_Server, socket.socket]]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server, _ in servers:
            server.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(
    app: FastAPI,
    unix_socket: socket.socket,
    tcp_socket: socket.socket | None = None,
    tls: TLSFiles | None = None,
    log_level: str = "warning",
) -> None:
    """Serve until SIGINT/SIGTERM: ``unix_socket`` trusted, ``tcp_socket`` (if any) over HTTPS with tokens."""
    servers = [(_Server(_config(trusted(app), log_level)), unix_socket)]
    if tcp_socket is not None:
        if tls is None:
            raise ValueError("the network listener serves HTTPS only")
        servers.append((_Server(_config(app, log_level, tls)), tcp_socket))
    asyncio.run(_serve_all(servers))
