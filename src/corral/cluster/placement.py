"""Where a VM may run: capacity under overcommit ratios, counted over the VMs that are meant to run.

A VM counts against a host while its desired state is running or paused; stopped VMs hold their disks but
not CPU or memory. One lock serialises check-and-commit, so two concurrent starts never overbook a host.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.errors import Conflict, InsufficientResources, NotFound
from corral.spec.sizes import format_size
from corral.spec.vm import PowerState, VMSpec
from corral.store.models import VM, Host, utcnow

placement_lock = threading.RLock()
HOST_TIMEOUT = timedelta(seconds=60)


class Allocation(BaseModel):
    cpus: int = 0
    memory: int = 0
    vms: int = 0


def allocated(session: Session, host: str, exclude_vm: str | None = None) -> Allocation:
    total = Allocation()
    rows = session.scalars(
        select(VM).where(VM.host == host, VM.desired_state.in_([PowerState.RUNNING, PowerState.PAUSED]))
    )
    for vm in rows:
        if vm.id == exclude_vm:
            continue
        spec = VMSpec.model_validate(vm.spec)
        total.cpus += spec.cpus
        total.memory += spec.memory
        total.vms += 1
    return total


def capacity(host: Host) -> tuple[float, float]:
    """CPUs and bytes of memory this host may hand out."""
    return host.cpus * host.cpu_overcommit, max(0, host.memory - host.reserved_memory) * host.memory_overcommit


def check_hard_limits(host: Host, spec: VMSpec) -> None:
    """Raise when ``spec`` could never run on ``host``, whatever else runs there."""
    if spec.cpus > host.cpus:
        raise InsufficientResources(
            f"{spec.cpus} vCPUs is more than host {host.name} has ({host.cpus})", f"use --cpus {host.cpus} or fewer"
        )
    usable_memory = max(0, host.memory - host.reserved_memory)
    if spec.memory > usable_memory:
        raise InsufficientResources(
            f"{format_size(spec.memory)} of memory is more than host {host.name} can give "
            f"({format_size(usable_memory)})",
            "ask for less memory",
        )


def check_fits(session: Session, host: Host, spec: VMSpec, exclude_vm: str | None = None) -> None:
    """Raise with the numbers when ``spec`` cannot run on ``host`` now."""
    check_hard_limits(host, spec)
    used = allocated(session, host.name, exclude_vm)
    cpu_cap, mem_cap = capacity(host)
    if used.cpus + spec.cpus > cpu_cap:
        raise InsufficientResources(
            f"host {host.name} has {cpu_cap - used.cpus:g} of {cpu_cap:g} vCPUs left; this VM needs {spec.cpus}",
            "stop a VM or raise cpu_overcommit in config.toml",
        )
    if used.memory + spec.memory > mem_cap:
        raise InsufficientResources(
            f"host {host.name} has {format_size(int(mem_cap - used.memory))} of memory left; "
            f"this VM needs {format_size(spec.memory)}",
            "stop a VM or raise memory_overcommit in config.toml",
        )


def online_hosts(session: Session) -> list[Host]:
    cutoff = utcnow() - HOST_TIMEOUT
    hosts = session.scalars(select(Host).order_by(Host.name)).all()
    return [h for h in hosts if h.state == "online" and h.heartbeat_at >= cutoff]


def pick_host(session: Session, spec: VMSpec, wanted: str | None = None, will_run: bool = True) -> Host:
    """The host for a new VM: the one asked for, else the online host with the most free memory."""
    hosts = online_hosts(session)
    if not hosts:
        raise Conflict("no host agent is online", "start the daemon with `corral serve`")
    if wanted is not None:
        hosts = [h for h in hosts if h.name == wanted]
        if not hosts:
            raise NotFound(f"host {wanted!r} is not online", "list hosts with `corral host list`")
    reasons = []
    for host in sorted(hosts, key=lambda h: capacity(h)[1] - allocated(session, h.name).memory, reverse=True):
        if host.qemu_version is None:
            reasons.append(f"{host.name}: QEMU is not installed")
            continue
        try:
            if will_run:
                check_fits(session, host, spec)
            else:
                check_hard_limits(host, spec)
        except InsufficientResources as exc:
            if len(hosts) == 1:
                raise
            reasons.append(f"{host.name}: {exc.message}")
            continue
        return host
    if len(reasons) == 1 and "QEMU" in reasons[0]:
        raise Conflict(
            f"cannot run VMs on host {reasons[0]}",
            "install qemu-system-x86 (apt-get install qemu-system-x86), then restart corral",
        )
    raise InsufficientResources("no host can take this VM: " + "; ".join(reasons))
