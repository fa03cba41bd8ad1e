"""A daemon starting on a store whose schema is current does not load Alembic (issue 17: ~12 MiB of RSS); a new
store, or one a revision behind, is still handed to Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
