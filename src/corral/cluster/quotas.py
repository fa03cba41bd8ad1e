"""Project quotas: vCPUs, memory, disk and VM count, checked before the control plane writes anything.

Usage counts what a project has defined, running or not: a stopped VM still holds its disks and can be started at
any moment, so counting only running VMs would let a project overbook itself with one start. The check runs in the
same transaction that then writes the rows (an IMMEDIATE transaction on SQLite, under the placement lock in this
process), so two concurrent creates cannot both slip under a limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.errors import QuotaExceeded
from corral.spec.sizes import format_size
from corral.store.models import VM, Backup, Project, Volume


@dataclass
class Usage:
    vcpus: int = 0
    memory: int = 0
    disk: int = 0
    vms: int = 0


def usage(session: Session, project: str) -> Usage:
    used = Usage()
    for spec in session.scalars(select(VM.spec).where(VM.project == project)):
        used.vms += 1
        used.vcpus += int(spec.get("cpus", 1))
        used.memory += int(spec.get("memory", 0))
    used.disk = int(
        session.scalar(select(func.coalesce(func.sum(Volume.size), 0)).where(Volume.project == project)) or 0
    )
    # Backups take real space in the host's backup directory: they count by the bytes they hold.
    used.disk += int(
        session.scalar(select(func.coalesce(func.sum(Backup.size), 0)).where(Backup.project == project)) or 0
    )
    return used


def check(session: Session, project: str, *, vcpus: int = 0, memory: int = 0, disk: int = 0, vms: int = 0) -> None:
    """Refuse, naming the quota, if adding this much would take ``project`` over any of its limits."""
    row = session.get(Project, project)
    if row is None or all(getattr(row, f) is None for f in ("max_vcpus", "max_memory", "max_disk", "max_vms")):
        return
    used = usage(session, project)
    hint = f"free some, or ask an admin to raise it: `corral project set {project} --%s ...`"
    if row.max_vms is not None and vms and used.vms + vms > row.max_vms:
        raise QuotaExceeded(
            f"quota max-vms of project {project!r} exceeded: {used.vms} VMs + {vms} > {row.max_vms}",
            hint % "max-vms",
        )
    if row.max_vcpus is not None and vcpus and used.vcpus + vcpus > row.max_vcpus:
        raise QuotaExceeded(
            f"quota max-vcpus of project {project!r} exceeded: {used.vcpus} vCPUs in use + {vcpus} > {row.max_vcpus}",
            hint % "max-vcpus",
        )
    if row.max_memory is not None and memory and used.memory + memory > row.max_memory:
        raise QuotaExceeded(
            f"quota max-memory of project {project!r} exceeded: {format_size(used.memory)} in use + "
            f"{format_size(memory)} > {format_size(row.max_memory)}",
            hint % "max-memory",
        )
    if row.max_disk is not None and disk and used.disk + disk > row.max_disk:
        raise QuotaExceeded(
            f"quota max-disk of project {project!r} exceeded: {format_size(used.disk)} in use + "
            f"{format_size(disk)} > {format_size(row.max_disk)}",
            hint % "max-disk",
        )
