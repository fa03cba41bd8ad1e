import threading

from corral.errors import Conflict
from corral.spec.job import JobState
from corral.store import jobs
from corral.store.models import Job


def test_migrations_create_every_table(store):
    from sqlalchemy import inspect

    assert {"hosts", "images", "vms", "volumes", "jobs", "alembic_version"} <= set(
        inspect(store.engine).get_table_names()
    )


def test_claim_takes_each_job_once_in_order(store):
    with store.session() as session:
        first = jobs.submit(session, "vm.start", "vm", "a", host="h1").id
        second = jobs.submit(session, "vm.start", "vm", "b", host="h1").id
        jobs.submit(session, "vm.start", "vm", "c", host="other")
    assert jobs.claim(store, "h1").id == first
    assert jobs.claim(store, "h1").id == second
    assert jobs.claim(store, "h1") is None


def test_concurrent_claims_never_share_a_job(store):
    with store.session() as session:
        for index in range(20):
            jobs.submit(session, "vm.start", "vm", f"vm{index}", host="h1")
    claimed: list[str] = []
    lock = threading.Lock()

    def worker():
        while (job := jobs.claim(store, "h1")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 20 and len(set(claimed)) == 20


def test_progress_finish_and_error_are_recorded(store):
    with store.session() as session:
        job_id = jobs.submit(session, "image.build", "image", "tiny", host="h1").id
    jobs.claim(store, "h1")
    assert jobs.report(store, job_id, 0.5, "halfway") is False
    jobs.finish(store, job_id, error=Conflict("the VM is busy", "wait"))
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.FAILED
        assert job.error == "the VM is busy" and job.error_code == "conflict" and job.error_hint == "wait"
        assert [entry["message"] for entry in job.log] == ["halfway", "error: the VM is busy"]


def test_cancel_a_queued_job_ends_it_and_a_running_one_is_flagged(store):
    with store.session() as session:
        queued = jobs.submit(session, "vm.start", "vm", "a", host="h1").id
        running = jobs.submit(session, "vm.start", "vm", "b", host="h1").id
    jobs.claim(store, "h1")  # takes `queued` (older)
    jobs.claim(store, "h1")
    with store.session() as session:
        session.get(Job, queued).state = JobState.QUEUED  # put one back in the queue
    assert jobs.request_cancel(store, queued).state == JobState.CANCELLED
    jobs.request_cancel(store, running)
    assert jobs.report(store, running, 0.1) is True


def test_orphaned_running_jobs_fail_on_agent_restart(store):
    with store.session() as session:
        job_id = jobs.submit(session, "vm.start", "vm", "a", host="h1").id
    jobs.claim(store, "h1")
    assert len(jobs.fail_orphans(store, "h1")) == 1
    with store.session() as session:
        assert session.get(Job, job_id).state == JobState.FAILED


def test_a_commit_wakes_waiters(store):
    generation = store.notifier.generation
    with store.session() as session:
        jobs.submit(session, "vm.start", "vm", "a", host="h1")
    assert store.notifier.wait(generation, 1.0) != generation


def test_a_store_with_data_upgrades_in_place(tmp_path):
    """Migrations run on a database that already holds rows (SQLite rebuilds altered tables)."""
    from alembic import command
    from alembic.config import Config

    from corral.store.db import MIGRATIONS, Store
    from corral.store.models import VM, Volume

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO vms (id, name, project, spec, desired_state, observed_state, status_message, ready, "
            "interfaces, restart_count, created_at, updated_at) VALUES ('v1', 'old', 'default', '{}', 'stopped', "
            "'stopped', '', 0, '[]', 0, '2026-01-01', '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO volumes (id, name, project, pool, path, size, format, state, role, vm_id, device_index, "
            "created_at) VALUES ('o1', 'old-root', 'default', 'default', 'old-root.qcow2', 1, 'qcow2', 'ready', "
            "'root', 'v1', 0, '2026-01-01')"
        )
    store.migrate()
    with store.session() as session:
        assert session.get(VM, "v1").name == "old"
        assert session.get(Volume, "o1").vm_id == "v1"
        assert session.get(VM, "v1").current_snapshot is None
    store.close()
