"""Starting, stopping and watching VM processes on this host, and what happens when one dies.

Every transition writes the VM's observed state to the store. An exit nobody asked for is a crash or a guest
power-off; the restart policy decides what follows, with a growing back-off so a VM that dies at boot does not
spin the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral.engine import snapshots as engine_snapshots
from corral.engine.argv import UEFI_VARS_NODE
from corral.engine.guest_agent import GuestAgent, wait_until_ready
from corral.engine.plan import LaunchPlan
from corral.engine.process import ExitInfo, QemuProcess
from corral.engine.runtime import RuntimeRecord, is_same_process
from corral.errors import Conflict, CorralError, EngineError, GuestAgentError, NotFound
from corral.host import storage
from corral.host.launch_settings import apply_launch_settings
from corral.host.vm_nics import plug_taps, unplug_taps
from corral.host.vm_plan import build_plan, image_details
from corral.spec.vm import PowerState, RestartPolicy, VMSpec
from corral.store.models import VM, Snapshot, utcnow

if TYPE_CHECKING:
    from corral.host.agent import Agent
    from corral.host.job_context import JobContext

log = logging.getLogger("corral.agent")

READY_TIMEOUT = 300.0
MAX_BACKOFF = 60.0
ADDRESS_REFRESH = 15.0
# How long readiness waits for the guest's first list of addresses (one guest agent round trip, 10-40 ms under
# TCG): `vm run --wait` then prints how to reach the guest without polling for it; a slower guest is ready first.
ADDRESSES_WITH_READY = 1.0
STABLE_RUN = 60.0  # a VM that ran this long before dying starts its back-off afresh
_background: set[asyncio.Task[None]] = set()


def update_vm(agent: Agent, vm_id: str, **values: Any) -> None:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            return
        for key, value in values.items():
            setattr(vm, key, value)
    agent.store.notifier.notify()


def load_vm(agent: Agent, vm_id: str) -> VM:
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} no longer exists")
        vm.volumes  # noqa: B018 - load the relationship before the session closes
        return vm


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def event_handler(agent: Agent, vm_id: str) -> Any:
    def on_event(name: str, _data: dict[str, Any]) -> None:
        if name == "STOP":
            update_vm(agent, vm_id, observed_state=PowerState.PAUSED)
        elif name == "RESUME":
            update_vm(agent, vm_id, observed_state=PowerState.RUNNING)

    return on_event


@dataclass
class RunningVM:
    """A QEMU process this agent watches, with the futures and flags that tie it to its VM row."""

    vm_id: str
    proc: QemuProcess
    ready: asyncio.Future[None]
    expected_exit: bool = False
    interfaces_checked: float = 0.0
    # The addresses last written to the VM's row by this agent: a refresh that finds the same ones (nearly all of
    # them) needs no transaction.
    interfaces_written: list[dict[str, Any]] | None = None
    stats_sampled: float = 0.0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def track(agent: Agent, vm_id: str, proc: QemuProcess) -> RunningVM:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception was never retrieved"
    running = RunningVM(vm_id=vm_id, proc=proc, ready=ready)
    agent.vms[vm_id] = running
    loop = asyncio.get_running_loop()
    for watcher in (_watch_ready(agent, running), _watch_exit(agent, running)):
        task = loop.create_task(watcher)
        task.add_done_callback(_log_failure)
        running.tasks.append(task)
    return running


def _log_failure(task: asyncio.Task[Any]) -> None:
    """Background tasks have no caller to raise to: their errors go to the log, never silently away."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


async def launch(agent: Agent, vm_id: str, plan: LaunchPlan, after_launch: Any = None) -> RunningVM:
    """Start QEMU for a plan and watch it. ``after_launch(proc)`` runs before the watchers start (a fork's
    child takes its state there); if it fails, the process is killed and the VM left stopped."""
    update_vm(
        agent,
        vm_id,
        desired_state=PowerState.RUNNING,
        observed_state=PowerState.STARTING,
        status_message="starting QEMU",
    )
    try:
        box = await asyncio.to_thread(agent.isolation.prepare, vm_id, plan)
        await asyncio.to_thread(plug_taps, agent, vm_id, plan)
        if box.extra_args:
            plan = plan.model_copy(update={"extra_args": (*plan.extra_args, *box.extra_args)})
        proc = await QemuProcess.launch(plan, on_event=event_handler(agent, vm_id), preexec=box.preexec)
        try:
            await apply_launch_settings(proc, plan, VMSpec.model_validate(load_vm(agent, vm_id).spec))
        except BaseException:
            await proc.kill()
            raise
        if after_launch is not None:
            try:
                await after_launch(proc)
            except BaseException:
                await proc.kill()
                raise
    except Exception as exc:
        update_vm(
            agent,
            vm_id,
            desired_state=PowerState.STOPPED,
            observed_state=PowerState.STOPPED,
            status_message=f"start failed: {exc}",
            pid=None,
        )
        agent.isolation.release(vm_id)
        await asyncio.to_thread(unplug_taps, agent, vm_id)
        raise
    running = track(agent, vm_id, proc)
    update_vm(
        agent,
        vm_id,
        observed_state=PowerState.RUNNING,
        pid=proc.pid,
        started_at=utcnow(),
        ready=False,
        interfaces=[],
        status_message="booting",
    )
    return running


