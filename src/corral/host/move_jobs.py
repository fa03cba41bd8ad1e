"""The agents' jobs of a move between hosts: ``vm.migrate-in`` (destination), ``vm.migrate`` (source),
``host.drain`` (follows a drain's moves), and ``reclaim_moved`` (an agent's start-up sweep).

The two halves meet only through the store (corral.cluster.moves writes both jobs):

1. destination: start QEMU with ``-incoming`` (``move_support.prepare_incoming``) and publish the endpoint
   into its own job's parameters (``params.endpoint``);
2. source: wait for that endpoint, then ``move_support.migrate_out``: mirror the disks (without shared
   storage), send RAM; once the stream completed it asks ``confirm()``, which reads the destination's job;
3. destination: once the stream ended and the VM runs there, in **one transaction** it points the VM's row and
   its volumes at this host (a copied disk is standalone: no backing image or base any more) and sets
   ``params.running`` on its job. That commit is the move's point of no return;
4. source: ``confirm()`` sees ``running`` and quits its paused copy; after a storage move it deletes its disks.

Exactly one copy runs at the end, whatever fails:

- before the commit, the destination is torn down (its QEMU killed, the disks it made removed) and the source,
  which never stopped or is resumed by its rollback, keeps the VM. The destination watches the source's job and
  host while it waits: a failed source job, or a source host that stopped heartbeating with no stream arriving,
  ends the wait.
- if the commit itself fails, the destination kills its copy before reporting the failure, so the source's
  ``confirm()`` (which answers no only when the destination's job ended without ``running``) resumes a VM
  that runs nowhere else.
- the source agent killed mid-move: its QEMU carries the move on by itself (QEMU does not need its QMP client
  to finish a migration), so either the stream completes and the destination commits, or the destination gives up
  and the source QEMU keeps running. A QEMU left paused after the stream completed is killed by the source
  agent when it starts again (``reclaim_moved``: a local QEMU of a VM that the store puts on another host is a
  stale copy). The same sweep on a destination whose agent died before it committed kills the copy there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from corral.engine.live_migration import IncomingEndpoint, MigrationTuning
from corral.engine.runtime import RuntimeRecord, is_same_process
from corral.errors import Conflict, CorralError, NotFound
from corral.host import move_support, network_jobs, resize_jobs, storage, vm_lifecycle, vm_plan
from corral.spec.job import JobKind, JobState
from corral.spec.job_params import HostDrainParams, MigrateInParams, MigrateParams, MoveParams, dump, parse
from corral.spec.vm import PowerState
from corral.store import jobs, network_queries
from corral.store.models import VM, Host, Job, utcnow

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext

log = logging.getLogger("corral.agent")

POOL_MARKER = ".corral-pool-id"  # corral.cluster.moves reads the id from the host rows
POLL = 0.1
# After the source's job failed, how long the destination still waits for a stream QEMU may finish on its own.
SOURCE_GRACE = 5.0
# Multifd precopy with auto-converge, never postcopy from jobs: postcopy splits the VM between hosts when it
# fails, and its retry needs a second destination (docs/migration.md).
TUNING = MigrationTuning(postcopy="never")


class MigrationAborted(Conflict):
    """The destination gave the move up: the VM stays on its source."""


def pool_identity(pool_dir: Path) -> str:
    """This pool's id, made once by whichever host gets there first: hosts that mount one shared pool read the
    same file, which is how the control plane knows they share storage."""
    marker = pool_dir / POOL_MARKER
    pool_dir.mkdir(parents=True, exist_ok=True)
    try:
        with marker.open("x") as handle:  # exclusive: two hosts creating it at once agree on one id
            handle.write(uuid.uuid4().hex + "\n")
    except FileExistsError:
        pass
    for _ in range(50):  # the winner may not have written it yet
        text = marker.read_text().strip()
        if text:
            return text
        time.sleep(0.01)
    raise Conflict(f"{marker} is empty", "remove it; the agent writes a new one")


# -- store helpers ------------------------------------------------------------------------------------------------


def load_job(agent: Agent, job_id: str) -> Job:
    with agent.store.reading() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} is gone")
        session.expunge(job)
        return job


def publish_job(agent: Agent, job_id: str, **values: Any) -> None:
    """Merge ``values`` into a running job's parameters: what the other half of the move reads."""
    with agent.store.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} is gone")
        jobs.add_params(job, **values)
        job.version += 1
    agent.store.notifier.notify()


