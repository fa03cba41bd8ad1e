"""Backup, restore, export and import verbs of the control plane: every check the store can answer happens here,
before any row or job is written; the data moves on the host (corral.host.backup_jobs)."""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import placement, quotas
from corral.cluster.images import own_first
from corral.cluster.vm_rows import ensure_idle, fresh_identity, get_vm, new_vm_with_disks
from corral.errors import AlreadyExists, Conflict, Forbidden, InvalidInput, NotFound, QuotaExceeded
from corral.spec import sources
from corral.spec.backup import check_export_path, default_backup_name, read_export_manifest
from corral.spec.job import JobKind
from corral.spec.job_params import BackupOfVMParams, BackupParams, BackupRestoreParams, VMExportParams, VMImportParams
from corral.spec.names import validate_name
from corral.spec.sizes import format_size
from corral.spec.sources import Origin
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs
from corral.store.models import VM, Backup, Host, Image, Job, Project

LIVE = (PowerState.RUNNING, PowerState.PAUSED)
MAX_WAITING_EXPORTS = 4  # exports for download a project may leave on the server at once (each a full copy)
STOPPED = (PowerState.STOPPED, PowerState.CRASHED)


def list_backups(session: Session, project: str, vm_name: str | None = None) -> list[Backup]:
    query = select(Backup).where(Backup.project == project)
    if vm_name is not None:
        query = query.where(Backup.vm_name == vm_name)
    return list(session.scalars(query.order_by(Backup.vm_name, Backup.created_at)))


def get_backup(session: Session, vm_name: str, name: str, project: str = "default") -> Backup:
    backup = session.scalars(
        select(Backup).where(Backup.project == project, Backup.vm_name == vm_name, Backup.name == name)
    ).first()
    if backup is None:
        raise NotFound(f"VM {vm_name} has no backup {name!r}", f"list them with `corral backup list {vm_name}`")
    return backup


def chain(session: Session, backup: Backup) -> list[Backup]:
    """The backup and its ancestors, oldest (the full one) first."""
    links = [backup]
    while links[-1].parent_id is not None:
        parent = session.get(Backup, links[-1].parent_id)
        if parent is None:
            break
        links.append(parent)
    return links[::-1]


def children(session: Session, backup: Backup) -> list[Backup]:
    return list(session.scalars(select(Backup).where(Backup.parent_id == backup.id).order_by(Backup.created_at)))


def reader_host(session: Session, backup: Backup) -> str | None:
    """Where a job that reads the backup's files runs: the host that wrote it while it is online, else an online
    host whose backup directory is the same one (a shared ``backup_dir``: the same store id), so a backup on an
    NFS mount outlives its host. None (the job waits for the writer) when no online host sees it."""
    online = placement.online_hosts(session)
    if backup.host is None or any(h.name == backup.host for h in online) or backup.backup_store is None:
        return backup.host
    for host in online:
        if (host.usage or {}).get("backup_store") == backup.backup_store:
            return host.name
    return backup.host


def _check_disk_quota(session: Session, project: str) -> None:
    """Backups count toward the project's disk quota by the bytes they take; a project already at its limit
    takes no new backup (its size is only known once written)."""
    row = session.get(Project, project)
    if row is None or row.max_disk is None:
        return
    used = quotas.usage(session, project).disk
    if used >= row.max_disk:
        raise QuotaExceeded(
            f"quota max-disk of project {project!r} is used up: {format_size(used)} of disks and backups >= "
            f"{format_size(row.max_disk)}",
            f"delete old backups (`corral backup delete`), or ask an admin: `corral project set {project} --max-disk`",
        )


def create(
    session: Session, vm_name: str, name: str | None = None, incremental: bool = False, project: str = "default"
) -> Job:
    vm = get_vm(session, vm_name, project)
    ensure_idle(session, vm)
    if vm.observed_state not in (*LIVE, *STOPPED):
        raise Conflict(f"VM {vm_name} is {vm.observed_state}", "wait until it is running or stopped")
    kind = "incremental" if incremental else "full"
    if name is None:
        name = default_backup_name(kind)
        taken = {b.name for b in list_backups(session, project, vm_name)}
        base, suffix = name, 1
        while name in taken:
            suffix += 1
            name = f"{base}-{suffix}"
    validate_name(name, "backup name")
    if session.scalars(
        select(Backup.id).where(Backup.project == project, Backup.vm_name == vm_name, Backup.name == name)
    ).first():
        raise AlreadyExists(f"VM {vm_name} already has a backup {name!r}", "choose another name")
    parent = None
    if incremental:
        parent = session.scalars(
            select(Backup).where(Backup.vm_id == vm.id, Backup.state == "ready").order_by(Backup.created_at.desc())
        ).first()
        if parent is None:
            raise Conflict(
                f"VM {vm_name} has no backup to build an incremental one on",
                f"take a full one first: `corral backup create {vm_name}`",
            )
        if len(parent.disks) != len(vm.volumes):
            raise Conflict(
                f"VM {vm_name} has {len(vm.volumes)} disks, its last backup {parent.name} has {len(parent.disks)}",
                f"take a full backup: `corral backup create {vm_name}`",
            )
    _check_disk_quota(session, project)
    backup = Backup(
        name=name,
        project=project,
        vm_name=vm.name,
        vm_id=vm.id,
        host=vm.host,
        kind=kind,
        parent_id=parent.id if parent else None,
        live=vm.observed_state in LIVE,
        spec=dict(vm.spec),
        backup_store=_store_of(session, vm.host),
    )
    session.add(backup)
    session.flush()
    return jobs.submit(
        session,
        JobKind.BACKUP_CREATE,
        "vm",
        vm.name,
        target_id=vm.id,
        host=vm.host,
        project=project,
        params=BackupParams(backup_id=backup.id, name=name),
    )


