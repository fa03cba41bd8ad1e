"""``corral serve``: the store, this host's agent and the API in one process.

The daemon holds a lock on CORRAL_HOME so a second one fails at once instead of fighting over QEMU processes.
It is a child subreaper: anything it starts that double-forks is reaped here promptly, not by a slow PID 1.
Stopping the daemon leaves VMs running; the next daemon adopts them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.config import Settings
from corral.errors import Conflict, InvalidInput

if TYPE_CHECKING:
    from corral.store.db import Store

log = logging.getLogger("corral.daemon")
PR_SET_CHILD_SUBREAPER = 36


class DaemonLock:
    """An flock on CORRAL_HOME/corral.lock holding the daemon's pid."""

    def __init__(self, home: Path) -> None:
        self.path = home / "corral.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # state files of the home are root's alone (an older version made this one 0644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise Conflict(
                f"another corral daemon (pid {other}) is already running on {self.path.parent}",
                "stop it first, or set CORRAL_HOME to another directory",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def running_daemon_pid(home: Path) -> int | None:
    """The pid holding the lock, or None when no daemon runs on this home."""
    path = home / "corral.lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


def become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _unix_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)  # root only: whoever opens it acts as cluster admin, with no token
    return sock


def _tcp_socket(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"invalid --listen address {listen!r}", "write HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. asyncio sets it only on sockets made with proto=IPPROTO_TCP, and without it
    # every HTTPS answer (headers and body in two TLS records) waited ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise Conflict(f"cannot listen on {listen}: {exc.strerror}", "pick a free port") from exc
    return sock


def _ensure_default_network(settings: Settings, store: Any) -> None:
    """The "default" NAT network, made on the first start of a host that can make bridges (root)."""
    from corral.cluster import networks
    from corral.host.networks import can_manage

    if not settings.default_network or not can_manage():
        return
    try:
        with store.session() as session:
            if networks.ensure_default(session) is not None:
                print("corral: made the default NAT network", file=sys.stderr, flush=True)
    except Exception as exc:  # a host where it cannot be made still serves everything else
        print(f"corral: no default network: {exc}", file=sys.stderr, flush=True)


class HostWatch:
    """The control plane's liveness check: hosts whose heartbeat stopped are marked unreachable, and on PostgreSQL
    hosts whose lease expired are taken over and their HA VMs restarted elsewhere (corral.cluster.ha). Every
    control plane of a pool runs one; both steps lock or re-check what they change, so several do no harm."""

    def __init__(
        self, store: Store, interval: float, lease_time: float = 10.0, settings: Settings | None = None
    ) -> None:
        self.store = store
        self.interval = interval
        self.lease_time = lease_time
        self.settings = settings  # auto_balance, auto_consolidate and their intervals (corral.cluster.plans)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corral-hostwatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from sqlalchemy import select

        from corral.cluster import ha, hosts, plans, replication
        from corral.store.models import Plan

        while not self._stop.wait(self.interval):
            try:
                with self.store.session() as session:
                    marked = hosts.mark_unreachable(session)
                if marked:
                    log.warning("%d host(s) stopped sending heartbeats: marked unreachable", marked)
                # Plans whose driving thread died with an earlier control plane go on from here.
                with self.store.session() as session:
                    for plan in session.scalars(select(Plan).where(Plan.state == "running")):
                        plans.advance(session, plan)
                if self.settings is not None and self.settings.auto_balance:
                    plans.auto_balance_tick(
                        self.store, self.settings.auto_balance_threshold, self.settings.auto_balance_interval
                    )
                if self.settings is not None and self.settings.auto_consolidate:
                    plans.auto_consolidate_tick(self.store, self.settings.auto_consolidate_interval)
                if self.store.shared:
                    with self.store.session() as session:
                        ha.watch(session, self.lease_time)
                    replication.run_once(self.store)  # copies that are due (corral.cluster.replication)
            except Exception as exc:  # the store may be restarting; the next pass tries again
                log.warning("host check failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def run_agent(settings: Settings, address: str | None = None) -> None:
    """``corral agent``: only this host's agent, on a pool's shared store, until SIGINT/SIGTERM. VMs keep running
    when it stops, and the next agent on this CORRAL_HOME adopts them."""
    from corral.host.agent import Agent
    from corral.store.db import Store

    if not settings.database:
        raise InvalidInput("an agent needs the pool's store", "pass --db postgresql://USER@HOST/DB (or set CORRAL_DB)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lock = DaemonLock(settings.home)
    lock.acquire()
    become_subreaper()
    store = Store(settings.database_url)
    agent: Agent | None = None
    try:
        store.migrate_in_child()
        agent = Agent(settings, store, address=address)
        agent.start_in_thread()
        print(
            f"corral: agent {agent.host_name} registered" + (f" at {address}" if address else ""),
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    finally:
        if agent is not None:
            agent.stop_thread()
        store.close()
        lock.release()


def serve(
    settings: Settings,
    listen: str | None = None,
    log_level: str = "warning",
    with_agent: bool = True,
    cert: Path | None = None,
    key: Path | None = None,
) -> None:
    """Run until SIGINT/SIGTERM. VMs keep running after it returns.

    ``with_agent`` (the default) also runs this host's agent, so one command gives a working single host; a pool's
    control plane on a machine that runs no VMs passes False (``corral serve --no-agent``)."""
    from corral.api.app import create_app
    from corral.cluster.backup_schedules import ScheduleRunner
    from corral.host.agent import Agent
    from corral.store.db import Store

    lock = DaemonLock(settings.home)
    lock.acquire()
    become_subreaper()
    store = Store(settings.database_url)
    sockets: list[socket.socket] = []
    agent: Agent | None = None
    watch: HostWatch | None = None
    schedules: ScheduleRunner | None = None
    try:
        store.migrate_in_child()
        tls = None
        if listen:
            from corral.api import tls as tls_files

            tls = tls_files.ensure(settings.home, cert, key, listen.rpartition(":")[0].strip("[]"))
        sockets.append(_unix_socket(settings.socket_path))
        if listen:
            sockets.append(_tcp_socket(listen))
        if with_agent:
            agent = Agent(settings, store)
            agent.start_in_thread()
            _ensure_default_network(settings, store)
        app = create_app(settings, store)
        app.state.listen = listen  # the HTTPS address `corral ui` sends a browser to
        # At least once a second on a pool: HA takes a host over within a second of its lease's margin.
        interval = max(1.0, settings.host_timeout / 4)
        watch = HostWatch(store, 1.0 if store.shared else interval, settings.lease_time, settings)
        watch.start()
        schedules = ScheduleRunner(store)  # every control plane runs one; a store claim makes one fire each
        schedules.start()
        print(
            f"corral: serving on {settings.socket_path}" + (f" and https://{listen}" if listen else ""),
            file=sys.stderr,
            flush=True,
        )
        if tls is not None:
            made = " (self-signed, made now)" if tls.generated else ""
            print(f"corral: TLS certificate {tls.cert}{made}", file=sys.stderr, flush=True)
            print(f"corral: TLS certificate SHA-256 fingerprint {tls.fingerprint}", file=sys.stderr, flush=True)
            log.info("TLS certificate %s fingerprint %s", tls.cert, tls.fingerprint)
        from corral.api import serving

        serving.run(app, sockets[0], sockets[1] if listen else None, tls, log_level)
    finally:
        if schedules is not None:
            schedules.stop()
        if watch is not None:
            watch.stop()
        if agent is not None:
            agent.stop_thread()
        for sock in sockets:
            sock.close()
        settings.socket_path.unlink(missing_ok=True)
        store.close()
        lock.release()