async def start(
    agent: Agent, vm_id: str, wait: bool = False, progress: Any = None, loadvm: str | None = None
) -> dict[str, Any]:
    """Launch the VM's QEMU (idempotent: a running VM is left as it is) and optionally wait for its agent.
    ``loadvm`` starts it from an internal snapshot instead of booting."""
    running = agent.vms.get(vm_id)
    if running is None or running.proc.exited:
        vm = load_vm(agent, vm_id)
        if image_details(agent, vm).get("ssh"):
            vm.ports = {**vm.ports, "ssh": free_port()}
            update_vm(agent, vm_id, ports=vm.ports)
        plan = build_plan(agent, vm)
        after_launch = None
        if loadvm and plan.uefi is not None:
            plan, after_launch = _paused_for_snapshot(plan, loadvm)
        elif loadvm:
            plan = plan.model_copy(update={"loadvm": loadvm})
        running = await launch(agent, vm_id, plan, after_launch)
    elif await running.proc.run_state() == "paused":
        await running.proc.resume()
    if wait:
        if progress is not None:
            progress(0.5, "waiting for the guest agent")
        await asyncio.shield(running.ready)
    return {"pid": running.proc.pid}


def _paused_for_snapshot(plan: LaunchPlan, tag: str) -> tuple[LaunchPlan, Any]:
    """How a UEFI VM starts from a snapshot. -loadvm takes the RAM from the first snapshot-capable block node,
    and the firmware's flash comes before every disk, so it would look in the variable store and find a
    "disk-only snapshot". Instead QEMU starts paused (-S), the snapshot is loaded naming disk0 for the RAM, and
    the VM runs on from there."""
    nodes = [disk.node for disk in plan.disks if disk.format == "qcow2" and not disk.read_only] + [UEFI_VARS_NODE]

    async def load(proc: QemuProcess) -> None:
        await engine_snapshots.load_live(proc, tag, nodes)
        await proc.resume()

    return plan.model_copy(update={"extra_args": (*plan.extra_args, "-S")}), load


async def stop(
    agent: Agent, vm_id: str, force: bool = False, timeout: float | None = None, progress: Any = None
) -> dict[str, Any]:
    """ACPI power-down, then force after ``timeout``; the VM's desired state becomes stopped either way."""
    update_vm(agent, vm_id, desired_state=PowerState.STOPPED)
    running = agent.vms.get(vm_id)
    if running is None and vm_id in agent.unadopted:
        if not force:
            raise Conflict("this VM's QEMU runs but its monitor does not answer", "stop it with --force")
        _kill_unadopted(agent, vm_id)
    if running is None or running.proc.exited:
        update_vm(agent, vm_id, observed_state=PowerState.STOPPED, pid=None, ready=False)
        return {"forced": False, "was_running": False}
    running.expected_exit = True
    update_vm(agent, vm_id, observed_state=PowerState.STOPPING, status_message="stopping")
    forced = force
    if force:
        info = await running.proc.quit()
    else:
        timeout = timeout if timeout is not None else agent.settings.stop_timeout
        with contextlib.suppress(EngineError):
            if await running.proc.run_state() == "paused":
                await running.proc.resume()
        try:
            how = await _ask_guest_to_power_off(agent, running)
            if progress is not None:
                progress(0.3, f"{how}; waiting for the guest")
            info = await running.proc.wait(timeout)
        except (TimeoutError, EngineError):
            forced = True
            if progress is not None:
                progress(0.8, f"the guest did not power off within {timeout:.0f} s; forcing")
            info = await running.proc.quit()
    await untrack(agent, running)
    update_vm(
        agent,
        vm_id,
        observed_state=PowerState.STOPPED,
        pid=None,
        ready=False,
        interfaces=[],
        status_message="forced off" if forced else "",
        last_exit=info.model_dump(),
    )
    return {"forced": forced, "was_running": True}


