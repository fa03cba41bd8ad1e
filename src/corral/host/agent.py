"""The host agent: claims jobs for this host, runs them through the engine, watches QEMU, reports back.

It runs on its own asyncio loop (in a thread of ``corral serve``, or alone as ``corral agent`` in a cluster) and
talks to the rest of corral only through the store. QEMU processes outlive it: on start it adopts every VM whose
runtime record still matches a live process, and a VM that died meanwhile is treated like any other crash.
On a PostgreSQL pool it also holds this host's HA lease and fences itself when it cannot renew it
(corral.host.lease, docs/ha.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from corral.config import Settings
from corral.errors import Conflict, CorralError
from corral.host.inventory import Inventory, bridges, read_inventory, read_usage
from corral.host.job_context import Handler, JobContext
from corral.host.layout import HostLayout
from corral.host.move_jobs import pool_identity, reclaim_moved
from corral.spec.names import NAME_PATTERN
from corral.spec.vm import PowerState
from corral.store import jobs
from corral.store.db import Store
from corral.store.models import VM, Host, Job, utcnow

if TYPE_CHECKING:
    from corral.host.vm_lifecycle import RunningVM

log = logging.getLogger("corral.agent")

HEARTBEAT_INTERVAL = 10.0
RECONCILE_INTERVAL = 2.0
# On a store of one process, networks are synced when the store changed and otherwise this often, for what changes
# outside it (a dnsmasq that died, a bridge or firewall table removed by hand).
NETWORK_CHECK = 10.0
# On such a store, a pass looks for queued jobs when the store changed since it last found none (a job is queued by
# a commit, which wakes the agent), and otherwise this often, as a safety net.
JOB_POLL = 10.0


def default_host_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return name if NAME_PATTERN.match(name) else "localhost"


def _quiet_qmp_teardown(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """qemu.qmp leaves an unretrieved EOFError behind when QEMU vanished under an open session; that is an
    expected end, not an error worth a traceback in the log."""
    if isinstance(context.get("exception"), EOFError):
        log.debug("QMP session ended: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


class Agent:
    def __init__(
        self, settings: Settings, store: Store, host_name: str | None = None, address: str | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.host_name = host_name or settings.host_name or default_host_name()
        # Where other hosts reach this one (migration streams); None on a single host.
        self.address = address
        self._registered = False
        # Beat often enough that one late heartbeat does not make the host look unreachable.
        self.heartbeat_interval = min(HEARTBEAT_INTERVAL, settings.host_timeout / 3)
        self.layout = HostLayout(settings.home)
        self.inventory: Inventory | None = None
        from corral.host.isolation import Isolation

        self.isolation = Isolation(settings, store)
        from corral.host.networks import NetworkHost

        self.networks = NetworkHost(settings, store, self.host_name)
        self._networks_synced = float("-inf")  # when the reconcile pass last synced them (monotonic)
        self._networks_generation = -1  # the store's notifier generation then
        self._jobs_polled = float("-inf")  # when a pass last looked for queued jobs, and the generation then
        self._jobs_generation = -1
        self.vms: dict[str, RunningVM] = {}
        self.unadopted: set[str] = set()  # VMs whose QEMU lives but did not answer at adoption: retried
        from corral.host.reaper import Reaper

        self.reaper = Reaper()
        self.vm_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.guest_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._job_tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        from corral.host.handlers import build_handlers

        self.handlers: dict[str, Handler] = build_handlers()
        from corral.host.lease import Lease

        # HA lease and self-fence (PostgreSQL pools only; corral.host.lease).
        self.lease = Lease(self, self._fenceable)

    # -- running in a thread of the daemon -------------------------------------------------------------------

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="corral-agent", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.run())
        except BaseException as exc:  # surfaced to start_in_thread when it happens during start-up
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("agent stopped with an error")

    def stop_thread(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Thread-safe: something changed in the store (a job was queued, say)."""
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    # -- main loop --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_quiet_qmp_teardown)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.layout.ensure()
        self.register()
        # Before anything may start a VM: the watchdog covers start-up too (corral.host.lease).
        self.lease.acquire()
        self.lease.start()
        # Before failing this host's interrupted jobs: the other half of a move waits for exactly that.
        for name in reclaim_moved(self):
            log.warning("VM %s had moved to another host while this agent was down", name)
        interrupted = jobs.fail_orphans(self.store, self.host_name)
        if interrupted:
            log.warning("marked %d job(s) failed: the agent restarted while they ran", len(interrupted))
        from corral.host import recovery
        from corral.host.orphans import settle_unrecorded

        await settle_unrecorded(self)
        wanting = recovery.wanting_to_run(self)
        await self.adopt_all()
        recovery.settle_interrupted_creates(self, interrupted)
        recovery.settle_unrun(self, wanting)
        recovery.settle_unstopped(self, interrupted)
        await self.sync_networks()
        self.store.notifier.subscribe(self.wake)
        self._started.set()
        last_heartbeat = last_reconcile = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            # One failing pass (a database hiccup, a guest that vanished mid-call) must not end the agent.
            try:
                if self.lease.taken_over or self.lease.killed:
                    await self._after_fence()
                if self.lease.valid():  # a fenced host claims nothing: it may not start anything
                    self._dispatch_jobs()
                if now - last_reconcile >= RECONCILE_INTERVAL:
                    last_reconcile = now
                    await self.reconcile()
                if now - last_heartbeat >= self.heartbeat_interval:
                    last_heartbeat = now
                    self.heartbeat()
            except Exception:
                log.exception("agent pass failed; carrying on")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_wait(last_reconcile))
        await self._shutdown()

    def _idle_wait(self, last_reconcile: float) -> float:
        """How long the loop sleeps when nothing wakes it. A shared store's notifications cross a connection that
        can drop (then only this poll finds new jobs): a second. One process's notifier never loses a wake-up, so
        the loop sleeps until the next reconcile pass is due: half the idle passes (and job queries)."""
        if self.store.shared:
            return 1.0
        return min(RECONCILE_INTERVAL, max(0.05, last_reconcile + RECONCILE_INTERVAL - time.monotonic()))

    async def _shutdown(self) -> None:
        """Let running jobs end briefly, then let go of QEMU processes without stopping them."""
        self.lease.release()
        if self._job_tasks:
            await asyncio.wait(list(self._job_tasks.values()), timeout=5.0)
        for task in self._job_tasks.values():
            task.cancel()
        for running in list(self.vms.values()):
            for task in running.tasks:
                task.cancel()
            await running.proc.close()
        self.vms.clear()
        # Placement stops choosing this host at once, rather than after the heartbeat timeout.
        with contextlib.suppress(Exception), self.store.session() as session:
            host = session.scalars(select(Host).where(Host.name == self.host_name)).first()
            if host is not None:
                host.state = "offline"

    def register(self) -> None:
        """Record this host's inventory; QEMU's version is asked once (a subprocess), storage every time."""
        from corral.host.backup_jobs import store_identity

        inventory = read_inventory(
            self.layout.pool(),
            self.settings.accel,
            self.settings.qemu_binary,
            qemu=self.inventory.qemu_version if self.inventory else None,
        )
        self.inventory = inventory
        with self.store.session() as session:
            host = session.scalars(select(Host).where(Host.name == self.host_name)).first()
            if host is None:
                host = Host(name=self.host_name)
                session.add(host)
            elif not self._registered:
                self._refuse_a_live_namesake(host)
            state = host.state
            for key, value in self.inventory.model_dump().items():
                setattr(host, key, value)
            host.cpu_overcommit = self.settings.cpu_overcommit
            host.memory_overcommit = self.settings.memory_overcommit
            host.reserved_memory = self.settings.reserved_host_memory
            # A host taken over stays "dead" until this agent learned it (its lease renewal) and rejoined; one whose
            # lease expired stays "fenced" until a renewal (corral.host.lease), not until any heartbeat.
            if (self.lease.epoch is None or host.epoch == self.lease.epoch) and host.state != "fenced":
                host.state = "online"
            host.storage_overcommit = self.settings.storage_overcommit
            # pool_id: hosts that report the same one share their storage pool (corral.cluster.moves).
            # bridges: bridge-mode networks are placed only where their uplink is (corral.cluster.placement).
            host.usage = {
                **read_usage(self.layout.pool()),
                "pool_id": pool_identity(self.layout.pool()),
                "bridges": bridges(),
                "networking": self.networks.enabled,
                "overlays": self.networks.overlay_states(),  # network id: this host's part ("joined", "error")
                "backup_store": store_identity(self),
            }
            if self.address is not None:
                host.address = self.address
            host.heartbeat_at = utcnow()
            # A heartbeat that changes no state wakes nobody: nothing waits for one (the control plane reads the
            # heartbeats when it checks them), and on a pool the wake-up would reach every agent.
            session.info["notify"] = not self._registered or host.state != state

        self._registered = True

    def _refuse_a_live_namesake(self, host: Host) -> None:
        """Two agents under one name would take each other's jobs: a second one at another address is refused
        while the first still beats (a restarted agent at the same address simply takes over)."""
        fresh = host.state == "online" and host.heartbeat_at >= utcnow() - timedelta(seconds=self.settings.host_timeout)
        if fresh and self.address and host.address and host.address != self.address:
            raise Conflict(
                f"host {self.host_name} is already registered from {host.address} and its agent is alive",
                "give this agent another --name, or stop the other one first",
            )

    def heartbeat(self) -> None:
        self.register()

    def _dispatch_jobs(self) -> None:
        """Claim and start every queued job for this host. On one process's store, only when the store changed since
        the last look (or JOB_POLL seconds passed): an idle pass asks nothing. A shared store is asked every pass (its
        notifications can be lost with their connection)."""
        now, generation = time.monotonic(), self.store.notifier.generation
        if not self.store.shared and generation == self._jobs_generation and now - self._jobs_polled < JOB_POLL:
            return
        while True:
            job = jobs.claim(self.store, self.host_name, exclude=set(self._job_tasks))
            if job is None:
                break
            task = asyncio.get_running_loop().create_task(self._run_job(job))
            self._job_tasks[job.id] = task
        # The generation read before the queries: a job queued while they ran changed it again, so it is not missed.
        self._jobs_polled, self._jobs_generation = now, generation

    async def _run_job(self, job: Job) -> None:
        ctx = JobContext(self, job.id, job.kind, job.target_id, job.target_name, dict(job.params), job.project)
        handler = self.handlers.get(job.kind)
        try:
            if handler is None:
                raise CorralError(f"this agent cannot run {job.kind} jobs", "upgrade the agent")
            result = await handler(ctx)
        except asyncio.CancelledError:
            jobs.finish(self.store, job.id, error=CorralError("the agent stopped while this job ran"))
            raise
        except Exception as exc:
            if not isinstance(exc, CorralError):
                log.exception("job %s (%s) failed", job.id, job.kind)
            await self._record_finish(job.id, error=exc)
        else:
            await self._record_finish(job.id, result=result)
        finally:
            self._job_tasks.pop(job.id, None)

    async def _record_finish(self, job_id: str, **outcome: Any) -> None:
        """A job's end must reach the store even if it is briefly unwritable (a full disk, a locked database):
        a job left "running" forever would block its VM."""
        for attempt in range(30):
            try:
                jobs.finish(self.store, job_id, **outcome)
                return
            except Exception:
                log.exception("cannot record the end of job %s (attempt %d)", job_id, attempt + 1)
                await asyncio.sleep(min(10.0, 0.5 * (attempt + 1)))

    # -- HA fencing (corral.host.lease) -----------------------------------------------------------------------

    def _fenceable(self) -> list[tuple[str, int, Callable[[], None]]]:
        """For the watchdog thread: every QEMU this agent runs, and how to mark its exit as expected."""
        return [
            (vm_id, running.proc.pid, functools.partial(setattr, running, "expected_exit", True))
            for vm_id, running in list(self.vms.items())
            if running.proc.pid and not running.proc.exited
        ]

    async def _after_fence(self) -> None:
        """Once the store answers again after a fence. Taken over (a newer epoch): drop the stale copies, whose
        VMs run elsewhere now, and rejoin under the new epoch; VMs still recorded here (non-HA ones, lost) are
        reported running again if their QEMU lives. Not taken over: restart the HA VMs the fence killed."""
        from corral.host import vm_lifecycle
        from corral.host.lease import fence_event

        if not self.lease.taken_over and not self.lease.valid():
            return  # still fenced: nothing can be decided without the store
        killed = set(self.lease.killed)
        for vm_id in killed:
            running = self.vms.get(vm_id)
            if running is not None:
                await running.proc.wait()
                await vm_lifecycle.forget(self, running)
        if self.lease.taken_over:
            moved = reclaim_moved(self)
            with self.store.session() as session:
                here = set(session.scalars(select(VM.id).where(VM.host == self.host_name)))
            for vm_id, running in list(self.vms.items()):
                if vm_id not in here:
                    await vm_lifecycle.forget(self, running)
            self.lease.acquire()
            self.lease.killed.difference_update(killed)
            with self.store.session() as session:
                host = session.scalars(select(Host).where(Host.name == self.host_name)).one()
                host.state = "online"
                session.add(fence_event(self.host_name, len(killed), self.lease.epoch))
                for vm in session.scalars(select(VM).where(VM.host == self.host_name)):
                    if vm.id in self.vms and not self.vms[vm.id].proc.exited:
                        vm.observed_state = PowerState.RUNNING
                        vm.pid = self.vms[vm.id].proc.pid
                        vm.status_message = "its host is back: it never stopped"
            log.warning(
                "host %s rejoined under epoch %s after a takeover; dropped %d stale copies",
                self.host_name,
                self.lease.epoch,
                len(moved) + len(killed),
            )
            restart = [vm_id for vm_id in killed if vm_id in here]
        else:
            with self.store.session() as session:
                session.add(fence_event(self.host_name, len(killed), self.lease.epoch))
            self.lease.killed.difference_update(killed)
            restart = list(killed)
        for vm_id in restart:
            try:
                async with self.vm_locks[vm_id]:
                    with self.store.reading() as session:
                        fenced = session.get(VM, vm_id)
                        if (
                            fenced is None
                            or fenced.host != self.host_name
                            or fenced.desired_state == PowerState.STOPPED
                        ):
                            continue
                    vm_lifecycle.update_vm(
                        self,
                        vm_id,
                        observed_state=PowerState.CRASHED,
                        status_message="fenced: its host could not renew its HA lease",
                    )
                    await vm_lifecycle.start(self, vm_id)
                    vm_lifecycle.update_vm(self, vm_id, status_message="restarted after its host's fence")
            except Exception:
                log.exception("cannot restart VM %s after the fence", vm_id)

    # -- VMs --------------------------------------------------------------------------------------------------

    async def adopt_all(self) -> None:
        from corral.host import vm_lifecycle

        with self.store.session() as session:
            vm_ids = list(session.scalars(select(VM.id).where(VM.host == self.host_name)))
        for vm_id in vm_ids:
            try:
                await vm_lifecycle.adopt(self, vm_id)
            except Exception:  # one VM's trouble must not keep the agent from serving the others
                log.exception("cannot adopt VM %s", vm_id)

    async def sync_networks(self) -> None:
        """Bridges, DHCP servers and firewall rules as the store says; a failure is logged, never fatal."""
        try:
            await asyncio.to_thread(self.networks.sync)
        except Exception:
            log.exception("network reconcile failed")

    def _networks_due(self) -> bool:
        """Whether this reconcile pass syncs the networks. A shared store: every pass (its notifications cross a
        connection that can drop, and other hosts' rows matter). One process's store: when it changed since the
        last sync (its notifier never loses a change; the jobs that change networks sync them themselves as well),
        else every NETWORK_CHECK seconds for what changes outside the store. With nothing changed, five queries
        (and a subprocess per network) every 2 s were most of a sync's cost."""
        now, generation = time.monotonic(), self.store.notifier.generation
        if self.store.shared or generation != self._networks_generation or now - self._networks_synced >= NETWORK_CHECK:
            self._networks_synced, self._networks_generation = now, generation
            return True
        return False

    async def reconcile(self) -> None:
        """Drift repair and slow observations: interface addresses of ready guests."""
        from corral.host import autoballoon, observe, vm_lifecycle

        await vm_lifecycle.reconcile(self)
        if self._networks_due():
            await self.sync_networks()
        await observe.sample_all(self)
        await autoballoon.tick(self)  # its own interval (balloon_interval); docs/optimization.md
        self.reaper.reap(keep={running.proc.pid for running in self.vms.values()})
