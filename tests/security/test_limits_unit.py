"""The request-limit middleware, the per-caller slots, the error backstop and the serial-log rotation, driven
without a daemon: raw ASGI calls against the real app on a real SQLite store, so a test can count exactly how
many body messages the server asked for (none, when it refuses first)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import HTTPConnection

from corral.api import disclosure, limits
from corral.api.app import create_app
from corral.api.auth import LOCAL
from corral.cluster import identity
from corral.cluster.identity import Role
from corral.config import Settings
from corral.errors import TooManyRequests
from corral.store.db import Notifier, Store
from corral.store.models import VM, AuditEntry

LIMIT = 4096


@pytest.fixture
def bench(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The app with small limits, and a token of project pa."""
    store = Store(f"sqlite:///{tmp_path / 'corral.db'}")
    store.migrate()
    with store.session() as session:
        identity.create_project(session, "pa")
        identity.create_project(session, "pb")
        identity.create_user(session, "mallory")
        _, secret = identity.create_token(session, "mallory", "pa", Role.ADMIN)
    settings = Settings(home=tmp_path / "home", max_request_body=LIMIT, request_body_timeout=0.5,
                        max_waits_per_caller=2, max_upload_size=10 * LIMIT)  # fmt: skip
    (tmp_path / "home" / "pools" / "default").mkdir(parents=True)
    app = create_app(settings, store)
    yield app, store, secret
    store.close()


class Body:
    """A receive() that hands out ``chunks`` and counts how often it was asked; ``stall`` never answers after
    the chunks (a client that stopped sending)."""

    def __init__(self, chunks: list[bytes], stall: bool = False) -> None:
        self.chunks = list(chunks)
        self.calls = 0
        self.stall = stall

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or self.stall}
        if self.stall:
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)  # nothing more: wait for a disconnect that never comes
        return {"type": "http.disconnect"}


def call(app, method: str, path: str, body: Body, headers: dict[str, str], local: bool = False,
         query: str = "") -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "https",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("198.51.100.7", 40000), "server": ("127.0.0.1", 8443),
    }  # fmt: skip
    if local:
        scope[LOCAL] = True
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        asyncio.run(asyncio.wait_for(app(scope, body, send), 20))
    except Exception:  # Starlette re-raises a bug after answering it, for the server's log
        if not sent:
            raise
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    response_headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    try:
        parsed = json.loads(payload) if payload else {}
    except ValueError:
        parsed = {"raw": payload.decode(errors="replace")}
    return start["status"], parsed, response_headers


def vm_body(size: int) -> bytes:
    return json.dumps({"spec": {"name": "big", "image": "tiny", "cloud_init": {"user_data": "x" * size}}}).encode()


def test_no_token_is_refused_before_one_body_byte_is_read(bench) -> None:  # type: ignore[no-untyped-def]
    app, store, _ = bench
    body = Body([b"x" * 65536] * 10)
    status, problem, headers = call(app, "POST", "/vms", body, {"content-length": str(300 << 20),
                                                                "content-type": "application/json"})  # fmt: skip
    assert status == 401 and "needs a token" in problem["detail"] and problem["hint"]
    assert body.calls == 0 and headers.get("connection") == "close"
    bad = Body([b"{}"])
    status, problem, _ = call(app, "POST", "/vms", bad, {"authorization": "Bearer corral_0_nope",
                                                         "content-length": "2"})  # fmt: skip
    assert status == 401 and bad.calls == 0
    with store.reading() as session:
        assert session.query(VM).count() == 0


def test_a_declared_oversized_body_is_413_at_once(bench) -> None:  # type: ignore[no-untyped-def]
    app, _store, secret = bench
    body = Body([b"x" * 65536])
    status, problem, _ = call(app, "POST", "/vms", body, {"authorization": f"Bearer {secret}",
                                                          "content-length": str(300 << 20)})  # fmt: skip
    assert status == 413 and "larger than this route takes (4K)" in problem["detail"], problem
    assert problem["type"].endswith("body-too-large") and body.calls == 0


def test_a_chunked_body_is_cut_at_the_limit(bench) -> None:  # type: ignore[no-untyped-def]
    app, store, secret = bench
    chunks = [vm_body(10 * LIMIT)[i : i + 1024] for i in range(0, 10 * LIMIT, 1024)]
    body = Body(chunks)
    status, problem, _ = call(app, "POST", "/vms", body, {"authorization": f"Bearer {secret}",
                                                          "transfer-encoding": "chunked",
                                                          "content-type": "application/json"})  # fmt: skip
    assert status == 413 and "larger than this route takes" in problem["detail"]
    assert body.calls <= LIMIT // 1024 + 1  # read up to the limit, not one message more
    with store.reading() as session:
        assert session.query(VM).count() == 0
        entry = session.query(AuditEntry).filter(AuditEntry.path == "/vms").one()
        assert entry.status == 413 and entry.project is None and "larger" in entry.result