def _kill_unadopted(agent: Agent, vm_id: str) -> None:
    """The last resort for a QEMU that runs but never answered: SIGKILL the recorded process."""
    record_path = agent.layout.vm_run_dir(vm_id) / "runtime.json"
    record = RuntimeRecord.load(record_path)
    if record is not None and is_same_process(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
    record_path.unlink(missing_ok=True)
    agent.unadopted.discard(vm_id)


async def _ask_guest_to_power_off(agent: Agent, running: RunningVM) -> str:
    """Through the guest agent when it answers (a clean OS shutdown that keeps, e.g., fresh SSH host keys),
    else the ACPI power button."""
    socket_path = running.proc.record.guest_agent_socket
    busy = agent.guest_locks[running.vm_id].locked()  # a long `vm exec` must not hold up a stop
    if socket_path is not None and not busy and running.ready.done() and running.ready.exception() is None:
        try:
            async with agent.guest_locks[running.vm_id], GuestAgent(socket_path) as guest:
                await guest.shutdown("powerdown")
            return "shutdown asked of the guest agent"
        except (GuestAgentError, TimeoutError, OSError):
            pass
    await running.proc.powerdown()
    return "ACPI power-down sent"


async def untrack(agent: Agent, running: RunningVM) -> None:
    """Drop the process from the agent, letting its watcher tasks end."""
    for task in running.tasks:
        if task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    await _clean_up_after(agent, running)


async def _clean_up_after(agent: Agent, running: RunningVM) -> bool:
    """Remove what belonged to this process (record, RAM file, cgroup) — unless a newer QEMU of the same VM has
    taken its place meanwhile, whose things these now are. Returns whether it was still the current one."""
    if agent.vms.get(running.vm_id) is not running:
        return False
    del agent.vms[running.vm_id]
    running.proc.record.qmp_socket.parent.joinpath("runtime.json").unlink(missing_ok=True)
    agent.layout.ram_file(running.vm_id).unlink(missing_ok=True)
    await asyncio.to_thread(agent.isolation.release, running.vm_id)
    await asyncio.to_thread(unplug_taps, agent, running.vm_id)
    return True


async def pause(agent: Agent, vm_id: str) -> None:
    running = _require_running(agent, vm_id)
    await running.proc.pause()
    update_vm(agent, vm_id, desired_state=PowerState.PAUSED, observed_state=PowerState.PAUSED)


async def resume(agent: Agent, vm_id: str) -> None:
    running = _require_running(agent, vm_id)
    await running.proc.resume()
    update_vm(agent, vm_id, desired_state=PowerState.RUNNING, observed_state=PowerState.RUNNING)


def _require_running(agent: Agent, vm_id: str) -> RunningVM:
    running = agent.vms.get(vm_id)
    if running is None or running.proc.exited:
        raise Conflict("the VM is not running", "start it with `corral vm start`")
    return running


def remove_run_dir(agent: Agent, vm_id: str) -> None:
    """The VM left this host (deleted, discarded, moved away): its run directory and RAM file go, and so does
    its machine-wide uid claim with the read grants it had, so a VM given that uid later inherits nothing."""
    shutil.rmtree(agent.layout.vm_run_dir(vm_id), ignore_errors=True)
    agent.layout.ram_file(vm_id).unlink(missing_ok=True)
    agent.isolation.forget(vm_id)


# -- watchers ---------------------------------------------------------------------------------------------------


async def _watch_ready(agent: Agent, running: RunningVM) -> None:
    socket_path = running.proc.record.guest_agent_socket
    try:
        if socket_path is None:
            raise GuestAgentError("this VM has no guest agent channel")
        await wait_until_ready(socket_path, READY_TIMEOUT, is_alive=lambda: not running.proc.exited)
        running.interfaces_checked = time.monotonic()
        try:
            interfaces = await asyncio.wait_for(_interfaces(agent, running), ADDRESSES_WITH_READY)
        except TimeoutError:
            interfaces = None
        if interfaces is not None:  # ready and reachable in one write: the job ends with the addresses known
            running.interfaces_written = interfaces
            update_vm(agent, running.vm_id, ready=True, status_message="", interfaces=interfaces)
        else:
            update_vm(agent, running.vm_id, ready=True, status_message="")
        if not running.ready.done():
            running.ready.set_result(None)
        if interfaces is None:
            running.interfaces_written = await _interfaces(agent, running)
            update_vm(agent, running.vm_id, interfaces=running.interfaces_written)
    except asyncio.CancelledError:
        if not running.ready.done():
            running.ready.set_exception(GuestAgentError("the VM stopped before its guest agent answered"))
        raise
    except Exception as exc:
        if not running.ready.done():
            running.ready.set_exception(exc)


async def _interfaces(agent: Agent, running: RunningVM) -> list[dict[str, Any]]:
    socket_path = running.proc.record.guest_agent_socket
    if socket_path is None:
        return []
    async with agent.guest_locks[running.vm_id]:
        try:
            async with GuestAgent(socket_path) as guest:
                return await guest.addresses()
        except (CorralError, TimeoutError, OSError):
            return []


async def _watch_exit(agent: Agent, running: RunningVM) -> None:
    info = await running.proc.wait()
    if not running.ready.done():
        running.ready.set_exception(GuestAgentError(f"{info.describe()} before the guest agent answered"))
    if running.expected_exit:
        return
    await _on_unexpected_exit(agent, running, info)


async def _on_unexpected_exit(agent: Agent, running: RunningVM, info: ExitInfo) -> None:
    async with agent.vm_locks[running.vm_id]:
        if await _clean_up_after(agent, running):
            await _after_exit(agent, running.vm_id, info)


async def _after_exit(agent: Agent, vm_id: str, info: ExitInfo) -> None:
    """Record why a VM ended on its own and apply its restart policy."""
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            return
        policy = RestartPolicy(VMSpec.model_validate(vm.spec).restart_policy)
        ran_for = (utcnow() - vm.started_at).total_seconds() if vm.started_at else 0.0
        restart_count = vm.restart_count
        desired = vm.desired_state
    crashed = info.crashed
    state = PowerState.CRASHED if crashed else PowerState.STOPPED
    message = info.describe() if crashed else "the guest powered off"
    restart = desired != PowerState.STOPPED and (
        policy == RestartPolicy.ALWAYS or (policy == RestartPolicy.ON_FAILURE and crashed)
    )
    update_vm(
        agent,
        vm_id,
        observed_state=state,
        pid=None,
        ready=False,
        interfaces=[],
        status_message=message,
        last_exit=info.model_dump(),
        desired_state=PowerState.RUNNING if restart else PowerState.STOPPED,
    )
    log.warning("VM %s: %s", vm_id, message)
    if not restart:
        return
    attempts = 0 if ran_for >= STABLE_RUN else restart_count
    delay = min(MAX_BACKOFF, 0.5 * (2**attempts)) if attempts else 0.0
    task = asyncio.get_running_loop().create_task(_restart_later(agent, vm_id, delay, restart_count + 1, message))
    _background.add(task)
    task.add_done_callback(_background.discard)
    task.add_done_callback(_log_failure)


async def _restart_later(agent: Agent, vm_id: str, delay: float, count: int, reason: str) -> None:
    await asyncio.sleep(delay)
    async with agent.vm_locks[vm_id]:
        with agent.store.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None or vm.desired_state == PowerState.STOPPED or vm_id in agent.vms:
                return
        update_vm(agent, vm_id, restart_count=count)
        try:
            await start(agent, vm_id)
            update_vm(agent, vm_id, status_message=f"restarted by policy after: {reason}")
        except Exception as exc:
            log.error("VM %s: restart failed: %s", vm_id, exc)


# -- adoption and reconcile -------------------------------------------------------------------------------------


async def adopt(agent: Agent, vm_id: str) -> None:
    """Re-attach to a VM's QEMU after an agent restart, or record that it died while no one watched."""
    record_path = agent.layout.vm_run_dir(vm_id) / "runtime.json"
    async with agent.vm_locks[vm_id]:
        proc = None
        if record_path.exists():
            try:
                proc = await QemuProcess.adopt(record_path, on_event=event_handler(agent, vm_id))
                state = await proc.run_state() if proc is not None else None
            except EngineError as exc:
                # Alive but not answering (a busy host, a stuck QEMU): never mistake it for dead.
                log.error("VM %s: cannot adopt its QEMU yet: %s", vm_id, exc)
                if proc is not None:
                    await proc.close()
                agent.unadopted.add(vm_id)
                update_vm(agent, vm_id, status_message=f"QEMU runs but does not answer; retrying: {exc.message}")
                return
        agent.unadopted.discard(vm_id)
        if proc is not None:
            track(agent, vm_id, proc)
            update_vm(
                agent,
                vm_id,
                pid=proc.pid,
                observed_state=PowerState.PAUSED if state == "paused" else PowerState.RUNNING,
            )
            return
        vm = load_vm(agent, vm_id)
        if vm.observed_state in (PowerState.RUNNING, PowerState.PAUSED, PowerState.STARTING, PowerState.STOPPING):
            await _after_exit_unseen(agent, vm_id, vm)


async def _after_exit_unseen(agent: Agent, vm_id: str, vm: VM) -> None:
    if vm.observed_state == PowerState.STOPPING:
        update_vm(agent, vm_id, observed_state=PowerState.STOPPED, pid=None, ready=False)
        return
    info = ExitInfo(returncode=None, shutdown_reason="host-error")
    await _after_exit(agent, vm_id, info)
    update_vm(agent, vm_id, status_message="QEMU ended while the agent was not running")


async def reconcile(agent: Agent) -> None:
    """Retry adopting QEMUs that did not answer; refresh the addresses of ready guests (DHCP may change them)."""
    for vm_id in list(agent.unadopted):
        if not agent.vm_locks[vm_id].locked():
            try:
                await adopt(agent, vm_id)
            except NotFound:
                agent.unadopted.discard(vm_id)
    now = time.monotonic()
    for vm_id, running in list(agent.vms.items()):
        if running.proc.exited or not running.ready.done() or running.ready.exception() is not None:
            continue
        if agent.guest_locks[vm_id].locked() or now - running.interfaces_checked < ADDRESS_REFRESH:
            continue
        running.interfaces_checked = now
        interfaces = await _interfaces(agent, running)
        if interfaces and interfaces != running.interfaces_written:  # the same as last time: no transaction
            with agent.store.session() as session:
                vm = session.get(VM, vm_id)
                changed = False
                if vm is not None and vm.interfaces != interfaces:
                    vm.interfaces = interfaces
                    changed = True
            running.interfaces_written = interfaces
            if changed:
                agent.store.notifier.notify()


async def wait_ready(running: RunningVM, timeout: float) -> None:
    """Wait until the guest agent has answered once (an exec right after start must not race the boot)."""
    try:
        await asyncio.wait_for(asyncio.shield(running.ready), timeout)
    except TimeoutError as exc:
        raise GuestAgentError(f"the guest agent did not answer within {timeout:.0f} s") from exc


async def forget(agent: Agent, running: RunningVM) -> None:
    """Drop a process the agent no longer owns (a fenced or stale copy: corral.host.lease) without writing its VM
    row, which may belong to another host by now."""
    running.expected_exit = True
    await untrack(agent, running)


async def wait_for_guest(ctx: JobContext, vm_id: str, ready_timeout: float | None = None) -> None:
    """Wait for the guest agent outside the VM's lock, so a `vm stop` can still end a boot that hangs; for
    ``ready_timeout`` seconds (the job's own, if its kind has one), else READY_TIMEOUT."""
    running = ctx.agent.vms.get(vm_id)
    if running is None or running.proc.exited:
        raise Conflict(
            f"VM {ctx.target_name} stopped before its guest agent answered",
            f"see `corral vm show {ctx.target_name}` and `corral vm logs {ctx.target_name}`",
        )
    ctx.progress(0.5, "waiting for the guest agent")
    await wait_ready(running, float(ready_timeout or READY_TIMEOUT))


async def discard_vm(ctx: JobContext, vm_id: str, made_ids: set[str]) -> None:
    """Undo a job that made a VM: its process, the volume files this job made, its rows and run directory."""
    agent = ctx.agent
    running = agent.vms.get(vm_id)
    if running is not None:
        running.expected_exit = True
        with contextlib.suppress(Exception):
            await running.proc.kill()
        await untrack(agent, running)
    with agent.store.session() as session:
        vm = session.get(VM, vm_id)
        if vm is None:
            return
        for volume in list(vm.volumes):
            if volume.state == "pending" or volume.id in made_ids:
                if volume.id in made_ids:  # only files this job made: a pending volume's path may hold another's
                    storage.remove(agent, volume)
                session.delete(volume)
            else:
                volume.vm_id = None
        session.query(Snapshot).filter(Snapshot.vm_id == vm.id).delete()
        session.delete(vm)
    remove_run_dir(agent, vm_id)
    agent.store.notifier.notify()
