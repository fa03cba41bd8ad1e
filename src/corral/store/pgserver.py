"""A private, throw-away PostgreSQL server: for tests, benchmarks and the demo pool on one machine.

Production clusters use a PostgreSQL someone runs properly (docs/cluster.md). Here we only need a real server
that nothing else shares: ``initdb`` into a temporary directory, ``pg_ctl start`` on a free port with its socket
inside that directory, trust authentication, and everything removed by ``stop()``. PostgreSQL refuses to run as
root, so as root the server runs as the ``postgres`` user that the Debian package creates.

    with PgServer() as pg:
        url = pg.create_database("t1")      # postgresql+psycopg://corral@127.0.0.1:PORT/t1
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

SUPERUSER = "corral"


def find_bin_dir() -> Path | None:
    """The newest installed server's bin directory (Debian keeps them under /usr/lib/postgresql/N/bin)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name or 0)
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 (and ``listen`` if given).

    ``listen``: extra addresses to accept connections on (comma-separated, e.g. a test bridge's address), with
    trust authentication from anywhere: this server is for throw-away pools only.
    """

    def __init__(self, listen: str | None = None, port: int | None = None, base_dir: Path | None = None) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql, or make setup)")
        self.bin_dir = bin_dir
        self.listen = listen
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="corral-pg-", dir=str(base_dir) if base_dir else "/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("as root, the server needs a 'postgres' user (apt-get install postgresql)") from None
            self._user = "postgres"
            shutil.chown(self.root, "postgres", "postgres")
        self.started = False
        self._options = ""

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, user=self._user, group=self._user, cwd=self.root
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f"{Path(argv[0]).name} failed: {detail[-1] if detail else result.returncode}")

    def start(self) -> PgServer:
        """initdb and start; returns once the server accepts connections."""
        try:
            self._run(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            )
            if self.listen:
                with (self.data / "pg_hba.conf").open("a") as hba:
                    hba.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
            addresses = "127.0.0.1" + (f",{self.listen}" if self.listen else "")
            # Durability is not wanted from a throw-away server; speed is.
            self._options = (
                f"-p {self.port} -k {self.root} -c listen_addresses='{addresses}' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
            )
            self._pg_ctl_start()
            self.started = True
        except BaseException:
            self.stop()
            raise
        return self

    def _pg_ctl_start(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            self._options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def url(self, database: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{host}:{self.port}/{database}"

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new empty database (or a copy of ``template``); returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start the same server (data kept): what agents and the control plane must survive.
        ``down_for`` seconds between the two let every client notice the outage (failed queries, a dropped
        LISTEN connection) rather than only find its pooled connections closed."""
        if not down_for:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "restart")
            return
        import time

        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        time.sleep(down_for)
        self._pg_ctl_start()

    def stop(self) -> None:
        """Stop the server (immediately: nothing here needs a clean shutdown) and remove every file."""
        if self.started:
            with contextlib.suppress(Exception):
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


def stop_data_dir(root: Path) -> None:
    """Stop a server that a PgServer started in ``root`` from another process (`make cluster-down`), and
    remove ``root``. Nothing there, or nothing running: only the files go."""
    bin_dir = find_bin_dir()
    data = root / "data"
    if bin_dir is not None and (data / "postmaster.pid").exists():
        user = None
        if os.geteuid() == 0:
            user = pwd.getpwuid(data.stat().st_uid).pw_name
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=120,
            user=user,
            group=user,
            cwd="/",
            check=False,
        )
    shutil.rmtree(root, ignore_errors=True)
