"""Attacks on the API itself, as a hostile tenant (or no tenant at all) would make them over HTTPS.

Findings 6, 7 and the rest of 9 of issue 11: a 300 MB body sent without any token took the daemon from 126 MB
to 1.05 GB; 45 long-polls of one tenant made every other caller, the local root included, wait 38 s; error
messages told host paths and host RAM; an anonymous `?project=pb` was written into pb's audit log; a guest's
serial log grew without end and `vm logs` read all of it into memory. Each attack must be refused (or served)
with a useful answer, and must leave the daemon as it was: its memory bounded, nothing made, other callers fast.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.api.disclosure import HOST_PATH
from corral.api.serving import HEADER_TIMEOUT
from corral.client.remotes import pinned_context
from tests.security.conftest import Tenants

pytestmark = [pytest.mark.integration]

BODY_TIMEOUT = 3.0
LOG_MAX = 64 << 10
WAITS = 48  # more than the API's 40 worker threads
MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon_config() -> dict[str, object]:
    return {"request_body_timeout": BODY_TIMEOUT, "serial_log_max": LOG_MAX, "max_waits_per_caller": WAITS}


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture
def daemon_memory(tenants: Tenants) -> Iterator[dict[str, int]]:
    """The daemon's memory before a test; after it, its peak must not have grown by more than 40 MiB."""
    pid = tenants.daemon.proc.pid  # type: ignore[union-attr]
    before = memory_kib(pid)
    yield before
    after = memory_kib(pid)
    assert after["VmHWM"] - before["VmHWM"] < 40 * 1024, (before, after)