def _store_of(session: Session, host_name: str | None) -> str | None:
    """The backup directory identity the host reports (corral.host.backup_jobs.store_identity)."""
    host = session.scalars(select(Host).where(Host.name == host_name)).first() if host_name else None
    return (host.usage or {}).get("backup_store") if host is not None else None


def delete(session: Session, vm_name: str, name: str, project: str = "default") -> Job:
    """A backup that others build on is refused: their data reads through it (qcow2 backing files)."""
    backup = get_backup(session, vm_name, name, project)
    dependants = children(session, backup)
    if dependants:
        raise Conflict(
            f"backup {name} of {vm_name} is the base of {', '.join(b.name for b in dependants)}",
            "delete the newer incremental backups first",
        )
    if backup.state != "ready" or jobs.active_for(session, "backup", backup.id):
        raise Conflict(f"backup {name} of {vm_name} is busy ({backup.state})", "wait for its job to finish")
    return jobs.submit(
        session,
        JobKind.BACKUP_DELETE,
        "backup",
        name,
        target_id=backup.id,
        host=reader_host(session, backup),
        project=project,
        params=BackupOfVMParams(vm=vm_name),
    )


def _image_present(session: Session, spec: VMSpec, project: str) -> Image:
    """A restored or imported VM boots the image its spec names (its kernel, for direct boot)."""
    image = session.scalars(
        select(Image)
        .where(Image.name == spec.image, Image.project.in_([project, "default"]))
        .order_by(own_first(project))
    ).first()
    if image is None or image.state != "ready":
        raise NotFound(
            f"image {spec.image!r} that the VM was made from is not here",
            f"build or import it first (`corral image build {spec.image}` for a recipe image)",
        )
    return image


def restore(session: Session, vm_name: str, name: str, as_name: str | None = None, project: str = "default") -> Job:
    """Into a new VM (``as_name``, or ``vm_name`` when that VM is gone), or over the disks of ``vm_name`` when it
    exists and is stopped. A running VM is refused: its disks are in use."""
    backup = get_backup(session, vm_name, name, project)
    if backup.state != "ready":
        raise Conflict(f"backup {name} of {vm_name} is {backup.state}", "wait for its job to finish")
    target_name = as_name or vm_name
    validate_name(target_name, "VM name")
    existing = session.scalars(select(VM).where(VM.project == project, VM.name == target_name)).first()
    sizes = [int(d["size"]) for d in backup.disks]
    if existing is not None:
        if as_name is not None:
            raise AlreadyExists(
                f"VM {as_name!r} already exists",
                "choose another name for --as, or leave --as out to restore over a stopped VM",
            )
        ensure_idle(session, existing)
        if existing.observed_state not in STOPPED or existing.desired_state != PowerState.STOPPED:
            raise Conflict(
                f"VM {vm_name} is {existing.observed_state}; a restore would overwrite disks in use",
                f"stop it first (`corral vm stop {vm_name}`), or restore into a new VM with --as NEW",
            )
        if len(existing.volumes) != len(sizes):
            raise Conflict(
                f"VM {vm_name} has {len(existing.volumes)} disks, backup {name} has {len(sizes)}",
                "restore into a new VM with --as NEW",
            )
        return jobs.submit(
            session,
            JobKind.BACKUP_RESTORE,
            "vm",
            existing.name,
            target_id=existing.id,
            host=existing.host,
            project=project,
            params=BackupRestoreParams(backup_id=backup.id, name=name, mode="over"),
        )
    spec = VMSpec.model_validate(backup.spec)
    spec = fresh_identity(spec, target_name) if as_name else spec.model_copy(update={"name": target_name})
    image = _image_present(session, spec, project)
    host = reader_host(session, backup) or placement.online_hosts(session)[0].name
    with placement.placement_lock:
        vm = new_vm_with_disks(session, spec, host, project, sizes, image)
        return jobs.submit(
            session,
            JobKind.BACKUP_RESTORE,
            "vm",
            vm.name,
            target_id=vm.id,
            host=host,
            project=project,
            params=BackupRestoreParams(backup_id=backup.id, name=name, mode="new"),
        )


def _export_path(file: str) -> Path:
    """The local admin's archive path, checked without an OSError reaching the caller as a 500."""
    if len(file.encode()) > 4096 or any(len(part.encode()) > 255 for part in file.split("/")):
        raise InvalidInput("the archive path is too long", "give a shorter path (at most 255 bytes per name)")
    try:
        return check_export_path(file, must_exist=False)
    except OSError as exc:
        raise InvalidInput(f"cannot write an archive at {file!r}: {exc.strerror}", "give another path") from exc