def _finished(job: Job) -> bool:
    return JobState(job.state).finished


def host_alive(agent: Agent, name: str) -> bool:
    with agent.store.reading() as session:
        host = session.scalars(select(Host).where(Host.name == name)).first()
        if host is None:
            return False
        fresh = utcnow() - timedelta(seconds=agent.settings.host_timeout)
        return host.state == "online" and host.heartbeat_at >= fresh


def free_port_on(address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


# -- destination -----------------------------------------------------------------------------------------------


def _check_destination(agent: Agent, vm_id: str, copy: bool) -> None:
    """Refuse early, with the fix, what would otherwise fail as a QEMU error halfway."""
    if not agent.address:
        raise Conflict(
            f"host {agent.host_name} has no address other hosts can reach", "restart its agent with --address ADDRESS"
        )
    vm = vm_lifecycle.load_vm(agent, vm_id)
    plan = vm_plan.build_plan(agent, vm)
    boot = plan.kernel_boot
    for path in (boot.kernel, boot.initrd) if boot is not None else ():
        if path is not None and not path.exists():
            raise Conflict(
                f"the image of VM {vm.name} is missing on host {agent.host_name} ({path})",
                f"build or import the image on {agent.host_name} too (images are per host)",
            )
    if not copy:
        for disk in plan.disks:
            if not disk.read_only and not disk.path.exists():
                raise Conflict(
                    f"{disk.path} is not on host {agent.host_name}: the hosts do not share storage",
                    "migrate with --with-storage",
                )
    network_jobs.check_forwards_free(agent, vm)


async def vm_migrate_in(ctx: JobContext) -> dict[str, Any]:
    """Destination: receive the VM, then take it over in the store (see the module's docstring)."""
    agent = ctx.agent
    vm_id = ctx.target_id
    if vm_id is None:
        raise NotFound(f"VM {ctx.target_name} not found")
    params = ctx.params_as(MigrateInParams)
    source, copy, source_job = params.source_host, params.with_storage, params.source_job
    if source_job is None:  # written with the job, in the same transaction: never missing but in a broken row
        raise NotFound(f"the move of VM {ctx.target_name} has no source job")
    ctx.progress(0.02, f"starting QEMU to receive {ctx.target_name} from {source}")
    _check_destination(agent, vm_id, copy)
    address = agent.address or ""
    nbd_port = await asyncio.to_thread(free_port_on, address) if copy else None
    incoming = await move_support.prepare_incoming(
        agent, vm_id, listen_host=address, nbd_port=nbd_port, shared_storage=not copy, tuning=TUNING
    )
    done: asyncio.Task[float | None] | None = None
    try:
        assert incoming.endpoint is not None
        publish_job(agent, ctx.job_id, endpoint=incoming.endpoint.model_dump())
        ctx.progress(0.1, f"listening on {incoming.endpoint.host}:{incoming.endpoint.port} for {source}")
        # The stream's end, not IncomingVM.complete(): its removal of the NBD exports waits for the source to
        # drop its mirror connections, which the source does only after this side committed (below).
        done = asyncio.get_running_loop().create_task(incoming.migration.wait(TUNING.timeout))
        await _wait_for_stream(ctx, incoming, done, source, source_job)
        resumed_at = done.result()
    except BaseException:
        if done is not None and not done.done():
            done.cancel()
            with contextlib.suppress(BaseException):
                await done
        await incoming.abort()
        raise
    info = {"pid": incoming.proc.pid, "resumed_at": resumed_at}
    vm_lifecycle.track(agent, vm_id, incoming.proc)
    try:
        _take_over(agent, ctx, vm_id, info, copy)
    except BaseException:
        # The source still holds the VM, paused: it resumes when it sees this job fail. Never leave two copies.
        running = agent.vms.get(vm_id)
        if running is not None:
            running.expected_exit = True
            with contextlib.suppress(Exception):
                await running.proc.kill()
            await vm_lifecycle.untrack(agent, running)
        await incoming.abort()
        raise
    # Its port forwards too: hold their ports and load their rules now, not at the next reconcile.
    with contextlib.suppress(Exception):
        await asyncio.to_thread(agent.networks.sync)
    # The VM is ours now; the exports go once the source has cancelled its mirrors (or after a grace period).
    try:
        await incoming.migration.finish()
    except Exception as exc:  # the VM runs and the rows say so: a stale export is worth a line in the log only
        log.warning("VM %s: NBD exports not removed after the move: %s", ctx.target_name, exc)
    return {"from": source, "to": agent.host_name, "pid": info["pid"], "resumed_at": info["resumed_at"]}


async def _wait_for_stream(
    ctx: JobContext, incoming: move_support.IncomingVM, done: asyncio.Task[Any], source: str, source_job: str
) -> None:
    """Until ``done`` (the VM runs here), a cancel, or a source that will not send it any more."""
    agent = ctx.agent
    gone_since: float | None = None
    while True:
        await asyncio.wait({done}, timeout=1.0)
        if done.done():
            return  # finished, or raised: the caller's ``result()`` tells
        ctx.progress(None)  # a cancel request raises here
        job = load_job(agent, source_job)
        reason = None
        if _finished(job) and job.state != JobState.SUCCEEDED:
            reason = f"the source's job {job.state}: {job.error or job.message}"
        elif not host_alive(agent, source) and not await _stream_arriving(incoming):
            reason = f"host {source} stopped answering before it sent the VM"
        if reason is None:
            gone_since = None
            continue
        gone_since = gone_since or time.monotonic()
        if time.monotonic() - gone_since >= SOURCE_GRACE:
            raise MigrationAborted(
                f"the move of {ctx.target_name} was abandoned: {reason}",
                f"the VM still runs on {source}; see `corral job show {source_job[:12]}`",
            )


async def _stream_arriving(incoming: move_support.IncomingVM) -> bool:
    with contextlib.suppress(Exception):
        status = (await incoming.proc.execute("query-migrate")).get("status")
        return status in ("active", "device", "postcopy-active", "completed")
    return False


def _take_over(agent: Agent, ctx: JobContext, vm_id: str, info: dict[str, Any], copy: bool) -> None:
    """The point of no return: the VM's row and volumes name this host, and the source learns it runs here."""
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        job = session.get(Job, ctx.job_id)
        if vm is None or job is None:
            raise NotFound(f"VM {ctx.target_name} was deleted during its move")
        vm.host = agent.host_name
        vm.pid = info["pid"]
        vm.observed_state = PowerState.RUNNING
        vm.status_message = f"moved from {ctx.params_as(MigrateInParams).source_host}"
        network_queries.move_forwards(session, vm, agent.host_name)  # they follow the VM: rules, held ports
        for volume in vm.volumes:
            volume.host = agent.host_name
            if copy:  # the mirror wrote whole disks: no image or base under them here
                volume.backing_image = None
                volume.backing_path = None
        jobs.add_params(job, running=True, resumed_at=info["resumed_at"])
        job.version += 1
    agent.store.notifier.notify()


# -- source ----------------------------------------------------------------------------------------------------


async def vm_migrate(ctx: JobContext) -> dict[str, Any]:
    """Source: send the VM to the destination's endpoint; after the destination took it over, quit the local
    copy and, after a storage move, remove the local disks."""
    agent = ctx.agent
    vm_id = ctx.target_id
    if vm_id is None:
        raise NotFound(f"VM {ctx.target_name} not found")
    params = ctx.params_as(MigrateParams)
    target, copy, dest_job = params.to, params.with_storage, params.dest_job
    started = time.monotonic()
    if params.after:
        await _wait_turn(ctx, params.after)
    try:
        await resize_jobs.refuse_hotplugged_cpus(agent.vms.get(vm_id), "migration")
        await _clear_interrupted_move(agent.vms.get(vm_id))
        endpoint = await _wait_endpoint(ctx, dest_job, target)
    except BaseException:
        _cancel_quietly(agent, dest_job)
        raise

    async def confirm() -> bool:
        """True once the destination committed; False only once its job ended without committing (its QEMU
        is gone then). While it says nothing, keep waiting: resuming here could make two copies."""
        while True:
            job = load_job(agent, dest_job)
            if parse(MigrateInParams, job.params).running:
                return True
            if _finished(job):
                return False
            await asyncio.sleep(POLL)

    try:
        result = await move_support.migrate_out(ctx, endpoint, tuning=TUNING, confirm=confirm)
    except BaseException:
        _cancel_quietly(agent, dest_job)
        raise
    if copy:
        await _remove_local_disks(agent, vm_id)
    vm_lifecycle.remove_run_dir(agent, vm_id)
    with contextlib.suppress(Exception):  # let go of the VM's forwarded ports and rules now (reconcile would too)
        await asyncio.to_thread(agent.networks.sync)
    dest = load_job(agent, dest_job)
    resumed_at = parse(MigrateInParams, dest.params).resumed_at
    stopped_at = result.get("stopped_at")
    paused_ms = round((resumed_at - stopped_at) * 1000) if resumed_at and stopped_at else None
    return {
        **result,
        "from": agent.host_name,
        "to": target,
        "with_storage": copy,
        "paused_ms": paused_ms,
        "elapsed_s": round(time.monotonic() - started, 3),
    }


async def _clear_interrupted_move(running: Any) -> None:
    """An earlier move of this QEMU whose agent was killed (SIGKILL: no roll-back ran) left its disk mirror jobs
    and their NBD target nodes (``mig-<disk>``) in it, and every later move failed on "Duplicate nodes with
    node-name='mig-disk0'" (found by the migration chaos rounds, tests/chaos_harness.py). They lead to a
    destination that gave up long ago: cancel and remove them before this move adds its own."""
    from corral.engine.live_migration.common import EXPORT_PREFIX

    if running is None or running.proc.exited:
        return
    proc = running.proc
    with contextlib.suppress(CorralError):
        for job in await proc.execute("query-jobs"):
            if str(job.get("id", "")).startswith(EXPORT_PREFIX):
                with contextlib.suppress(CorralError):
                    await proc.execute("block-job-cancel", {"device": job["id"], "force": True})
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            left = [j for j in await proc.execute("query-jobs") if str(j.get("id", "")).startswith(EXPORT_PREFIX)]
            for job in left:
                if job.get("status") == "concluded":
                    with contextlib.suppress(CorralError):
                        await proc.execute("job-dismiss", {"id": job["id"]})
            if not left:
                break
            await asyncio.sleep(0.05)
        for node in await proc.execute("query-named-block-nodes", {"flat": True}):
            name = str(node.get("node-name", ""))
            if name.startswith(EXPORT_PREFIX):
                with contextlib.suppress(CorralError):
                    await proc.execute("blockdev-del", {"node-name": name})
                log.warning("removed node %s that an interrupted move left in the VM's QEMU", name)


def _cancel_quietly(agent: Agent, job_id: str) -> None:
    """Ask the destination to give up (it also sees this job fail): its QEMU goes sooner."""
    with contextlib.suppress(Exception):
        jobs.request_cancel(agent.store, job_id)


async def _wait_turn(ctx: JobContext, job_id: str) -> None:
    """A drain moves one VM at a time off a host: wait for the previous move to end, however it ended."""
    last = 0.0
    while not _finished(load_job(ctx.agent, job_id)):
        if time.monotonic() - last > 5:
            last = time.monotonic()
            ctx.progress(0.0, "waiting for the previous move off this host")
        await asyncio.sleep(0.5)


async def _wait_endpoint(ctx: JobContext, dest_job: str, target: str) -> IncomingEndpoint:
    ctx.progress(0.01, f"waiting for {target} to get ready")
    last = time.monotonic()
    while True:
        job = load_job(ctx.agent, dest_job)
        endpoint = parse(MigrateInParams, job.params).endpoint
        if endpoint and not _finished(job):  # a finished destination's endpoint is stale (its QEMU is gone)
            return IncomingEndpoint.model_validate(endpoint)
        if _finished(job):
            raise Conflict(
                f"host {target} cannot receive VM {ctx.target_name}: {job.error or job.state}",
                job.error_hint or f"see `corral job show {dest_job[:12]}`",
            )
        if time.monotonic() - last > 1.0:
            last = time.monotonic()
            ctx.progress(None)  # honours a cancel while the destination starts
        await asyncio.sleep(POLL)


async def _remove_local_disks(agent: Agent, vm_id: str) -> None:
    """After a storage move the disks live on the destination; these copies are nobody's any more."""
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            return
        for volume in vm.volumes:
            with contextlib.suppress(Exception):
                storage.remove(agent, volume)
        session.flush()
        with contextlib.suppress(Exception):
            storage.collect_bases(agent, session)


# -- drain -------------------------------------------------------------------------------------------------------


async def host_drain(ctx: JobContext) -> dict[str, Any]:
    """Follow the moves a drain wrote (one at a time), with progress; fail at the end if any VM stayed."""
    params = ctx.params_as(HostDrainParams)
    moves = params.vms
    moved: list[dict[str, Any]] = []
    failed: list[tuple[str, str | None]] = []
    for index, move in enumerate(moves):
        ctx.note(index / max(1, len(moves)), f"moving {move.vm} to {move.to} ({index + 1}/{len(moves)})")
        while not _finished(job := load_job(ctx.agent, move.job)):
            await asyncio.sleep(0.5)
        if job.state == JobState.SUCCEEDED:
            result = job.result or {}
            moved.append(
                {
                    "vm": move.vm,
                    "to": move.to,
                    "total_s": result.get("total_s"),
                    "downtime_ms": result.get("downtime_ms"),
                }
            )
        else:
            failed.append((move.vm, job.error or job.state))
    stayed = failed + [(left.vm, left.reason) for left in params.not_moved]
    if stayed:
        shown = "; ".join(f"{vm}: {why}" for vm, why in stayed[:5])
        raise Conflict(
            f"{len(moved)} of {len(moves) + len(params.not_moved)} VMs moved off "
            f"{ctx.target_name}; still there: {shown}",
            f"fix what is named, then `corral host drain {ctx.target_name}` again",
        )
    return {"moved": moved, "moved_stopped": [dump(left) for left in params.moved_stopped]}


# -- start-up sweep ----------------------------------------------------------------------------------------------


def reclaim_moved(agent: Agent) -> list[str]:
    """Kill local QEMUs of VMs that the store puts on another host: a source copy left paused after a move that
    completed while this agent was down, or a destination copy that never took over. Runs at start-up, before
    this host's interrupted jobs are marked failed (which the other half of a move waits for)."""
    _remove_moved_disks(agent)
    run_root = agent.layout.home / "run"
    if not run_root.is_dir():
        return []
    with agent.store.reading() as session:
        hosts = {vm_id: host for vm_id, host in session.execute(select(VM.id, VM.host))}
    killed = []
    for record_path in run_root.glob("*/runtime.json"):
        record = RuntimeRecord.load(record_path)
        if record is None:
            continue
        vm_id = record.uuid.replace("-", "")
        if vm_id not in hosts or hosts[vm_id] == agent.host_name:
            continue
        if is_same_process(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            log.warning(
                "VM %s runs on host %s: killed the stale copy here (pid %d)", record.name, hosts[vm_id], record.pid
            )
            killed.append(record.name)
        record_path.unlink(missing_ok=True)
        vm_lifecycle.remove_run_dir(agent, vm_id)
    return killed


def _remove_moved_disks(agent: Agent) -> list[str]:
    """The disk copies a storage move this agent was running when it died left here, once the store puts the VM
    on the other host: as a source whose destination committed (``vm_migrate`` would have removed them after the
    move), or as a destination that never took over (``incoming.abort()`` would have). Found through this host's
    move jobs still marked running (start-up, before they are marked failed); never on storage shared with the
    VM's host, where the files are the very ones the VM uses. Chaos rounds found the source's case
    (tests/chaos_harness.py, MigrationChaos)."""
    removed = []
    here = pool_identity(agent.layout.pool())
    with agent.store.session() as session:
        interrupted = session.scalars(
            select(Job).where(
                Job.host == agent.host_name,
                Job.state == JobState.RUNNING,
                Job.kind.in_((JobKind.VM_MIGRATE, JobKind.VM_MIGRATE_IN)),
            )
        )
        for job in list(interrupted):
            vm = session.get(VM, job.target_id) if job.target_id else None
            if vm is None or vm.host == agent.host_name or not parse(MoveParams, job.params).with_storage:
                continue
            there = session.scalars(select(Host).where(Host.name == vm.host)).first()
            if there is None or (there.usage or {}).get("pool_id") in (None, here):
                continue
            for volume in vm.volumes:
                with contextlib.suppress(Exception):
                    storage.remove(agent, volume)
            removed.append(vm.name)
            log.warning("VM %s moved to %s while this agent was down: removed its disk copies here", vm.name, vm.host)
        with contextlib.suppress(Exception):
            if removed:
                storage.collect_bases(agent, session)
    return removed
