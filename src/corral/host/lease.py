"""This host's HA lease and its self-fence (docs/ha.md).

On a PostgreSQL pool each agent holds a lease in its host row: ``lease_expires_at``, set by the **database
clock** (``now() + lease_time``) so that no two machines' clocks are ever compared, and ``epoch``, which the
control plane bumps when it takes the host over (corral.cluster.ha). Two threads, both independent of the agent's
event loop so a stuck loop or a hanging store cannot keep them from acting:

- the **renewer** renews every ``lease_time / 5`` s, under the epoch it holds. A renewal that finds another epoch
  means the host was taken over while this agent could not reach the store: its VMs run elsewhere now.
- the **watchdog** never touches the store. It keeps a local deadline, ``lease_time * 0.8`` after the *start* of
  the last successful renewal (the database's expiry is at least ``lease_time`` after that instant, so the
  deadline always falls before it). Past it, the host is fenced: every QEMU this agent runs that is not known to be
  a non-HA VM is killed with SIGKILL, again on every tick while fenced, and the agent claims no job. The control
  plane restarts HA VMs elsewhere only after expiry plus a margin, so the copy here is dead first.

The watchdog dies with the agent; the **fencer** (corral.host.fencer), a process of its own session that this lease
starts and tells each renewal's deadline (``run/fencer.json``), fences at ``0.9 x lease_time`` even when the agent
was killed alone.

Once renewals succeed again under the same epoch (a store outage shorter than the takeover), the fence lifts and
the agent restarts the HA VMs it killed itself. Under a new epoch it drops its stale copies instead and rejoins
(corral.host.agent). On SQLite (one host) there is no lease and nothing here runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import case, func, select, update

from corral.spec.vm import VMSpec
from corral.store.models import VM, Event, Host

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

    from corral.host.agent import Agent

log = logging.getLogger("corral.agent")

FENCE_FRACTION = 0.8  # of the lease time: the watchdog's deadline after the start of the last good renewal
RENEW_FRACTION = 0.2  # of the lease time: how often the renewer renews
TICK = 0.1  # the watchdog's period, seconds


def deadline_after(renewal_started: float, lease_time: float) -> float:
    """The local monotonic instant past which this host must consider itself fenced."""
    return renewal_started + lease_time * FENCE_FRACTION


class Lease:
    """The renewer and the watchdog of one agent. ``pids`` gives the watchdog the QEMU processes it may have to
    kill, as (vm_id, pid, mark-as-expected-exit) triples; it must be callable from any thread."""

    def __init__(self, agent: Agent, pids: Callable[[], list[tuple[str, int, Callable[[], None]]]]) -> None:
        self.agent = agent
        self.store = agent.store
        self.host_name = agent.host_name
        self.lease_time = float(agent.settings.lease_time)
        self.pids = pids
        # The fencer's home (corral.host.fencer); an agent without a layout (a unit test's stand-in) has none.
        layout = getattr(agent, "layout", None)
        self.fencer_home: Path | None = layout.home if layout is not None else None
        self.epoch: int | None = None
        self.deadline = 0.0
        self.fenced = False  # past the deadline: kill and start nothing
        self.taken_over = False  # a renewal found a newer epoch: the agent must drop its stale copies
        self.killed: set[str] = set()  # VM ids the watchdog killed since the fence began
        self.non_ha: set[str] = set()  # VMs of this host known not to be HA (refreshed at each renewal)
        self.fences = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def enabled(self) -> bool:
        return self.store.shared

    def valid(self) -> bool:
        """May this agent start or claim anything now? (Always on SQLite, where there is no lease.)"""
        return not self.enabled or (not self.fenced and not self.taken_over and time.monotonic() < self.deadline)

    # -- acquiring and renewing ------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease at start-up under the host's current epoch (after registration made the row)."""
        if not self.enabled:
            return
        started = time.monotonic()
        with self.store.session() as session:
            host = session.scalars(select(Host).where(Host.name == self.host_name).with_for_update()).one()
            host.lease_expires_at = session.scalar(select(func.now() + timedelta(seconds=self.lease_time)))
            if host.state == "fenced":  # its lease ran out while the agent was away; it holds one again
                host.state = "online"
            self.epoch = host.epoch
            self._refresh_non_ha(session)
            self._report_fencer_kills(session)
        self.deadline = deadline_after(started, self.lease_time)
        self.fenced = self.taken_over = False
        self._tell_fencer(started)

    def renew(self) -> bool:
        """One renewal under the epoch held; False (and ``taken_over``) when the control plane took the host."""
        started = time.monotonic()
        with self.store.session() as session:
            result = session.execute(
                update(Host)
                .where(Host.name == self.host_name, Host.epoch == self.epoch)
                .values(
                    lease_expires_at=func.now() + timedelta(seconds=self.lease_time),
                    # "fenced" (corral.cluster.ha.mark_fenced) lasts until the host renews again: it rejoins.
                    state=case((Host.state == "fenced", "online"), else_=Host.state),
                )
            )
            renewed = cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor result
            if renewed:
                self._refresh_non_ha(session)
        if not renewed:
            if not self.taken_over:
                log.error(
                    "host %s was taken over by the control plane while this agent could not renew its "
                    "lease: its VMs run elsewhere now",
                    self.host_name,
                )
            self.taken_over = True
            self._fence("the host was taken over")
            return False
        self.deadline = deadline_after(started, self.lease_time)
        self._tell_fencer(started)
        return True

    def _tell_fencer(self, renewal_started: float, released: bool = False) -> None:
        """Move the fencer's deadline (corral.host.fencer) after a good renewal; a failure to write it is logged
        and lets the old, earlier deadline stand: the fencer errs on the side of fencing."""
        from corral.host import fencer

        if self.fencer_home is None:
            return
        try:
            fencer.write_state(
                self.fencer_home,
                deadline=fencer.fencer_deadline(renewal_started, self.lease_time),
                non_ha=self.non_ha,
                released=released,
            )
        except OSError as exc:
            log.error("cannot tell the fencer of host %s its new deadline: %s", self.host_name, exc)

    def _report_fencer_kills(self, session: Any) -> None:
        """What the fencer killed while this agent was away (dead): one ``host.fenced`` event, as the watchdog's."""
        from corral.host import fencer

        if self.fencer_home is None:
            return
        killed = fencer.take_killed(self.fencer_home)
        if killed:
            event = fence_event(self.host_name, len({entry.get("vm") for entry in killed}), self.epoch)
            event.data = {**event.data, "by": "fencer"}
            session.add(event)
            log.warning("host %s: its fencer killed %d QEMU(s) while the agent was away", self.host_name, len(killed))

    def _ensure_fencer(self) -> None:
        from corral.host import fencer

        if self.fencer_home is None:
            return
        try:
            pid = fencer.ensure_running(self.fencer_home)
        except OSError as exc:
            log.error("cannot start the fencer of host %s: %s", self.host_name, exc)
            return
        if pid is not None:
            log.info("started the fencer of host %s (pid %d)", self.host_name, pid)

    def _refresh_non_ha(self, session: Any) -> None:
        """The VMs known not to be HA, pool-wide: a QEMU here may belong to a VM whose row names another host (a
        live migration coming in), and a non-HA VM is restarted nowhere else, so its copy here never needs fencing.
        The spec's ``ha`` key is read directly (every 2 s, every VM); a spec without one is parsed for the default."""
        non_ha = set()
        for vm_id, spec in session.execute(select(VM.id, VM.spec)):
            with contextlib.suppress(Exception):
                ha = spec.get("ha") if isinstance(spec, dict) else None
                if not (VMSpec.model_validate(spec).ha if ha is None else ha):
                    non_ha.add(vm_id)
        self.non_ha = non_ha

    def release(self) -> None:
        """A clean stop: the host holds no lease any more, so the control plane never takes it over (its VMs keep
        running without an agent; docs/ha.md)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self.enabled and self.epoch is not None and not self.taken_over:
            released = 0
            with contextlib.suppress(Exception), self.store.session() as session:
                result = session.execute(
                    update(Host)
                    .where(Host.name == self.host_name, Host.epoch == self.epoch)
                    .values(lease_expires_at=None)
                )
                released = cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor result
            # Only a lease given up in the store lets the fencer go without fencing: otherwise the control plane
            # takes the host over at expiry plus the margin, and the fencer must have killed the HA VMs by then.
            if released:
                self._tell_fencer(time.monotonic(), released=True)

    # -- the threads -----------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled:
            return
        self._ensure_fencer()
        for target, name in ((self._renew_loop, "corral-lease"), (self._watchdog, "corral-watchdog")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_time * RENEW_FRACTION):
            if self.taken_over:
                continue  # the agent rejoins (corral.host.agent) and calls acquire() again
            try:
                if self.renew():
                    self._ensure_fencer()  # one that died (an OOM kill) is replaced
            except Exception as exc:  # the store is down or unreachable: the watchdog decides
                log.warning("cannot renew the lease of host %s: %s", self.host_name, exc)

    def _watchdog(self) -> None:
        while not self._stop.wait(TICK):
            if self.taken_over or time.monotonic() >= self.deadline:
                self._fence("the lease could not be renewed in time")
            elif self.fenced:
                log.warning("lease of host %s renewed again: fence lifted", self.host_name)
                self.fenced = False

    def _fence(self, why: str) -> None:
        """Kill every QEMU here that is not known to be a non-HA VM. Touches no store and no event loop."""
        if not self.fenced:
            self.fenced = True
            self.fences += 1
            log.error("host %s fences itself: %s; killing its HA VMs", self.host_name, why)
        try:
            running = self.pids()
        except Exception:  # the agent's table changed under us: the next tick tries again
            return
        for vm_id, pid, expect in running:
            if vm_id in self.non_ha:
                continue
            expect()  # the agent must not take this exit for a crash and restart it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if vm_id not in self.killed:
                log.error("fenced: killed QEMU %d of HA VM %s", pid, vm_id)
                self.killed.add(vm_id)


def fence_event(host: str, killed: int, epoch: int | None) -> Event:
    """The event an agent writes once it reaches the store again after fencing itself."""
    return Event(
        project=None,
        type="host.fenced",
        resource_kind="host",
        resource_name=host[:63],
        data={"killed": killed, "epoch": epoch},
    )
