import pytest

from corral.store.db import Store
from corral.store.models import Host


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'test.db'}")
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def host(store):
    with store.session() as session:
        session.add(
            Host(
                name="h1",
                cpus=2,
                memory=4 << 30,
                storage_total=100 << 30,
                storage_free=50 << 30,
                qemu_version="7.2.22",
                cpu_overcommit=2.0,
                memory_overcommit=1.0,
                reserved_memory=0,
            )
        )
    return "h1"
