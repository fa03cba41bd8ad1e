"""Opening the database, migrating it, and waking whoever waits for a change.

SQLite is the single-host default: WAL mode and a busy timeout let the API threads and the agent write side by
side. PostgreSQL (through psycopg 3) holds a pool's store: the control planes and every host's agent share it, and
LISTEN/NOTIFY carries the wake-ups between their processes. Every schema change goes through Alembic, from the
first table on, so a store made today upgrades in place, on either database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from corral.errors import CorralError, InvalidInput

MIGRATIONS = Path(__file__).parent / "migrations"
NOTIFY_CHANNEL = "corral"
# Any constant shared by every process of a pool: migrations take this advisory lock so that a control plane and
# agents starting together do not all create the same tables.
MIGRATION_LOCK = 0x636F7272616C
log = logging.getLogger("corral.store")


class StoreUnavailable(CorralError):
    """The database cannot be reached (or refused us): nothing was changed."""

    code = "store-unavailable"
    http_status = 503


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL for what a user may write: ``postgresql://`` and ``postgres://`` mean psycopg 3 (the
    driver corral ships with), SQLite URLs pass through. Anything else is refused with the forms we accept."""
    hint = "write sqlite:////path/to/corral.db or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(f"invalid database URL {url!r}", hint) from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        if not parsed.database:
            raise InvalidInput(f"the database URL {parsed.render_as_string()!r} names no database", hint)
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return url
    raise InvalidInput(f"unsupported database {parsed.drivername!r} in {parsed.render_as_string()!r}", hint)


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


class Notifier:
    """Wakes waiters when something changed: jobs queued, a job's progress, a VM's state.

    In one process this is a condition variable; a cluster store replaces it with PostgreSQL LISTEN/NOTIFY.
    The counter lets a waiter tell "changed since I last looked" from a spurious wake-up.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.generation = 0
        self._callbacks: list[object] = []
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        with self._condition:
            self.generation += 1
            self._condition.notify_all()
            waiters = list(self._async_waiters)
        for loop, flag in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has ended
                loop.call_soon_threadsafe(flag.set)
        for callback in list(self._callbacks):
            callback()  # type: ignore[operator]

    def wait(self, since: int, timeout: float) -> int:
        with self._condition:
            self._condition.wait_for(lambda: self.generation != since, timeout)
            return self.generation

    async def wait_async(self, since: int, timeout: float) -> int:
        """:meth:`wait` for a coroutine: it holds no thread while it waits, so the API's long-polls cost a
        coroutine each rather than one of the few worker threads every other request needs."""
        flag = asyncio.Event()
        waiter = (asyncio.get_running_loop(), flag)
        with self._condition:
            if self.generation != since:
                return self.generation
            self._async_waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flag.wait(), timeout)
        finally:
            with self._condition:
                self._async_waiters.discard(waiter)
        return self.generation

    @property
    def async_waiters(self) -> int:
        """How many coroutines wait now (a leak would show here)."""
        with self._condition:
            return len(self._async_waiters)

    def subscribe(self, callback: object) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        """Nothing to release in one process."""


class PgNotifier(Notifier):
    """The same wake-ups across processes and hosts: ``notify`` wakes local waiters at once and sends a
    PostgreSQL NOTIFY; a listener thread turns every other process's NOTIFY into a local wake-up.

    Losing the connection loses no work, only promptness: waiters time out and poll (the agent looks for jobs
    every second anyway), and the listener wakes everyone once it is back, since it may have missed something.
    """

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # our own NOTIFYs come back to us: skip them
        self._send_lock = threading.Lock()
        self._send_conn: object | None = None
        self._closed = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="corral-store-listen", daemon=True)

    def start(self) -> None:
        """Begin listening (once the store is known to answer, so a wrong URL is one error, not a retry loop)."""
        if not self._thread.is_alive() and not self._closed.is_set():
            self._thread.start()

    def _wake_local(self) -> None:
        super().notify()

    def notify(self) -> None:
        self._wake_local()
        self._publish()

    def _publish(self) -> None:
        import psycopg

        with self._send_lock:
            try:
                if self._send_conn is None or self._send_conn.closed:  # type: ignore[attr-defined]
                    self._send_conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
                self._send_conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, self._token))  # type: ignore[attr-defined]
            except psycopg.Error as exc:
                log.debug("cannot send a store notification (waiters will poll): %s", exc)
                self._drop_sender()

    def _drop_sender(self) -> None:
        if self._send_conn is not None:
            with contextlib.suppress(Exception):
                self._send_conn.close()  # type: ignore[attr-defined]
            self._send_conn = None

    def _listen(self) -> None:
        import psycopg

        while not self._closed.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.listening.set()
                    self._wake_local()
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload == f"{self._token}:close":
                                return
                            if note.payload != self._token:
                                self._wake_local()
            except psycopg.Error as exc:
                self.listening.clear()
                if not self._closed.is_set():
                    log.warning("store notifications lost (%s); retrying in 1 s", exc)
                    self._closed.wait(1.0)

    def close(self) -> None:
        self._closed.set()
        if self.listening.is_set():  # end the listener's wait now rather than at its next timeout
            with self._send_lock, contextlib.suppress(Exception):
                if self._send_conn is not None:
                    self._send_conn.execute(  # type: ignore[attr-defined]
                        "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, f"{self._token}:close")
                    )
        if self._thread.is_alive():
            self._thread.join(3.0)
        with self._send_lock:
            self._drop_sender()


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _mark_changed(session: Session, _context: object) -> None:
    session.info["changed"] = True


def _sqlite_begin(connection: Connection) -> None:
    """An explicit BEGIN: the sqlite3 module would otherwise commit before every DDL statement, and a
    migration that fails halfway would leave half a schema behind. IMMEDIATE takes the write lock up front
    (waiting up to busy_timeout), because a deferred transaction that later needs to write fails at once with
    "database is locked" when another thread writes. Sessions that only read ask for DEFERRED: with WAL they
    never wait for a writer."""
    mode = "DEFERRED" if connection.get_execution_options().get("corral_readonly") else "IMMEDIATE"
    connection.exec_driver_sql(f"BEGIN {mode}")


STATE_FILE_MODE = 0o600


def sqlite_files(url: str) -> list[Path]:
    """The database file of a SQLite URL and its WAL companions (none for an in-memory database)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return []
    path = Path(database)
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def secure_sqlite_files(url: str) -> None:
    """Make the database root's alone (0600) before SQLite opens it: it holds token hashes and every VM.

    SQLite creates the file with 0644 (less the umask) and gives its -wal and -shm files the database's own
    mode, so creating the database 0600 first is what keeps all three private; files an older version left
    readable are narrowed here too."""
    files = sqlite_files(url)
    if not files:
        return
    files[0].parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(files[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, STATE_FILE_MODE))
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
                os.chmod(path, STATE_FILE_MODE)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        secure_sqlite_files(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # pre_ping: a pooled connection that a PostgreSQL restart closed is replaced instead of failing a request.
    # The API serves from a thread pool, so the pool is larger than SQLAlchemy's default of 5 + 10.
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10, connect_args={"connect_timeout": 10}
    )


