"""/metrics in the Prometheus text format.

A custom collector reads the store at scrape time (VMs, hosts, jobs), so the numbers are the cluster's, not one
process's; the API's own request latency is a histogram kept in this process. Names follow Prometheus
conventions: a `corral_` prefix, base units (seconds, bytes), `_total` for counters.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from corral.cluster import placement
from corral.spec.vm import VMSpec
from corral.store.db import Store
from corral.store.models import VM, Backup, Host, Job, Plan

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self.store.session() as session:
            yield from self._vms(session)
            yield from self._hosts(session)
            yield from self._jobs(session)
            yield from self._backups(session)
            yield from self._plans(session)

    def _vms(self, session):  # type: ignore[no-untyped-def]
        info = GaugeMetricFamily(
            "corral_vm_info", "A VM and its state (always 1).", labels=["vm", "project", "host", "state", "image"]
        )
        running = GaugeMetricFamily("corral_vm_running", "1 when the VM's QEMU runs.", labels=["vm", "project"])
        vcpus = GaugeMetricFamily("corral_vm_vcpus", "vCPUs of the VM.", labels=["vm", "project"])
        memory = GaugeMetricFamily("corral_vm_memory_bytes", "Guest memory size.", labels=["vm", "project"])
        used = GaugeMetricFamily(
            "corral_vm_memory_used_bytes", "Memory used by the VM's QEMU (cgroup or RSS).", labels=["vm", "project"]
        )
        cpu = CounterMetricFamily("corral_vm_cpu_seconds", "CPU time used by the VM's QEMU.", labels=["vm", "project"])
        disk_read = CounterMetricFamily(
            "corral_vm_disk_read_bytes", "Bytes read by the guest, per disk.", labels=["vm", "project", "disk"]
        )
        disk_write = CounterMetricFamily(
            "corral_vm_disk_written_bytes", "Bytes written by the guest, per disk.", labels=["vm", "project", "disk"]
        )
        restarts = CounterMetricFamily(
            "corral_vm_restarts", "Restarts by the VM's restart policy.", labels=["vm", "project"]
        )
        net_rx = CounterMetricFamily(
            "corral_vm_network_receive_bytes", "Bytes the guest received, per TAP NIC.", labels=["vm", "project", "nic"]
        )
        net_tx = CounterMetricFamily(
            "corral_vm_network_transmit_bytes", "Bytes the guest sent, per TAP NIC.", labels=["vm", "project", "nic"]
        )
        # Automatic ballooning (docs/optimization.md): what the guest has now, beside its size above.
        balloon = GaugeMetricFamily(
            "corral_vm_balloon_bytes", "Memory the guest has now, after its balloon.", labels=["vm", "project"]
        )
        for vm in session.scalars(select(VM)):
            spec = VMSpec.model_validate(vm.spec)
            key = [vm.name, vm.project]
            info.add_metric([vm.name, vm.project, vm.host or "", vm.observed_state, spec.image], 1)
            running.add_metric(key, 1 if vm.observed_state in ("running", "paused") else 0)
            vcpus.add_metric(key, spec.cpus)
            memory.add_metric(key, spec.memory)
            restarts.add_metric(key, vm.restart_count)
            stats = vm.stats or {}
            if vm.observed_state in ("running", "paused"):
                if stats.get("memory_bytes") is not None:
                    used.add_metric(key, stats["memory_bytes"])
                if stats.get("cpu_seconds") is not None:
                    cpu.add_metric(key, stats["cpu_seconds"])
                if stats.get("balloon_bytes") is not None:
                    balloon.add_metric(key, stats["balloon_bytes"])
                for disk, io in stats.get("disks", {}).items():
                    disk_read.add_metric([*key, disk], io.get("read_bytes", 0))
                    disk_write.add_metric([*key, disk], io.get("write_bytes", 0))
                for nic, io in stats.get("nics", {}).items():
                    net_rx.add_metric([*key, nic], io.get("receive_bytes", 0))
                    net_tx.add_metric([*key, nic], io.get("transmit_bytes", 0))
        yield from (info, running, vcpus, memory, used, balloon, cpu, disk_read, disk_write, net_rx, net_tx, restarts)

    def _hosts(self, session):  # type: ignore[no-untyped-def]
        labels = ["host"]
        cpus = GaugeMetricFamily("corral_host_cpus", "CPUs of the host.", labels=labels)
        vcpus_cap = GaugeMetricFamily(
            "corral_host_vcpus_capacity", "vCPUs the host may hand out (overcommit).", labels=labels
        )
        vcpus_alloc = GaugeMetricFamily("corral_host_vcpus_allocated", "vCPUs of VMs meant to run.", labels=labels)
        mem = GaugeMetricFamily("corral_host_memory_bytes", "Memory of the host.", labels=labels)
        mem_cap = GaugeMetricFamily("corral_host_memory_capacity_bytes", "Memory the host may hand out.", labels=labels)
        mem_alloc = GaugeMetricFamily(
            "corral_host_memory_allocated_bytes", "Memory of VMs meant to run.", labels=labels
        )
        storage_free = GaugeMetricFamily(
            "corral_host_storage_free_bytes", "Free space in the default pool.", labels=labels
        )
        up = GaugeMetricFamily("corral_host_up", "1 when the host's agent heartbeat is recent.", labels=labels)
        standby = GaugeMetricFamily(
            "corral_host_standby", "1 while the host is in standby (consolidation).", labels=labels
        )
        # HA (docs/ha.md): how often the host was taken over, and when its lease runs out (0: it holds none).
        epoch = GaugeMetricFamily("corral_host_epoch", "Times the control plane took the host over.", labels=labels)
        lease = GaugeMetricFamily(
            "corral_host_lease_expiry_timestamp_seconds",
            "When the host's HA lease runs out (database clock; 0 when it holds none).",
            labels=labels,
        )
        online = {h.name for h in placement.online_hosts(session)}
        for host in session.scalars(select(Host)):
            allocation = placement.allocated(session, host.name)
            cpu_cap, mem_capacity = placement.capacity(host)
            cpus.add_metric([host.name], host.cpus)
            vcpus_cap.add_metric([host.name], cpu_cap)
            vcpus_alloc.add_metric([host.name], allocation.cpus)
            mem.add_metric([host.name], host.memory)
            mem_cap.add_metric([host.name], mem_capacity)
            mem_alloc.add_metric([host.name], allocation.memory)
            storage_free.add_metric([host.name], host.storage_free)
            up.add_metric([host.name], 1 if host.name in online else 0)
            standby.add_metric([host.name], 1 if host.standby else 0)
            epoch.add_metric([host.name], host.epoch)
            lease.add_metric([host.name], host.lease_expires_at.timestamp() if host.lease_expires_at else 0)
        yield from (cpus, vcpus_cap, vcpus_alloc, mem, mem_cap, mem_alloc, storage_free, up, standby, epoch, lease)

    def _jobs(self, session):  # type: ignore[no-untyped-def]
        jobs = CounterMetricFamily("corral_jobs", "Jobs by kind and state.", labels=["kind", "state"])
        rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
        for kind, state, count in rows:
            jobs.add_metric([kind, state], count)
        duration = GaugeMetricFamily(
            "corral_job_duration_seconds_sum", "Total run time of finished jobs, by kind.", labels=["kind"]
        )
        finished = session.execute(
            select(Job.kind, Job.started_at, Job.finished_at).where(
                Job.finished_at.is_not(None), Job.started_at.is_not(None)
            )
        ).all()
        totals: dict[str, float] = {}
        for kind, started, ended in finished:
            totals[kind] = totals.get(kind, 0.0) + _seconds(started, ended)
        for kind, total in totals.items():
            duration.add_metric([kind], total)
        yield from (jobs, duration)

    def _backups(self, session):  # type: ignore[no-untyped-def]
        """Per VM: when its newest backup was taken and last verified good, and how many were found corrupt, so
        an alert can fire on a schedule that stopped or a backup that rots."""
        labels = ["vm", "project"]
        last = GaugeMetricFamily(
            "corral_backup_last_timestamp_seconds", "When the VM's newest backup was taken.", labels=labels
        )
        verified = GaugeMetricFamily(
            "corral_backup_last_verified_timestamp_seconds",
            "When a backup of the VM was last verified good.",
            labels=labels,
        )
        corrupt = GaugeMetricFamily(
            "corral_backups_corrupt", "The VM's backups whose last verify found them corrupt.", labels=labels
        )
        newest: dict[tuple[str, str], float] = {}
        good: dict[tuple[str, str], float] = {}
        bad: dict[tuple[str, str], int] = {}
        rows = session.execute(
            select(Backup.vm_name, Backup.project, Backup.created_at, Backup.verify_state, Backup.verified_at).where(
                Backup.state == "ready"
            )
        ).all()
        for vm_name, project, created, state, checked in rows:
            key = (vm_name, project)
            newest[key] = max(newest.get(key, 0.0), created.timestamp())
            bad[key] = bad.get(key, 0) + (state == "corrupt")
            if state == "ok" and checked is not None:
                good[key] = max(good.get(key, 0.0), checked.timestamp())
        for key, value in newest.items():
            last.add_metric(list(key), value)
            corrupt.add_metric(list(key), bad[key])
        for key, value in good.items():
            verified.add_metric(list(key), value)
        yield from (last, verified, corrupt)

    def _plans(self, session):  # type: ignore[no-untyped-def]
        """Balancing and consolidation plans by kind and state (docs/optimization.md): one grouped query, so an
        alert can fire on a failed plan."""
        plans = GaugeMetricFamily("corral_plans", "Stored action plans, by kind and state.", labels=["kind", "state"])
        for kind, state, count in session.execute(
            select(Plan.kind, Plan.state, func.count()).group_by(Plan.kind, Plan.state)
        ):
            plans.add_metric([kind, state], count)
        yield plans


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


class HeldCollector(Collector):
    """Long-lived requests (job waits, event streams, log follows, consoles) held now, per kind: how close the
    callers are to their caps (corral.api.limits)."""

    KINDS = ("job wait", "event stream", "log follow", "console")

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        held = GaugeMetricFamily("corral_api_held_requests", "Long-lived API requests held now.", labels=["kind"])
        slots = getattr(self.app.state, "caller_slots", None)
        for kind in self.KINDS:
            held.add_metric([kind], slots.held(kind) if slots is not None else 0)
        yield held


def install(app: FastAPI, store: Store) -> None:
    """Add /metrics and the request-latency middleware to ``app``."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    registry.register(HeldCollector(app))
    latency = Histogram(
        "corral_api_request_duration_seconds",
        "API request latency.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        latency.labels(request.method, path, str(response.status_code)).observe(time.perf_counter() - started)
        return response

    from fastapi import Depends

    from corral.api.auth import cluster_viewer

    # The numbers name every project's VMs, so scraping needs a cluster-wide role (or the unix socket).
    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(cluster_viewer)])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
