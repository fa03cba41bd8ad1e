"""A daemon starting on a store whose schema is current does not load Alembic (issue 17: ~12 MiB of RSS); a new
store, or one a revision behind, is still handed to Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from corral.store.db import Store

PROBE = "import sys; from corral.store.db import Store; Store(sys.argv[1]).migrate(); print('alembic' in sys.modules)"


def _migrate_in_child(url: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, url], capture_output=True, text=True, check=True).stdout


def test_a_current_store_is_not_migrated_again_and_an_old_one_is(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/corral.db"
    assert _migrate_in_child(url).strip() == "True"  # a new store: Alembic makes the schema
    assert _migrate_in_child(url).strip() == "False"  # current: one query, no Alembic
    store = Store(url)
    try:
        assert store.current()
        with store.engine.begin() as connection:
            head = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            connection.execute(text("UPDATE alembic_version SET version_num = :old"), {"old": f"{int(head) - 1:04d}"})
        assert not store.current()  # one revision behind: migrate() hands it to Alembic
    finally:
        store.close()


CHILD_PROBE = (
    "import sys; from corral.store.db import Store; store = Store(sys.argv[1]); store.migrate_in_child(); "
    "print('alembic' in sys.modules, store.current())"
)


def test_a_daemon_migrates_a_new_store_in_a_child_and_never_loads_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/corral.db"
    answer = subprocess.run([sys.executable, "-c", CHILD_PROBE, url], capture_output=True, text=True, check=True)
    assert answer.stdout.split() == ["False", "True"]
    store = Store(url)
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM vms")).scalar_one() == 0
    finally:
        store.close()


def test_a_failed_upgrade_in_the_child_is_one_error_naming_the_cause(tmp_path: Path) -> None:
    from corral.errors import CorralError

    store = Store(f"sqlite:///{tmp_path}/corral.db")
    try:
        store.migrate_in_child()
        with store.engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))  # a revision we do not ship
        with pytest.raises(CorralError, match=r"migrating the store .* failed: .*9999"):
            store.migrate_in_child()
    finally:
        store.close()


def test_a_store_in_memory_is_migrated_in_this_process() -> None:
    store = Store("sqlite://")
    try:
        store.migrate_in_child()
        assert store.current()
    finally:
        store.close()