def test_a_body_within_the_limit_reaches_the_route(bench) -> None:  # type: ignore[no-untyped-def]
    app, _store, secret = bench
    payload = json.dumps({"spec": {"name": "small", "image": "nope"}}).encode()
    body = Body([payload[:10], payload[10:]])
    status, problem, _ = call(app, "POST", "/vms", body, {"authorization": f"Bearer {secret}",
                                                          "transfer-encoding": "chunked",
                                                          "content-type": "application/json"})  # fmt: skip
    assert status == 404 and "image 'nope' not found" in problem["detail"]  # the route ran and answered


def test_a_stalled_body_is_cut_by_the_timeout(bench) -> None:  # type: ignore[no-untyped-def]
    app, _, secret = bench
    body = Body([b'{"spec": '], stall=True)
    started = time.monotonic()
    status, problem, _ = call(app, "POST", "/vms", body, {"authorization": f"Bearer {secret}",
                                                          "content-length": "200",
                                                          "content-type": "application/json"})  # fmt: skip
    assert status == 408 and "did not arrive in time" in problem["detail"]
    assert time.monotonic() - started < 5


def test_public_routes_need_no_token_and_the_unix_socket_passes(bench) -> None:  # type: ignore[no-untyped-def]
    app, _, _ = bench
    assert call(app, "GET", "/health", Body([b""]), {})[0] == 200
    status, _, _ = call(app, "GET", "/vms", Body([b""]), {}, local=True)
    assert status == 200
    status, _, _ = call(app, "GET", "/vms", Body([b""]), {})
    assert status == 401


def test_the_upload_prefix_has_its_own_limit(bench) -> None:  # type: ignore[no-untyped-def]
    app, _, _ = bench
    settings = app.state.corral.settings
    table = limits.body_limits(settings)
    assert limits.limit_for(table, "/uploads").max_bytes == 10 * LIMIT
    assert limits.limit_for(table, "/uploads/abc").deadline is None
    assert limits.limit_for(table, "/uploadsx").max_bytes == LIMIT
    assert limits.limit_for(table, "/vms").max_bytes == LIMIT


def test_caller_slots_cap_each_token_and_never_the_local_root(bench) -> None:  # type: ignore[no-untyped-def]
    app, _store, secret = bench
    slots = limits.CallerSlots(2)

    def connection(local: bool = False) -> HTTPConnection:
        scope = {"type": "http", "app": app, "headers": [(b"authorization", f"Bearer {secret}".encode())],
                 "query_string": b"", "path": "/jobs/x"}  # fmt: skip
        if local:
            scope[LOCAL] = True
        return HTTPConnection(scope)

    first, second = slots.take(connection(), "job wait"), slots.take(connection(), "job wait")
    with pytest.raises(TooManyRequests, match="at most 2"):
        slots.take(connection(), "job wait")
    slots.take(connection(), "console")()  # another kind has its own count
    for _ in range(5):
        slots.take(connection(local=True), "job wait")  # the local root: never capped
    first()
    first()  # a second release gives nothing back twice
    assert slots.held("job wait") == 1
    slots.take(connection(), "job wait")
    second()


def test_host_paths_are_cut_from_what_tenants_read() -> None:
    text = ("cannot open /etc/shadow: permission denied; /var/lib/corral/pools/default/x.qcow2 exists, "
            "see /docs or GET /vms/web; /tmp is full; /etcetera stays")  # fmt: skip
    scrubbed = disclosure.scrub(text)
    assert "/etc/shadow" not in scrubbed and "/var/lib" not in scrubbed and "/tmp" not in scrubbed
    assert "/docs" in scrubbed and "/vms/web" in scrubbed and "/etcetera" in scrubbed
    assert disclosure.scrub("under /data/corral/x.img", (Path("/data/corral"),)) == "under [host path]"


def test_an_internal_error_tells_a_tenant_only_an_id(bench, caplog) -> None:  # type: ignore[no-untyped-def]
    app, _, secret = bench

    @app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("/var/lib/corral/secret-path has 123456 bytes")

    app.middleware_stack = None  # rebuilt with the new route
    status, problem, _ = call(app, "GET", "/boom", Body([b""]), {"authorization": f"Bearer {secret}"})
    assert status == 500 and problem["detail"].startswith("internal error, id ")
    assert "/var" not in json.dumps(problem) and "123456" not in json.dumps(problem)
    error_id = problem["detail"].rsplit(" ", 1)[1]
    assert any(error_id in record.getMessage() for record in caplog.records)
    status, problem, _ = call(app, "GET", "/boom", Body([b""]), {}, local=True)
    assert status == 500 and "secret-path" in problem["detail"]  # the local root may read it all


def test_anonymous_requests_name_no_project_in_the_audit(bench) -> None:  # type: ignore[no-untyped-def]
    app, store, secret = bench
    call(app, "POST", "/vms/web/start", Body([b""]), {}, query="project=pb")
    call(app, "POST", "/vms/web/start", Body([b""]), {"authorization": f"Bearer {secret}"}, query="project=pb")
    with store.reading() as session:
        entries = [(e.user, e.project, e.status) for e in session.query(AuditEntry).filter(
            AuditEntry.path == "/vms/web/start")]  # fmt: skip
    assert sorted(entries) == [("anonymous", None, 401), ("mallory", None, 403)]


