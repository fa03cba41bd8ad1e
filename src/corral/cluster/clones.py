"""Clone and template verbs of the control plane."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import placement, quotas
from corral.cluster.snapshots import get_snapshot
from corral.cluster.vm_rows import ensure_idle, fresh_identity, get_vm, new_vm, new_volume, volume_name
from corral.errors import AlreadyExists, Conflict, NotFound
from corral.spec.job import JobKind
from corral.spec.job_params import TemplateCreateParams, VMCloneParams, VMCreateParams
from corral.spec.names import validate_name
from corral.spec.vm import PowerState, VMSpec
from corral.store import jobs
from corral.store.models import VM, Job, Snapshot, Template, Volume

STOPPED = (PowerState.STOPPED, PowerState.CRASHED)


def clone(
    session: Session,
    source_name: str,
    new_name: str,
    linked: bool = False,
    from_snapshot: str | None = None,
    start: bool = False,
    wait: bool = False,
    project: str = "default",
) -> Job:
    source = get_vm(session, source_name, project)
    ensure_idle(session, source)
    snapshot_tag = None
    if from_snapshot is not None:
        if linked:
            raise Conflict("a linked clone cannot start from a snapshot", "use --full with --from-snapshot")
        snapshot_tag = get_snapshot(session, source, from_snapshot).tag
    if linked:
        if source.observed_state not in STOPPED:
            raise Conflict(
                f"a linked clone needs {source_name} stopped (its disks become a shared base)",
                "stop it, or use --full, or `corral vm fork` for a running VM",
            )
        if session.scalars(select(Snapshot.id).where(Snapshot.vm_id == source.id)).first():
            raise Conflict(
                f"{source_name} has snapshots, which live in its disks and cannot be shared",
                "use --full, or make a template",
            )
    spec = fresh_identity(VMSpec.model_validate(source.spec), new_name)
    with placement.placement_lock:
        quotas.check(
            session, project, vcpus=spec.cpus, memory=spec.memory, disk=sum(v.size for v in source.volumes), vms=1
        )
        vm = new_vm(session, spec, source.host, project, start)
        for index, src in enumerate(sorted(source.volumes, key=lambda v: v.device_index)):
            new_volume(
                session,
                vm,
                volume_name(new_name, index),
                src.size,
                index,
                src.role,
                pool=src.pool,
                backing_image=src.backing_image,
            )
        return jobs.submit(
            session,
            JobKind.VM_CLONE,
            "vm",
            new_name,
            target_id=vm.id,
            host=source.host,
            project=project,
            params=VMCloneParams(source_id=source.id, linked=linked, snapshot_tag=snapshot_tag, start=start, wait=wait),
        )


def get_template(session: Session, name: str, project: str = "default") -> Template:
    template = session.scalars(select(Template).where(Template.project == project, Template.name == name)).first()
    if template is None:
        raise NotFound(f"template {name!r} not found", "list templates with `corral template list`")
    return template


def list_templates(session: Session, project: str = "default") -> list[Template]:
    return list(session.scalars(select(Template).where(Template.project == project).order_by(Template.name)))


def template_users(session: Session, template: Template) -> list[str]:
    prefix = f"templates/{template.id}/"
    rows = session.scalars(
        select(VM.name).join(Volume, Volume.vm_id == VM.id).where(Volume.backing_path.startswith(prefix))
    ).all()
    return sorted(set(rows))


def create_template(session: Session, name: str, source_name: str, project: str = "default") -> Job:
    validate_name(name, "template name")
    if session.scalars(select(Template.id).where(Template.project == project, Template.name == name)).first():
        raise AlreadyExists(f"template {name!r} already exists", "choose another name")
    source = get_vm(session, source_name, project)
    ensure_idle(session, source)
    spec = VMSpec.model_validate(source.spec)
    template = Template(
        name=name, project=project, host=source.host, source_vm=source.name, spec=spec.model_dump(mode="json")
    )
    session.add(template)
    session.flush()
    return jobs.submit(
        session,
        JobKind.TEMPLATE_CREATE,
        "template",
        name,
        target_id=template.id,
        host=source.host,
        project=project,
        params=TemplateCreateParams(source_id=source.id),
    )


def delete_template(session: Session, name: str, project: str = "default") -> Job:
    template = get_template(session, name, project)
    users = template_users(session, template)
    if users:
        raise Conflict(f"template {name!r} is the base of {', '.join(users)}", "delete those VMs first")
    return jobs.submit(
        session, JobKind.TEMPLATE_DELETE, "template", name, target_id=template.id, host=template.host, project=project
    )


def create_from_template(
    session: Session, template_name: str, spec: VMSpec, start: bool, wait: bool, project: str = "default"
) -> Job:
    """A linked clone of a template: overlays on its read-only disks, instant."""
    template = get_template(session, template_name, project)
    if template.state != "ready":
        raise Conflict(f"template {template_name} is {template.state}", "wait for its job to finish")
    base = VMSpec.model_validate(template.spec)
    spec = fresh_identity(
        base.model_copy(update={"cpus": spec.cpus, "memory": spec.memory, "restart_policy": spec.restart_policy}),
        spec.name,
    )
    with placement.placement_lock:
        quotas.check(
            session,
            project,
            vcpus=spec.cpus,
            memory=spec.memory,
            disk=sum(int(disk["size"]) for disk in template.disks),
            vms=1,
        )
        vm = new_vm(session, spec, template.host, project, start)
        vm.template = template.id
        for index, disk in enumerate(template.disks):
            new_volume(
                session,
                vm,
                volume_name(spec.name, index),
                disk["size"],
                index,
                "root" if index == 0 else "data",
                backing_path=disk["path"],
            )
        return jobs.submit(
            session,
            JobKind.VM_CREATE,
            "vm",
            vm.name,
            target_id=vm.id,
            host=template.host,
            project=project,
            params=VMCreateParams(start=start, wait=wait),
        )
