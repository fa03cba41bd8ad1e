"""An interactive serial console over the API's websocket. Ctrl-] detaches, as in telnet and virsh."""

from __future__ import annotations

import contextlib
import json
import os
import select
import ssl
import sys
import termios
import time
import tty
from urllib.parse import urlencode

from corral.errors import Conflict, DaemonNotRunning

DETACH = b"\x1d"  # Ctrl-]
PIPE_IDLE_EXIT = 1.5  # seconds of guest silence after piped input ends


def _tls_context(verify: object) -> ssl.SSLContext:
    """The client's choice as an SSL context: a pinned certificate's context, no verification, or the system CAs."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    context = ssl.create_default_context()
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _connect(name: str):  # type: ignore[no-untyped-def]
    from websockets.sync.client import connect, unix_connect

    from corral.client import Client

    corral = Client()
    path = f"/vms/{name}/console"
    try:
        if corral.url:
            # The same token, project and certificate trust as every other request of this client.
            base = corral.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/")
            query = f"?{urlencode({'project': corral.project})}" if corral.project else ""
            headers = {"Authorization": f"Bearer {corral.token}"} if corral.token else {}
            return connect(base + path + query, additional_headers=headers, ssl=_tls_context(corral.tls_verify)
                           if base.startswith("wss://") else None)  # fmt: skip
        return unix_connect(str(corral.socket_path), f"ws://corral{path}")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning("the corral daemon is not running", "start it with `corral serve`") from exc
    finally:
        corral.close()


def attach(name: str) -> None:
    ws = _connect(name)
    hello = json.loads(ws.recv())
    if "error" in hello:
        ws.close()
        raise Conflict(hello["error"])
    interactive = sys.stdin.isatty()
    print(f"Connected to {name}'s serial console. Press Ctrl-] to detach.\r", file=sys.stderr)
    saved = termios.tcgetattr(sys.stdin.fileno()) if interactive else None
    try:
        if interactive:
            tty.setraw(sys.stdin.fileno())
        _pump(ws)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            ws.close()
        print("\r\nDetached.", file=sys.stderr)


def _pump(ws) -> None:  # type: ignore[no-untyped-def]
    """Copy stdin to the VM and the VM to stdout until detach, end of input or a closed console."""
    from websockets.exceptions import ConnectionClosed

    stdin = sys.stdin.fileno()
    stdin_open = True
    last_output = time.monotonic()
    while True:
        with contextlib.suppress(TimeoutError):
            try:
                data = ws.recv(timeout=0.05)
            except ConnectionClosed:
                return
            os.write(sys.stdout.fileno(), data if isinstance(data, bytes) else data.encode())
            last_output = time.monotonic()
            continue
        if not stdin_open:
            # Piped input has ended: leave once the guest has been quiet for a moment (scripting use).
            if time.monotonic() - last_output > PIPE_IDLE_EXIT:
                return
            continue
        ready, _, _ = select.select([stdin], [], [], 0.05)
        if not ready:
            continue
        chunk = os.read(stdin, 1024)
        if not chunk:
            stdin_open = False
            last_output = time.monotonic()
            continue
        if DETACH in chunk:
            before = chunk.split(DETACH, 1)[0]
            if before:
                ws.send(before)
            return
        ws.send(chunk)
