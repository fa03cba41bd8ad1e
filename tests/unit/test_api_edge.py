"""The API's edge: bad input is a 4xx problem body and leaves the store as it was. No agent runs here, so
accepted verbs only queue jobs; the integration tests cover what the agent then does."""

import pytest
from fastapi.testclient import TestClient

from corral.api.app import create_app
from corral.api.auth import trusted
from corral.config import Settings
from corral.store.models import VM, Image, Job, Volume


@pytest.fixture
def api(store, host, tmp_path):
    with store.session() as session:
        session.add(Image(name="tiny", state="ready", kind="kernel", virtual_size=64 << 20))
    settings = Settings(home=tmp_path / "home")
    (tmp_path / "home" / "pools" / "default").mkdir(parents=True)
    # Trusted as the unix socket is: these tests are about input, tests/e2e/test_access.py about tokens.
    with TestClient(trusted(create_app(settings, store))) as client:
        yield client


def _counts(store):
    with store.session() as session:
        return tuple(session.query(model).count() for model in (VM, Volume, Job))


def _create(api, **spec):
    return api.post("/vms", json={"spec": {"name": "demo", "image": "tiny", **spec}})


@pytest.mark.parametrize(
    ("spec", "status", "words"),
    [
        ({"name": "Bad_Name"}, 422, "invalid VM name"),
        ({"memory": "-1"}, 422, "invalid size"),
        ({"memory": "12Q"}, 422, "invalid size"),
        ({"memory": "999T"}, 409, "more than host"),
        ({"cpus": 64}, 409, "vCPUs"),
        ({"image": "nope"}, 404, "image 'nope' not found"),
        ({"disks": [{"size": "999T"}]}, 409, "larger than the storage pool"),
        ({"nics": [{"mac": "zz"}]}, 422, "MAC"),
        ({"bogus": 1}, 422, "bogus"),
    ],
)
def test_bad_create_is_a_problem_and_changes_nothing(api, store, spec, status, words):
    before = _counts(store)
    response = _create(api, **spec)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert words in body["detail"]
    assert body["status"] == status
    assert _counts(store) == before


def test_capacity_is_checked_only_for_vms_that_will_run(api, store):
    with store.session() as session:
        session.add(
            VM(name="big", spec={"name": "big", "image": "tiny", "memory": 3 << 30}, host="h1", desired_state="running")
        )
    assert _create(api, memory="2G").status_code == 202
    response = api.post("/vms", json={"spec": {"name": "other", "image": "tiny", "memory": "2G"}, "start": True})
    assert response.status_code == 409 and "left" in response.json()["detail"]


def test_create_queues_one_job_and_duplicates_are_refused(api, store):
    response = _create(api)
    assert response.status_code == 202
    body = response.json()
    assert body["job"]["kind"] == "vm.create" and body["job"]["state"] == "queued"
    assert body["vm"]["disks"][0]["name"] == "demo-root"
    again = _create(api)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert _counts(store) == (1, 1, 1)


def test_verbs_on_a_missing_vm_are_404(api):
    for verb in ("start", "stop", "pause", "resume", "restart"):
        response = api.post(f"/vms/ghost/{verb}")
        assert response.status_code == 404, verb
    assert api.delete("/vms/ghost").status_code == 404
    assert api.post("/vms/ghost/exec", json={"argv": ["true"]}).status_code == 404


def test_a_second_verb_while_one_is_pending_is_a_conflict(api):
    _create(api)
    response = api.post("/vms/demo/start")
    assert response.status_code == 409 and "busy" in response.json()["detail"]


def test_exec_needs_a_command(api):
    _create(api)
    assert api.post("/vms/demo/exec", json={"argv": []}).status_code == 422


def test_volume_rules(api, store):
    assert api.post("/volumes", json={"name": "data", "size": "0"}).status_code == 422
    assert api.post("/volumes", json={"name": "../x", "size": "1G"}).status_code == 422
    assert api.post("/volumes", json={"name": "data", "size": "1G"}).status_code == 202
    assert api.post("/volumes", json={"name": "data", "size": "1G"}).status_code == 409
    with store.session() as session:
        session.query(Volume).one().state = "ready"
    shrink = api.post("/volumes/data/resize", json={"size": "512M"})
    assert shrink.status_code == 422 and "shrink" in shrink.json()["detail"]


def test_image_import_validates_paths_before_anything(api, store, tmp_path):
    before = _counts(store)
    assert api.post("/images/import", json={"name": "x", "file": "relative.img"}).status_code == 422
    assert api.post("/images/import", json={"name": "x", "file": str(tmp_path / "missing.img")}).status_code == 422
    assert api.post("/images/import", json={"name": "tiny", "file": "/etc/hostname"}).status_code == 409
    assert api.post("/images/build", json={"recipe": "windows"}).status_code == 422
    assert _counts(store) == before


def test_image_in_use_cannot_be_removed(api):
    _create(api)
    response = api.delete("/images/tiny")
    assert response.status_code == 409 and "demo" in response.json()["detail"]


def test_openapi_schema_is_served(api):
    schema = api.get("/openapi.json").json()
    assert "/vms" in schema["paths"] and "/jobs/{job_ref}" in schema["paths"]


def test_metrics_parse_and_describe_hosts_and_jobs(api):
    from prometheus_client.parser import text_string_to_metric_families

    _create(api, memory="512M")
    api.get("/vms")
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    host_memory = families["corral_host_memory_bytes"].samples[0]
    assert host_memory.labels == {"host": "h1"} and host_memory.value == 4 << 30
    assert families["corral_vm_memory_bytes"].samples[0].value == 512 << 20
    assert any(s.labels == {"kind": "vm.create", "state": "queued"} for s in families["corral_jobs"].samples)
    latency = families["corral_api_request_duration_seconds"]
    assert any(s.labels.get("route") == "/vms" for s in latency.samples)


def test_cancelling_a_queued_create_removes_what_it_was_to_make(api, store):
    before = _counts(store)
    job = _create(api, disks=[{"size": "1G"}]).json()["job"]
    cancelled = api.post(f"/jobs/{job['id'][:12]}/cancel").json()
    assert cancelled["state"] == "cancelled"
    with store.session() as session:
        assert session.query(VM).count() == before[0] and session.query(Volume).count() == before[1]
    assert api.get("/vms/demo").status_code == 404
