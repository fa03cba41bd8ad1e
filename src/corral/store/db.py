"""Opening the database, migrating it, and waking whoever waits for a change.

SQLite is the single-host default: WAL mode and a busy timeout let the API threads and the agent write side by
side. Every schema change goes through Alembic, from the first table on, so a store made today upgrades in place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


class Notifier:
    """Wakes waiters when something changed: jobs queued, a job's progress, a VM's state.

    In one process this is a condition variable; a cluster store replaces it with PostgreSQL LISTEN/NOTIFY.
    The counter lets a waiter tell "changed since I last looked" from a spurious wake-up.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.generation = 0
        self._callbacks: list[object] = []

    def notify(self) -> None:
        with self._condition:
            self.generation += 1
            self._condition.notify_all()
        for callback in list(self._callbacks):
            callback()  # type: ignore[operator]

    def wait(self, since: int, timeout: float) -> int:
        with self._condition:
            self._condition.wait_for(lambda: self.generation != since, timeout)
            return self.generation

    def subscribe(self, callback: object) -> None:
        self._callbacks.append(callback)


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


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(corral_readonly=True), expire_on_commit=False
        )
        self.notifier = Notifier()
        event.listen(self._sessions, "after_flush", _mark_changed)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as connection:
            raw = connection.connection.driver_connection
            if sqlite:
                # SQLite alters a table by copying it; with foreign keys on, dropping the old copy fails.
                # The pragma only takes effect outside a transaction, so it goes straight to the driver.
                raw.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.begin():
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
            finally:
                if sqlite:
                    raw.execute("PRAGMA foreign_keys=ON")

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session that only reads: it never takes SQLite's write lock, so it never waits for the agent."""
        with self._read_sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises; a commit that wrote
        anything wakes the waiters (the agent for new jobs, the CLI following a job)."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
        if session.info.get("changed"):
            self.notifier.notify()

    def close(self) -> None:
        self.engine.dispose()