class Store:
    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(corral_readonly=True), expire_on_commit=False)
        self.notifier: Notifier = Notifier()
        if self.dialect == "postgresql":
            conninfo = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
            self.notifier = PgNotifier(conninfo)
        event.listen(self._sessions, "after_flush", _mark_changed)

    @property
    def shared(self) -> bool:
        """True when other hosts' agents may use this store too (PostgreSQL)."""
        return self.dialect == "postgresql"

    def check(self) -> None:
        """Connect once, so a wrong URL or a server that is down is one clear error at start, not a traceback."""
        try:
            with self.engine.connect():
                pass
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
            raise StoreUnavailable(
                f"cannot open the store at {redact(self.url)}: {reason}",
                "check the URL, that the server runs and accepts this user" if self.shared else "check the path",
            ) from None
        if isinstance(self.notifier, PgNotifier):
            self.notifier.start()

    def current(self) -> bool:
        """True when the schema is already at the newest revision. Revisions are numbered as their files are
        (0001_..., 0016_...), so this needs no Alembic: a daemon that starts on a current store never imports it
        (with Mako it is ~10 MiB of the idle daemon's RSS, issue 17, docs/performance.md)."""
        names = [path.name[:4] for path in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")]
        if not names:
            return False
        try:
            with self.engine.connect() as connection:
                found = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
        except DBAPIError:  # no table yet: a new store
            return False
        return found == [max(names)]

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        self.check()
        if self.current():
            return
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as connection:
            raw = connection.connection.driver_connection
            if raw is None:  # only a closed connection has no driver connection
                raise CorralError("the store's database connection is closed")
            if sqlite:
                # SQLite alters a table by copying it; with foreign keys on, dropping the old copy fails.
                # The pragma only takes effect outside a transaction, so it goes straight to the driver.
                raw.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.begin():
                    if not sqlite:
                        # PostgreSQL runs DDL in the transaction; the lock makes concurrent starters take turns,
                        # and the second one finds the schema current.
                        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
            finally:
                if sqlite:
                    raw.execute("PRAGMA foreign_keys=ON")

    def migrate_in_child(self) -> None:
        """:meth:`migrate` for a long-running process: when the schema is behind, the upgrade runs in a child
        (``python -m corral.store.upgrade``), so Alembic and Mako are loaded and freed there. A store only this
        process can see (SQLite in memory) is migrated here."""
        self.check()
        if self.current():
            return
        if not sqlite_files(self.url) and not self.shared:
            self.migrate()
            return
        import json
        import subprocess
        import sys

        from corral.errors import error_from_problem

        result = subprocess.run(
            [sys.executable, "-m", "corral.store.upgrade"], input=self.url, capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            return
        last = (result.stderr.strip().splitlines() or [""])[-1]
        try:
            problem = json.loads(last)
        except ValueError:  # not a problem body: the child died of something else (its traceback ends here)
            problem = None
        if isinstance(problem, dict):
            raise error_from_problem(problem)
        raise CorralError(
            f"migrating the store at {redact(self.url)} failed: {last or f'exit code {result.returncode}'}",
            "run `python -m corral.store.upgrade` with the URL on stdin to see the whole error",
        )

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session that only reads: it never takes SQLite's write lock, so it never waits for the agent."""
        with self._read_sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def session(self, notify: bool = True) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises; a commit that wrote
        anything wakes the waiters (the agent for new jobs, the CLI following a job).

        ``notify=False`` is for writes nobody waits for (a round of usage samples, a heartbeat that changes no
        state): they would wake every waiter of the process, and on PostgreSQL every agent of the pool, for
        nothing. The block may also decide as it goes, with ``session.info["notify"]``."""
        with self._sessions() as session:
            session.info["notify"] = notify
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
        if session.info.get("changed") and session.info.get("notify", True):
            self.notifier.notify()

    def close(self) -> None:
        self.notifier.close()
        self.engine.dispose()
