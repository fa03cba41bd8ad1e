"""What only a shared (PostgreSQL) store does: wake other processes, let many starters migrate at once, and
refuse bad URLs with one clear line. The common store behaviour runs on both databases (the ``store`` fixture)."""

import threading
import uuid

import pytest

from corral.errors import InvalidInput
from corral.store import jobs
from corral.store.db import Store, StoreUnavailable, normalize_url


def _fresh(pg_template):
    return Store(pg_template.create_database(f"t_{uuid.uuid4().hex[:12]}", template="corral_template"))


def test_a_commit_in_one_store_wakes_another_process_store(pg_template):
    """Two Store objects share nothing but the server: the wake-up must travel through NOTIFY."""
    writer = _fresh(pg_template)
    reader = Store(writer.url)
    try:
        reader.check()  # starts listening
        assert reader.notifier.listening.wait(10)
        generation = reader.notifier.generation
        with writer.session() as session:
            jobs.submit(session, "vm.start", "vm", "a", host="h1")
        assert reader.notifier.wait(generation, 5.0) != generation
    finally:
        reader.close()
        writer.close()


def test_claimers_on_separate_stores_never_share_a_job(pg_template):
    """Agents are separate processes with their own connections; SKIP LOCKED keeps them off each other's job."""
    first = _fresh(pg_template)
    stores = [first] + [Store(first.url) for _ in range(3)]
    try:
        with first.session() as session:
            for index in range(40):
                jobs.submit(session, "vm.start", "vm", f"vm{index}", host="h1")
        claimed: list[str] = []
        lock = threading.Lock()

        def worker(store: Store) -> None:
            while (job := jobs.claim(store, "h1")) is not None:
                with lock:
                    claimed.append(job.id)

        threads = [threading.Thread(target=worker, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(claimed) == 40 and len(set(claimed)) == 40
    finally:
        for store in stores:
            store.close()


def test_starters_migrating_together_all_succeed(postgres):
    url = postgres.create_database(f"m_{uuid.uuid4().hex[:12]}")
    stores = [Store(url) for _ in range(4)]
    errors: list[BaseException] = []

    def migrate(store: Store) -> None:
        try:
            store.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []


def test_an_unreachable_server_is_one_clear_error(postgres):
    store = Store(f"postgresql://corral@127.0.0.1:{postgres.port}/no_such_database")
    try:
        with pytest.raises(StoreUnavailable, match=r"cannot open the store at postgresql.*no_such_database"):
            store.migrate()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://x@y/z", "unsupported database 'mysql'"),
        ("postgresql://x@y", "names no database"),
        ("not a url", "invalid database URL"),
    ],
)
def test_bad_database_urls_are_refused(url, words):
    with pytest.raises(InvalidInput, match=words):
        normalize_url(url)


def test_postgres_urls_use_psycopg_and_keep_the_password():
    assert normalize_url("postgres://u:secret@db:5433/corral") == "postgresql+psycopg://u:secret@db:5433/corral"
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
