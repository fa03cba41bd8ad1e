"""Volume verbs of the control plane."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import placement, quotas
from corral.cluster.requests import VolumeCreate, VolumeResize
from corral.cluster.vm_rows import check_pool_space
from corral.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from corral.spec.job import JobKind
from corral.spec.job_params import VolumeResizeParams
from corral.spec.sizes import format_size
from corral.store import jobs
from corral.store.models import Job, Volume, new_id, volume_file


def get_volume(session: Session, name: str, project: str = "default") -> Volume:
    volume = session.scalars(select(Volume).where(Volume.project == project, Volume.name == name)).first()
    if volume is None:
        raise NotFound(f"volume {name!r} not found", "list volumes with `corral volume list`")
    return volume


def list_volumes(session: Session, project: str = "default") -> list[Volume]:
    return list(session.scalars(select(Volume).where(Volume.project == project).order_by(Volume.name)))


def create(session: Session, request: VolumeCreate, project: str = "default") -> Job:
    if request.pool != "default":
        raise NotFound(f"storage pool {request.pool!r} not found", "use the 'default' pool")
    if session.scalars(select(Volume.id).where(Volume.project == project, Volume.name == request.name)).first():
        raise AlreadyExists(f"volume {request.name!r} already exists", "choose another name")
    check_pool_space(session, request.size, "a volume")
    quotas.check(session, project, disk=request.size)
    hosts = placement.online_hosts(session)
    if not hosts:
        raise Conflict("no host agent is online", "start the daemon with `corral serve`")
    volume_id = new_id()
    volume = Volume(
        id=volume_id,
        name=request.name,
        project=project,
        pool=request.pool,
        host=hosts[0].name,
        path=volume_file(volume_id),  # by id: another project may have a volume of this name
        size=request.size,
    )
    session.add(volume)
    session.flush()
    return jobs.submit(
        session, JobKind.VOLUME_CREATE, "volume", volume.name, target_id=volume.id, host=volume.host, project=project
    )


def resize(session: Session, name: str, request: VolumeResize, project: str = "default") -> Job:
    volume = get_volume(session, name, project)
    if request.size < volume.size:
        raise InvalidInput(
            f"cannot shrink volume {name} from {format_size(volume.size)} to {format_size(request.size)}",
            "shrinking would cut the filesystem inside; give a larger size",
        )
    check_pool_space(session, request.size, "a volume", volume.host)
    quotas.check(session, project, disk=request.size - volume.size)
    if jobs.active_for(session, "volume", volume.id):
        raise Conflict(f"volume {name} is busy", "wait for its job to finish")
    return jobs.submit(
        session,
        JobKind.VOLUME_RESIZE,
        "volume",
        name,
        target_id=volume.id,
        host=volume.host,
        project=project,
        params=VolumeResizeParams(size=request.size),
    )


def delete(session: Session, name: str, project: str = "default") -> Job:
    volume = get_volume(session, name, project)
    if volume.vm_id is not None:
        raise Conflict(
            f"volume {name} is attached to VM {volume.vm.name if volume.vm else volume.vm_id}",
            "delete the VM first (or use `corral vm delete --keep-disks` to keep its volumes)",
        )
    return jobs.submit(
        session, JobKind.VOLUME_DELETE, "volume", name, target_id=volume.id, host=volume.host, project=project
    )