def export(
    session: Session,
    vm_name: str,
    file: str | None,
    compress: bool = False,
    project: str = "default",
    origin: Origin | None = None,
    format: str = "tar",
) -> Job:
    """To a host path (the local admin only), or, with no ``file``, to the project's export directory, from where
    the caller downloads it (``GET /exports/{id}``, named in the job's result) before it expires. ``format``:
    ``tar`` (corral's own) or ``ova`` (OVF 1.x, corral.cluster.appliances)."""
    if format not in ("tar", "ova"):
        raise InvalidInput(f"unknown export format {format!r}", "choose tar (corral's own) or ova")
    local = origin is not None and origin.local
    if file is not None and not local:
        raise Forbidden(
            "exporting to a path on the server is for the local admin",
            "leave out the file to download the export (`corral vm export VM FILE.tar` does so)",
        )
    vm = get_vm(session, vm_name, project)
    ensure_idle(session, vm)
    if vm.observed_state not in (*LIVE, *STOPPED):
        raise Conflict(f"VM {vm_name} is {vm.observed_state}", "wait until it is running or stopped")
    if file is not None and format == "ova":
        from corral.cluster.appliances import check_ova_path

        params = VMExportParams(file=str(check_ova_path(file)), compress=False)
    elif file is not None:
        params = VMExportParams(file=str(_export_path(file)), compress=compress)
    else:
        if origin is None:
            raise InvalidInput("an export needs a file or a server home", "give the archive path")
        waiting = sources.exports_dir(origin.home, project)
        sources.expire(waiting, origin.expiry)
        if waiting.is_dir() and sum(1 for _ in waiting.iterdir()) >= MAX_WAITING_EXPORTS:
            raise Conflict(
                f"project {project!r} has {MAX_WAITING_EXPORTS} exports waiting to be downloaded",
                "download them (`corral vm export` does, then deletes them) or wait for them to expire",
            )
        ident = secrets.token_hex(16)
        params = VMExportParams(
            file=str(sources.exports_dir(origin.home, project) / f"{ident}.tar"),
            download=ident,
            compress=compress and format == "tar",
        )
    if format == "ova":
        params.format = "ova"  # an OVA is a tar too: downloads keep the .tar name on the server
    return jobs.submit(
        session, JobKind.VM_EXPORT, "vm", vm.name, target_id=vm.id, host=vm.host, project=project, params=params
    )


def import_(
    session: Session,
    file: str | None,
    name: str | None = None,
    project: str = "default",
    origin: Origin | None = None,
    upload: str | None = None,
    network: str | None = None,
) -> Job:
    """The archive's manifest, members and spec are checked here; the disks' checksums and qemu-img's check run
    in the job, before the VM is usable, and a failure there removes the VM again. The archive is a host path
    (the local admin only), a name in the project's import directory, or an upload (corral.spec.sources).
    An OVA or a libvirt domain XML (told apart by content) goes to corral.cluster.appliances."""
    from corral.cluster import appliances

    if origin is None:
        raise InvalidInput("an import needs to know who asks", "call it through the API")
    source = sources.resolve(origin, project, file=file, upload=upload, what="archive")
    if source.kind is sources.SourceKind.PATH and not source.path.is_file():
        check_export_path(str(source.path), must_exist=True)
    with sources.opened(source) as (_fd, readable):
        kind = appliances.detect(readable)
        if kind == "libvirt":
            return appliances.import_libvirt(session, source, readable, name, network, project, origin)
        if kind == "ova":
            return appliances.import_ova(session, source, readable, name, network, project)
        manifest = read_export_manifest(readable, source.label)
    try:
        spec = VMSpec.model_validate(manifest.vm.spec)
    except ValueError as exc:
        raise NotFound(f"the VM spec in {source.label} is invalid: {str(exc).splitlines()[0]}", "export again") from exc
    new_name = name or manifest.vm.name
    validate_name(new_name, "VM name")
    if session.scalars(select(VM.id).where(VM.project == project, VM.name == new_name)).first():
        raise AlreadyExists(f"VM {new_name!r} already exists", "import under another name with --name NEW")
    spec = fresh_identity(spec, new_name)
    if network is not None:
        spec = spec.model_copy(update={"nics": [n.model_copy(update={"network": network}) for n in spec.nics]})
    image = _image_present(session, spec, project)
    hosts = placement.online_hosts(session)
    if not hosts:
        raise Conflict("no host agent is online", "start the daemon with `corral serve`")
    with placement.placement_lock:
        vm = new_vm_with_disks(session, spec, hosts[0].name, project, [d.size for d in manifest.disks], image)
        return jobs.submit(
            session,
            JobKind.VM_IMPORT,
            "vm",
            vm.name,
            target_id=vm.id,
            host=hosts[0].name,
            project=project,
            params=VMImportParams(source=source.params(), manifest=manifest.model_dump(mode="json")),
        )