def test_the_notifier_wakes_async_waiters_without_a_thread() -> None:
    notifier = Notifier()

    async def scenario() -> tuple[float, float]:
        generation = notifier.generation
        timer = threading.Timer(0.2, notifier.notify)
        timer.start()
        started = time.monotonic()
        assert await notifier.wait_async(generation, 5) != generation
        woke = time.monotonic() - started
        started = time.monotonic()
        await notifier.wait_async(notifier.generation, 0.2)  # nothing happens: times out
        return woke, time.monotonic() - started

    woke, timed_out = asyncio.run(scenario())
    assert woke < 2 and 0.15 < timed_out < 2
    assert notifier.async_waiters == 0  # nothing left registered


def test_serial_log_rotation_keeps_it_bounded_and_follows_no_link(tmp_path: Path) -> None:
    from corral.host.observe import rotate_serial_log

    run = tmp_path / "run"
    run.mkdir()
    log = run / "serial.log"
    log.write_bytes(b"old line\n" * 20000)  # 180 kB
    with open(log, "ab") as writer:  # QEMU's O_APPEND writer, open across the rotation
        assert rotate_serial_log(run, 64 << 10)
        writer.write(b"after\n")
    assert log.read_bytes() == b"after\n"
    assert (run / "serial.log.1").stat().st_size == 64 << 10
    assert oct((run / "serial.log.1").stat().st_mode & 0o777) == "0o600"
    assert not rotate_serial_log(run, 64 << 10)  # under the cap: nothing to do
    victim = tmp_path / "victim"
    victim.write_bytes(b"v" * (200 << 10))
    log.unlink()
    os.symlink(victim, log)
    assert not rotate_serial_log(run, 64 << 10)
    assert victim.stat().st_size == 200 << 10


def test_vm_logs_reads_a_bounded_tail(tmp_path: Path) -> None:
    from corral.api import routes_console

    log = tmp_path / "serial.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(300000)))  # ~3.5 MB
    head, offset = routes_console.tail_log(log, 100000)
    assert len(head) <= routes_console.TAIL_MAX and head.endswith(b"line 299999\n")
    assert head.startswith(b"line ") and offset == log.stat().st_size
    (tmp_path / "serial.log.1").write_bytes(b"previous\n")
    log.write_bytes(b"current\n")
    assert routes_console.tail_log(log, 5)[0] == b"previous\ncurrent\n"
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0\n")
    log.unlink()
    os.symlink(secret, log)
    assert routes_console.tail_log(log, 5)[0] == b"previous\n"  # the link is not followed


def test_a_tenant_reads_its_jobs_without_host_paths(bench) -> None:  # type: ignore[no-untyped-def]
    from corral.store.models import Job

    app, store, secret = bench
    with store.session() as session:
        job = Job(kind="image.import", state="failed", project="pa", target_kind="image", target_name="x",
                  error="qemu-img: Could not open '/var/lib/corral/pools/default/abc.qcow2': Permission denied",
                  error_hint="check /etc/corral", message="reading /root/disk.img",
                  log=[{"message": "opened /tmp/upload-1"}], result={"stdout": "/etc/os-release is there"})  # fmt: skip
        session.add(job)
        session.flush()
        job_id = job.id
    status, view, _ = call(app, "GET", f"/jobs/{job_id}", Body([b""]), {"authorization": f"Bearer {secret}"})
    assert status == 200 and view["state"] == "failed"
    for field in ("error", "error_hint", "message", "log"):
        text = json.dumps(view[field])
        assert "/var/lib" not in text and "/etc" not in text and "/root" not in text and "/tmp" not in text, text
    assert "Permission denied" in view["error"]
    assert view["result"] == {"stdout": "/etc/os-release is there"}  # its own guest's words stay as they were
    status, listed, _ = call(app, "GET", "/jobs", Body([b""]), {"authorization": f"Bearer {secret}"})
    assert status == 200 and "/var/lib" not in json.dumps(listed)
    status, local, _ = call(app, "GET", f"/jobs/{job_id}", Body([b""]), {}, local=True, query="project=pa")
    assert status == 200 and "/var/lib/corral/pools/default/abc.qcow2" in local["error"]


def test_a_commit_elsewhere_wakes_an_async_waiter_through_postgresql(postgres) -> None:  # type: ignore[no-untyped-def]
    """A pool's control plane answers long-polls for jobs that agents on other hosts advance: the NOTIFY must reach
    a coroutine waiting on the notifier, not only threads."""
    writer = Store(postgres.create_database(f"t_{uuid.uuid4().hex[:12]}"))
    writer.migrate()
    reader = Store(writer.url)
    try:
        reader.check()
        assert reader.notifier.listening.wait(10)  # type: ignore[attr-defined]

        async def wait() -> float:
            generation = reader.notifier.generation
            threading.Timer(0.3, writer.notifier.notify).start()
            started = time.monotonic()
            assert await reader.notifier.wait_async(generation, 10) != generation
            return time.monotonic() - started

        assert asyncio.run(wait()) < 5
    finally:
        reader.close()
        writer.close()