class Raw:
    """A raw HTTPS connection to the daemon, so a test sends exactly the bytes an attacker would (headers now,
    a body later or never) and sees when the server answers."""

    def __init__(self, tenants: Tenants) -> None:
        context: ssl.SSLContext = pinned_context(tenants.daemon.certificate)
        plain = socket.create_connection(("127.0.0.1", tenants.daemon.port), timeout=30)
        self.sock = context.wrap_socket(plain, server_hostname="127.0.0.1")

    def send_head(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def response(self, timeout: float = 10) -> tuple[int, dict[str, str], dict[str, object]]:
        """Status, headers and JSON body of the answer (read until the server closes or the body is complete)."""
        self.sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, json.loads(body or b"{}")

    def closed_by_server(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def vm_count(tenants: Tenants) -> int:
    with tenants.https("cluster-admin") as ops:
        return sum(len(ops.get("/vms", params={"project": p}).json()) for p in ("pa", "pb", "default"))


# -- finding 6: bodies ----------------------------------------------------------------------------------------


def test_a_300mb_body_without_a_token_is_refused_unread(tenants: Tenants, daemon_memory) -> None:  # type: ignore[no-untyped-def]
    before = vm_count(tenants)
    raw = Raw(tenants)
    try:
        # The head alone: the answer comes before a single body byte was sent, so none was waited for.
        started = time.monotonic()
        raw.send_head("POST", "/vms?project=pb", {"Content-Type": "application/json",
                                                  "Content-Length": str(300 * MiB)})  # fmt: skip
        status, headers, problem = raw.response()
        assert time.monotonic() - started < 2
        assert status == 401 and "needs a token" in problem["detail"] and problem["hint"]  # type: ignore[operator]
        assert headers.get("connection") == "close" and raw.closed_by_server()
    finally:
        raw.close()
    # And the whole 300 MB pushed at it as fast as it goes: the server stops reading and closes.
    raw = Raw(tenants)
    sent = 0
    try:
        raw.send_head("POST", "/vms", {"Content-Type": "application/json", "Content-Length": str(300 * MiB)})
        block = b"x" * MiB
        with pytest.raises((ConnectionError, ssl.SSLError, TimeoutError, OSError)):
            raw.sock.settimeout(10)
            while sent < 300 * MiB:
                raw.sock.sendall(block)
                sent += len(block)
    finally:
        raw.close()
    assert sent < 64 * MiB, f"the daemon took {sent >> 20} MiB of a body it had refused"
    assert vm_count(tenants) == before


def test_an_oversized_body_with_a_token_is_413_declared_or_chunked(tenants: Tenants, daemon_memory) -> None:  # type: ignore[no-untyped-def]
    before = vm_count(tenants)
    token = tenants.tokens["pa-admin"]
    raw = Raw(tenants)
    try:
        raw.send_head("POST", "/vms", {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                       "Content-Length": str(300 * MiB)})  # fmt: skip
        status, _, problem = raw.response()
        assert status == 413 and "larger than this route takes (1M)" in problem["detail"], problem  # type: ignore[operator]
        assert raw.closed_by_server()
    finally:
        raw.close()

    def chunks() -> Iterator[bytes]:
        yield b'{"spec": {"name": "huge", "image": "tiny", "cloud_init": {"user_data": "'
        for _ in range(300):
            yield b"y" * MiB

    with tenants.https("pa-admin") as pa:
        try:
            response = pa.post("/vms", content=chunks(), headers={"Content-Type": "application/json"})
        except httpx.TransportError:
            pass  # the server closed while the client still wrote: the refusal was not read back, which is fine
        else:
            assert response.status_code == 413 and "larger than this route takes" in response.json()["detail"]
    assert vm_count(tenants) == before
    with tenants.https("pa-admin") as pa:  # the daemon still serves
        assert pa.get("/vms").status_code == 200


def test_a_slow_body_is_cut_off(tenants: Tenants) -> None:
    raw = Raw(tenants)
    try:
        raw.send_head("POST", "/vms", {"Authorization": f"Bearer {tenants.tokens['pa-admin']}",
                                       "Content-Type": "application/json", "Content-Length": "200"})  # fmt: skip
        raw.sock.sendall(b'{"spec": {"na')  # and then nothing more
        started = time.monotonic()
        status, _, problem = raw.response(timeout=BODY_TIMEOUT + 10)
        waited = time.monotonic() - started
        assert status == 408 and "did not arrive in time" in problem["detail"], problem  # type: ignore[operator]
        assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 5 and raw.closed_by_server()
    finally:
        raw.close()


def test_a_trickled_body_is_cut_at_its_deadline(tenants: Tenants) -> None:
    """One byte a second never trips the idle timeout; the whole JSON body still has BODY_TIMEOUT in all."""
    raw = Raw(tenants)
    try:
        raw.send_head("POST", "/vms", {"Authorization": f"Bearer {tenants.tokens['pa-admin']}",
                                       "Content-Type": "application/json", "Content-Length": "500"})  # fmt: skip
        started = time.monotonic()
        answered = threading.Event()

        def trickle() -> None:
            while not answered.is_set() and time.monotonic() - started < 20:
                try:
                    raw.sock.sendall(b" ")
                except OSError:
                    return
                time.sleep(0.5)

        threading.Thread(target=trickle, daemon=True).start()
        status, _, _ = raw.response(timeout=20)
        answered.set()
        assert status == 408 and time.monotonic() - started < BODY_TIMEOUT + 5
    finally:
        raw.close()


# -- finding 7: waits -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stuck_job(tenants: Tenants) -> str:
    """A job of pa's that stays queued, as one for a host that is down does (written into the store as the
    agent of such a host would find it; no agent here claims it)."""
    job_id = uuid.uuid4().hex
    with sqlite3.connect(tenants.daemon.home / "corral.db", timeout=30) as db:
        db.execute(
            "INSERT INTO jobs (id, kind, state, project, target_kind, target_name, host, params, progress, message,"
            " log, cancel_requested, version, created_at) VALUES (?, 'vm.start', 'queued', 'pa', 'vm', 'ghost',"
            " 'host-that-is-down', '{}', 0, '', '[]', 0, 0, datetime('now'))",
            (job_id,),
        )
    return job_id


def timed_get(client: httpx.Client, path: str, **params: object) -> tuple[int, float]:
    started = time.monotonic()
    status = client.get(path, params=params).status_code
    return status, time.monotonic() - started


def test_many_waits_of_one_tenant_leave_everyone_else_fast(tenants: Tenants, stuck_job: str) -> None:
    local = httpx.Client(transport=httpx.HTTPTransport(uds=str(tenants.daemon.home / "corral.sock")),
                         base_url="http://corral")  # fmt: skip
    with local, concurrent.futures.ThreadPoolExecutor(WAITS) as pool:
        futures = [pool.submit(_long_poll, tenants, stuck_job) for _ in range(WAITS)]
        deadline = time.monotonic() + 30
        while _held(local, "job wait") < WAITS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _held(local, "job wait") == WAITS, "the waits did not all start"
        # Every other caller: pb over HTTPS, another token of pa, the local root on the unix socket.
        with tenants.https("pb-admin") as pb, tenants.https("pa-viewer") as viewer:
            for client, path in ((pb, "/vms"), (pb, "/jobs"), (viewer, "/vms"), (local, "/vms")):
                status, took = timed_get(client, path)
                assert status == 200 and took < 2, (path, took)
        started = time.monotonic()
        tenants.daemon.cli("vm", "list")  # a whole CLI process, its start-up included
        assert time.monotonic() - started < 5
        # One wait more by the same token is refused at once, with a hint; the local root is never capped.
        with tenants.https("pa-admin") as pa:
            started = time.monotonic()
            refused = pa.get(f"/jobs/{stuck_job}", params={"wait": 20, "version": 0})
            assert refused.status_code == 429 and time.monotonic() - started < 2
            assert f"at most {WAITS}" in refused.json()["detail"] and refused.json()["hint"]
            assert pa.get(f"/jobs/{stuck_job}").status_code == 200  # without waiting: served
        status, took = timed_get(local, f"/jobs/{stuck_job}", wait=1, version=0, project="pa")
        assert status == 200 and 0.8 < took < 3
        statuses = [future.result(timeout=60) for future in futures]
        assert statuses == [200] * WAITS
        assert _held(local, "job wait") == 0  # every slot given back


def test_event_streams_are_capped_per_token_and_given_back_on_disconnect(tenants: Tenants) -> None:
    local = httpx.Client(transport=httpx.HTTPTransport(uds=str(tenants.daemon.home / "corral.sock")),
                         base_url="http://corral")  # fmt: skip
    opened: list[tuple[httpx.Client, object]] = []
    try:
        for _ in range(WAITS):
            client = tenants.https("pa-viewer", timeout=30)
            stream = client.stream("GET", "/events", params={"follow": True})
            response = stream.__enter__()
            assert response.status_code == 200
            opened.append((client, stream))
        assert _held(local, "event stream") == WAITS
        with tenants.https("pa-viewer") as viewer:
            refused = viewer.get("/events", params={"follow": True})
            assert refused.status_code == 429 and "event stream" in refused.json()["detail"]
            assert viewer.get("/events").status_code == 200  # the latest events, without following: served
        with tenants.https("pb-admin") as pb, pb.stream("GET", "/events", params={"follow": True}) as other:
            assert other.status_code == 200  # another tenant's share is its own
    finally:
        for client, stream in opened:
            stream.__exit__(None, None, None)  # type: ignore[attr-defined]
            client.close()
    deadline = time.monotonic() + 10
    while _held(local, "event stream") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _held(local, "event stream") == 0, "slots of closed streams were not given back"
    local.close()


def _long_poll(tenants: Tenants, job_id: str) -> int:
    with tenants.https("pa-admin", timeout=90) as pa:
        return pa.get(f"/jobs/{job_id}", params={"wait": 15, "version": 0}).status_code


def _held(local: httpx.Client, kind: str) -> int:
    """Long-lived requests of ``kind`` the daemon holds now, from its metrics."""
    text = local.get("/metrics").text
    found = re.search(rf'^corral_api_held_requests{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


# -- finding 9: what errors tell ------------------------------------------------------------------------------


def test_error_bodies_tell_a_tenant_no_host_path_nor_host_figures(tenants: Tenants) -> None:
    home = str(tenants.daemon.home)
    with tenants.https("cluster-admin") as ops:
        host = ops.get("/hosts").json()[0]
    attempts = [
        ("POST", "/vms", {"spec": {"name": "greedy", "image": "tiny", "memory": "900G"}}),
        ("POST", "/vms", {"spec": {"name": "greedy", "image": "tiny", "cpus": 64}}),
        ("POST", "/vms", {"spec": {"name": "pathy", "image": "/etc/shadow"}}),
        ("POST", "/vms", {"spec": {"name": "../../etc/passwd", "image": "tiny"}}),
        ("POST", "/vms/ghost/start", None),
        ("GET", "/vms/..%2F..%2Fetc%2Fshadow", None),
        ("GET", "/nowhere/at/all", None),
        ("POST", "/vms", "not json"),
    ]
    with tenants.https("pa-admin") as pa:
        for method, path, body in attempts:
            kwargs = {"json": body} if isinstance(body, dict) else {"content": body} if body else {}
            response = pa.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
            text = response.text
            assert not HOST_PATH.search(text) and home not in text, text
            assert f"host {host['name']}" not in text, text  # no host named
        greedy = pa.post("/vms", json={"spec": {"name": "greedy", "image": "tiny", "memory": "900G"}}).json()
        assert "900G of memory" in greedy["detail"] and greedy["hint"]  # still says what to change
        assert not re.search(r"\(\d+(\.\d+)?[KMGT]\)", greedy["detail"]), greedy  # no host size in brackets
    # The local root, who runs the host, still reads the whole story.
    local = tenants.daemon.cli("vm", "create", "greedy", "--image", "tiny", "--memory", "900G", check=False)
    assert local.returncode != 0 and f"host {host['name']}" in local.stderr, local.stderr


def test_anonymous_requests_never_land_in_a_projects_audit_log(tenants: Tenants) -> None:
    marker = f"/vms/anon-{uuid.uuid4().hex[:6]}/start"
    with tenants.https(None) as anonymous:
        assert anonymous.post(marker, params={"project": "pb"}).status_code == 401
    with tenants.daemon.https("corral_0000_not-a-real-token") as forged:
        assert forged.post(marker, params={"project": "pb"}).status_code == 401
    with tenants.https("pa-admin") as pa:  # a real token with no role in pb: refused, and not in pb's log either
        assert pa.post(marker, params={"project": "pb"}).status_code == 403
    with tenants.https("pb-admin") as pb:
        entries = pb.get("/audit", params={"limit": 1000}).json()
    assert not [e for e in entries if e["path"] == marker], entries
    everything = tenants.daemon.cli_json("audit", "--all-projects", "--limit", "1000")
    mine = [e for e in everything if e["path"] == marker]  # type: ignore[index]
    assert len(mine) == 3 and all(e["project"] is None for e in mine)  # type: ignore[index]
    assert sorted(e["user"] for e in mine) == ["anonymous", "anonymous", "mallory"]  # type: ignore[index]


# -- finding 9: serial logs -----------------------------------------------------------------------------------


def test_a_serial_log_stays_bounded_and_vm_logs_reads_a_bounded_tail(tenants: Tenants) -> None:
    with tenants.https("pa-admin") as pa:
        accepted = pa.post("/vms", json={"spec": {"name": "chatty", "image": "tiny", "memory": "128M"},
                                         "start": True}).json()  # fmt: skip
        assert tenants.wait("pa-admin", accepted["job"]["id"])["state"] == "succeeded"
        vm = pa.get("/vms/chatty").json()
    log = tenants.daemon.home / "run" / vm["id"][:12] / "serial.log"
    deadline = time.monotonic() + 60
    while b"login" not in log.read_bytes() and b"#" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    # A guest printing without end, as fast as the host can take it: 32 MiB in the time of a reconcile pass.
    pid = tenants.daemon.proc.pid  # type: ignore[union-attr]
    before = memory_kib(pid)
    with log.open("ab") as guest:
        for index in range(32):
            guest.write(b"".join(b"noise %d %d\n" % (index, n) for n in range(MiB // 16)))
    deadline = time.monotonic() + 30
    while log.stat().st_size > 2 * LOG_MAX and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.stat().st_size <= 2 * LOG_MAX, "the agent did not rotate the log"
    previous = log.with_name("serial.log.1")
    assert previous.stat().st_size == LOG_MAX and previous.read_bytes().endswith(b"\n")
    with tenants.https("pa-viewer") as viewer:
        shown = viewer.get("/vms/chatty/logs", params={"lines": 100000})
        assert shown.status_code == 200 and len(shown.content) <= 1 << 20
        assert b"noise 31 " in shown.content  # the newest of what was written, from the part kept
    after = memory_kib(pid)
    assert after["VmHWM"] - before["VmHWM"] < 40 * 1024, (before, after)
    # The guest's newest output still reaches a follower after the rotation.
    with (
        tenants.https("pa-viewer", timeout=30) as viewer,
        viewer.stream("GET", "/vms/chatty/logs", params={"lines": 0, "follow": True}) as stream,
    ):
        with log.open("ab") as guest:
            guest.write(b"after the rotation\n")
        seen = b""
        for chunk in stream.iter_bytes():
            seen += chunk
            if b"after the rotation" in seen:
                break
    local = httpx.Client(transport=httpx.HTTPTransport(uds=str(tenants.daemon.home / "corral.sock")),
                         base_url="http://corral")  # fmt: skip
    with local:
        deadline = time.monotonic() + 10
        while _held(local, "log follow") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _held(local, "log follow") == 0  # the follower's slot came back when it hung up
    # The console (a websocket over the same HTTPS listener) outlives the listener's deadline for headers.
    from websockets.sync.client import connect

    url = f"wss://127.0.0.1:{tenants.daemon.port}/vms/chatty/console?project=pa"
    token = {"Authorization": f"Bearer {tenants.tokens['pa-operator']}"}
    with connect(url, ssl=pinned_context(tenants.daemon.certificate), additional_headers=token) as console:
        assert json.loads(console.recv(timeout=10)) == {"connected": "chatty"}
        time.sleep(HEADER_TIMEOUT + 2)
        console.send(b"echo still-here\n")
        echoed = b""
        deadline = time.monotonic() + 20
        while b"still-here" not in echoed and time.monotonic() < deadline:
            message = console.recv(timeout=20)
            echoed += message if isinstance(message, bytes) else message.encode()
        assert b"still-here" in echoed
    with tenants.https("pa-admin") as pa:
        pa.delete("/vms/chatty", params={"force": True})


def test_headers_sent_a_line_at_a_time_are_cut_off(tenants: Tenants) -> None:
    """Slow headers (before any body): the connection is closed at the listener's deadline, not held."""
    raw = Raw(tenants)
    try:
        raw.sock.sendall(b"GET /vms HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT + 10:
            try:
                raw.sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            raw.sock.settimeout(1)
            try:
                if raw.sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except (ConnectionError, ssl.SSLError):
                closed = True
                break
        assert closed and time.monotonic() - started < HEADER_TIMEOUT + 5
    finally:
        raw.close()
