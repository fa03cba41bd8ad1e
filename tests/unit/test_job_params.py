"""Typed job parameters (corral.spec.job_params): one model per job kind, checked when a job is written and read
typed by the agent's handlers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from corral.host.handlers import build_handlers
from corral.host.job_context import JobContext
from corral.spec import job_params
from corral.spec.job import JobKind
from corral.spec.job_params import (
    PARAMS,
    ForwardRemoval,
    HostDrainParams,
    JobParams,
    JobParamsError,
    MigrateInParams,
    MigrateParams,
    PortForwardParams,
    VMCreateParams,
    VMExecParams,
    VMStopParams,
)
from corral.store import jobs
from corral.store.db import Store
from corral.store.models import Job


def test_every_job_kind_has_a_parameter_model_and_a_handler() -> None:
    assert set(PARAMS) == set(JobKind)
    assert all(issubclass(model, JobParams) for model in PARAMS.values())
    assert set(build_handlers()) == set(JobKind)


@pytest.mark.parametrize(
    ("kind", "params", "says"),
    [
        (JobKind.VM_EXEC, {"timeout": 5}, "argv"),  # a required key is missing
        (JobKind.VM_EXEC, {"argv": []}, "argv"),  # too short
        (JobKind.VOLUME_RESIZE, {"size": "big"}, "size"),  # the wrong type
        (JobKind.VM_STOP, {"forse": True}, "'forse'"),  # a misspelt key would be dropped without a word
        (JobKind.VM_PAUSE, {"wait": True}, "'wait'"),  # a kind that takes nothing
        (JobKind.VM_STOP, VMExecParams(argv=["true"]), "VMExecParams"),  # another kind's model
    ],
)
def test_a_bad_job_is_refused_when_it_is_written(
    store: Store, kind: JobKind, params: dict[str, object] | JobParams, says: str
) -> None:
    with pytest.raises(JobParamsError) as caught, store.session() as session:
        jobs.submit(session, kind, "vm", "web", target_id="x", host="h1", params=params)
    assert kind in caught.value.message and says in str(caught.value)
    with store.session() as session:
        assert session.query(Job).count() == 0, "nothing was queued"


def test_an_unknown_job_kind_is_refused(store: Store) -> None:
    with pytest.raises(JobParamsError, match="no parameter model"), store.session() as session:
        jobs.submit(session, "vm.teleport", "vm", "web", host="h1")


def _claimed_context(store: Store) -> JobContext:
    """What the agent hands a handler when it runs a claimed job: the row's parameters as stored."""
    job = jobs.claim(store, "h1")
    assert job is not None
    agent = SimpleNamespace(store=store)
    return JobContext(agent, job.id, job.kind, job.target_id, job.target_name, dict(job.params), job.project)  # type: ignore[arg-type]


DRAIN_REPORT = {
    "vms": [{"vm": "a", "to": "h2", "job": "j", "with_storage": True}],
    "not_moved": [{"vm": "b", "reason": "full"}],
    "moved_stopped": [],
}
REMOVAL = ForwardRemoval(host_port=8080, guest_port=80, protocol="tcp", nic_index=1)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        (JobKind.VM_CREATE, VMCreateParams(start=True, wait=True, ready_timeout=90.0)),
        (JobKind.VM_EXEC, VMExecParams(argv=["uname", "-a"], timeout=5, stdin="hi")),
        (JobKind.VM_PORT_FORWARD, PortForwardParams(remove=REMOVAL)),
        (JobKind.VM_MIGRATE, MigrateParams.model_validate({"from": "h0", "to": "h1", "dest_job": "d", "after": None})),
        (JobKind.HOST_DRAIN, HostDrainParams.model_validate(DRAIN_REPORT)),
    ],
)
def test_what_the_writer_sets_is_what_the_handler_reads(store: Store, kind: JobKind, params: JobParams) -> None:
    with store.session() as session:
        jobs.submit(session, kind, "vm", "web", target_id="x", host="h1", params=params)
    ctx = _claimed_context(store)
    assert ctx.params_as(type(params)) == params
    # The row holds what the writer set, under the stored names, and no defaults it did not set: rows look as they
    # did before the models existed.
    assert ctx.params == params.model_dump(mode="json", by_alias=True, exclude_unset=True)


def test_a_dict_writer_is_validated_and_stored_as_given(store: Store) -> None:
    with store.session() as session:
        jobs.submit(session, JobKind.VM_STOP, "vm", "web", target_id="x", host="h1", params={"force": True})
    ctx = _claimed_context(store)
    assert ctx.params == {"force": True}
    assert ctx.params_as(VMStopParams) == VMStopParams(force=True, timeout=None)


def test_a_row_from_an_older_release_still_parses() -> None:
    """Keys no model knows any more are ignored by the reader; a missing optional key takes the default the
    handler's ``.get(...)`` used before."""
    old = {"force": True, "grace": 30}
    assert job_params.parse(VMStopParams, old) == VMStopParams(force=True)
    assert job_params.parse(VMCreateParams, {}) == VMCreateParams(start=False, wait=False, ready_timeout=None)


def test_a_running_job_publishes_checked_values(store: Store) -> None:
    """What one half of a move publishes for the other is checked like a new job's parameters; keys already
    stored are left as they are."""
    with store.session() as session:
        job = jobs.submit(
            session,
            JobKind.VM_MIGRATE_IN,
            "vm",
            "web",
            target_id="x",
            host="h1",
            params=MigrateInParams.model_validate({"from": "h0", "to": "h1"}),
        )
        jobs.add_params(job, source_job="s")
        job_id = job.id
        with pytest.raises(JobParamsError, match="'endpont'"):
            jobs.add_params(job, endpont={"host": "h1"})
        with pytest.raises(JobParamsError, match="resumed_at"):
            jobs.add_params(job, resumed_at="soon")
    with store.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        assert row.params == {"from": "h0", "to": "h1", "source_job": "s"}
        parsed = job_params.parse(MigrateInParams, row.params)
    assert (parsed.source_host, parsed.source_job, parsed.running) == ("h0", "s", False)


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_a_model_changed_after_it_was_built_is_checked_again(store: Store) -> None:
    params = VMStopParams(force=True)
    params.timeout = "soon"  # type: ignore[assignment]  # pydantic does not check an assignment by default
    with pytest.raises(JobParamsError, match="timeout"), store.session() as session:
        jobs.submit(session, JobKind.VM_STOP, "vm", "web", target_id="x", host="h1", params=params)
