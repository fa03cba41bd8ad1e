"""`corral serve` (the daemon) and `corral shutdown`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from corral.cli.common import fail, run


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(shutdown)


DB_OPTION = typer.Option(
    None, "--db", help="The store: a postgresql://USER@HOST/DB URL shared by a pool (env CORRAL_DB; default: SQLite)."
)


def serve(
    listen: str = typer.Option(
        None, "--listen", help="Also serve the API over HTTPS on HOST:PORT (e.g. 0.0.0.0:8443); callers need a token."
    ),
    cert: Path = typer.Option(None, "--cert", help="PEM certificate for --listen (default: self-signed, made once)."),
    key: Path = typer.Option(None, "--key", help="PEM private key of --cert."),
    db: str = DB_OPTION,
    agent: bool = typer.Option(
        True, "--agent/--no-agent", help="Also run this host's agent (--no-agent: control plane only, for a pool)."
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background; return once it answers."),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run the daemon: the API, the store and this host's agent. VMs keep running when it stops."""
    from corral.config import load_settings

    settings = run(load_settings)
    if db:
        settings = settings.model_copy(update={"database": db})
    if detach:
        run(lambda: _detach(settings, listen, log_level, agent, cert, key))
        return
    from corral import logs

    logs.configure(log_level)  # JSON lines unless stderr is a terminal
    from corral.daemon import serve as serve_forever

    run(lambda: serve_forever(settings, listen=listen, log_level=log_level, with_agent=agent, cert=cert, key=key))


def _detach(  # type: ignore[no-untyped-def]
    settings, listen: str | None, log_level: str, agent: bool = True, cert: Path | None = None, key: Path | None = None
) -> None:
    from corral.client import Client
    from corral.daemon import running_daemon_pid
    from corral.errors import CorralError

    pid = running_daemon_pid(settings.home)
    if pid is not None:
        print(f"corral daemon already running (pid {pid}) on {settings.home}")
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    log_path = settings.home / "daemon.log"
    argv = [sys.executable, "-m", "corral", "serve", "--log-level", log_level]
    if listen:
        argv += ["--listen", listen]
    if not agent:
        argv.append("--no-agent")
    if cert is not None and key is not None:
        argv += ["--cert", str(cert.absolute()), "--key", str(key.absolute())]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={
                **os.environ,
                "CORRAL_HOME": str(settings.home),
                **({"CORRAL_DB": settings.database} if settings.database else {}),
            },
        )
    deadline = time.monotonic() + 30
    with Client(home=settings.home) as corral:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                fail(f"the daemon exited at start: {tail[0] if tail else 'see ' + str(log_path)}")
            try:
                corral.health()
            except CorralError:
                time.sleep(0.1)
                continue
            print(f"corral daemon started (pid {proc.pid}); log: {log_path}")
            return
    fail(f"the daemon did not answer within 30 s; see {log_path}")


def shutdown(timeout: float = typer.Option(20.0, "--timeout", help="Seconds to wait for it to exit.")) -> None:
    """Stop the daemon on this CORRAL_HOME (VMs keep running and are adopted on the next start)."""
    from corral.config import load_settings
    from corral.daemon import running_daemon_pid

    settings = run(load_settings)
    pid = running_daemon_pid(settings.home)
    if pid is None or pid <= 0:
        print("no corral daemon is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_daemon_pid(settings.home) is None:
            print(f"corral daemon (pid {pid}) stopped")
            return
        time.sleep(0.1)
    fail(f"the daemon (pid {pid}) did not stop within {timeout:.0f} s", f"kill it: kill -9 {pid}")
