"""What an idle daemon does not do any more (issue 17, docs/performance.md "Third pass"): format QMP messages for a
debug log nobody reads, tick uvicorn ten times a second, wake everyone for a usage sample or a heartbeat, ask the
store for jobs and networks when nothing changed, re-read ten minutes of usage points for each roll-up."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from qemu.qmp.message import Message
from sqlalchemy import select

from corral.config import Settings
from corral.engine.qmp_client import QuietQMPClient
from corral.store import jobs
from corral.store import usage as usage_store
from corral.store.models import Host, UsagePoint


def test_qmp_messages_are_formatted_only_for_a_debug_log(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    formatted: list[int] = []
    real = Message.__str__

    def counted(self: Message) -> str:
        formatted.append(1)
        return real(self)

    monkeypatch.setattr(Message, "__str__", counted)

    async def hooks() -> None:
        client = QuietQMPClient("idle-test")
        message = Message({"return": {"actual": 1 << 30}})
        client.logger.setLevel(logging.INFO)
        assert client._cb_inbound(message) is message and client._cb_outbound(message) is message
        assert formatted == []
        client.logger.setLevel(logging.NOTSET)
        with caplog.at_level(logging.DEBUG, logger=client.logger.name):
            client._cb_inbound(message)
        assert formatted and '"actual"' in caplog.text

    asyncio.run(hooks())


def test_the_api_server_ticks_once_a_second_and_stops_at_once() -> None:
    from corral.api.serving import _config, _Server

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never called: no request is made
        raise AssertionError

    async def run() -> None:
        server = _Server(_config(app, "warning"))
        server.config.load()
        ticks: list[int] = []
        on_tick = server.on_tick

        async def counted(counter: int) -> bool:
            ticks.append(counter)
            return await on_tick(counter)

        server.on_tick = counted  # type: ignore[method-assign]
        loop = asyncio.create_task(server.main_loop())
        await asyncio.sleep(1.5)
        asked = time.monotonic()
        server.stop()
        await asyncio.wait_for(loop, 5)
        assert time.monotonic() - asked < 0.5  # not at the next tick
        assert 2 <= len(ticks) <= 4, ticks  # uvicorn's own loop: ~16 here
        assert all(counter % 10 == 0 for counter in ticks)  # each one refreshes the Date header
        assert server.server_state.default_headers

    asyncio.run(run())


def _host(name: str = "h1") -> Host:
    return Host(name=name, cpus=2, memory=4 << 30, storage_total=1 << 30, storage_free=1 << 30, qemu_version="7.2")


def _settled(store: Any) -> int:
    """The notifier's generation once a PostgreSQL listener has connected (which wakes every waiter once)."""
    if store.shared:
        assert store.notifier.listening.wait(10)
        time.sleep(0.2)
    return int(store.notifier.generation)


def test_a_quiet_session_wakes_nobody(store: Any) -> None:
    generation = _settled(store)
    with store.session(notify=False) as session:
        session.add(_host())
    assert store.notifier.generation == generation
    with store.session() as session:
        host = session.scalars(select(Host)).one()
        session.info["notify"] = False  # decided inside the block
        host.heartbeat_at = datetime.now(UTC)
    assert store.notifier.generation == generation
    with store.session() as session:
        session.scalars(select(Host)).one().state = "offline"
    assert store.notifier.generation != generation


def _agent(tmp_path: Any, store: Any) -> Any:
    from corral.host.agent import Agent

    return Agent(Settings(home=tmp_path / "home"), store, host_name="h1")


def test_an_idle_agent_asks_for_jobs_and_networks_only_after_a_change(
    tmp_path: Any, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent(tmp_path, store)
    claims: list[str] = []
    real_claim = jobs.claim

    def counted(*args: Any, **kwargs: Any) -> Any:
        claims.append("claim")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(jobs, "claim", counted)
    if store.shared:  # a pool's store is asked every pass: its notifications can be lost with their connection
        agent._dispatch_jobs()
        agent._dispatch_jobs()
        assert claims == ["claim", "claim"]
        assert agent._networks_due()
        return
    agent._dispatch_jobs()
    assert agent._networks_due()
    assert claims == ["claim"]
    agent._dispatch_jobs()  # nothing changed: no query
    assert not agent._networks_due()
    assert claims == ["claim"]
    with store.session() as session:  # any commit that wrote something (a job queued, a network made)
        session.add(_host("h2"))
    agent._dispatch_jobs()
    assert agent._networks_due()
    assert claims == ["claim", "claim"]
    # The safety net: after JOB_POLL / NETWORK_CHECK seconds, a pass asks anyway.
    agent._jobs_polled -= 60
    agent._networks_synced -= 60
    agent._dispatch_jobs()
    assert agent._networks_due()
    assert claims == ["claim", "claim", "claim"]


def test_a_heartbeat_that_changes_no_state_wakes_nobody(tmp_path: Any, store: Any) -> None:
    agent = _agent(tmp_path, store)
    agent.layout.ensure()
    generation = _settled(store)
    agent.register()  # the first registration: the host comes online
    assert store.notifier.generation != generation
    generation = store.notifier.generation
    agent.heartbeat()
    assert store.notifier.generation == generation
    with store.session() as session:
        session.scalars(select(Host).where(Host.name == "h1")).one().state = "unreachable"
    generation = store.notifier.generation
    agent.heartbeat()  # back online: a change of state, which wakes the waiters
    assert store.notifier.generation != generation


def _stats(at: float, cpu_seconds: float) -> dict[str, Any]:
    return {"sampled_at": at, "cpu_seconds": cpu_seconds, "memory_bytes": 1 << 30, "disks": {}, "nics": {}}


def test_each_roll_up_takes_the_spans_after_the_last_one_once(store: Any) -> None:
    start = (datetime.now(UTC) - timedelta(hours=2)).timestamp() // 600 * 600  # a ten-minute boundary

    def record(first: int, last: int) -> None:
        with store.session() as session:
            for step in range(first, last):
                before, now = start + step * 10, start + (step + 1) * 10
                samples = [(vm, _stats(before, step * 1.0), _stats(now, step + 1.0)) for vm in ("vm1", "vm2")]
                usage_store.record(session, "h1", samples, load=1.0)

    def minutes() -> list[tuple[str, str, datetime]]:
        with store.reading() as session:
            rows = session.execute(
                select(UsagePoint.kind, UsagePoint.resource_id, UsagePoint.at).where(UsagePoint.resolution == 60)
            )
            return sorted(tuple(row) for row in rows)  # type: ignore[misc]

    at = datetime.fromtimestamp
    record(0, 24)  # four minutes of points (the first point is at +10 s)
    with store.session() as session:
        assert usage_store.maintain(session, "h1", now=at(start + 245, UTC))["minute"] == 3 * 4  # minutes 0-3
    record(24, 48)
    with store.session() as session:
        usage_store.maintain(session, "h1", now=at(start + 300, UTC))  # minute 4
        usage_store.maintain(session, "h1", now=at(start + 305, UTC))  # nothing new
        assert usage_store.maintain(session, "h1", now=at(start + 485, UTC))["minute"] == 3 * 3  # minutes 5-7
    spans = minutes()
    assert len(spans) == len(set(spans)) == 3 * 8  # vm1, vm2 and the host, each minute once
    assert {row[2] for row in spans} == {at(start + 60 * m, UTC) for m in range(8)}
