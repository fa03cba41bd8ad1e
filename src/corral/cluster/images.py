"""Image verbs of the control plane."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import placement
from corral.cluster.requests import ImageBuild, ImageImport
from corral.errors import AlreadyExists, Conflict, Forbidden, InvalidInput, NotFound
from corral.spec import sources
from corral.spec.job import JobKind
from corral.spec.job_params import ImageBuildParams, ImageImportParams
from corral.spec.names import validate_name
from corral.spec.sources import Origin
from corral.store import jobs
from corral.store.models import VM, Image, Job, Template, Volume

RECIPES = ("tiny", "debian")


def _visible(project: str | None):  # type: ignore[no-untyped-def]
    """Images a project sees: its own and the default project's, which serve as the shared catalog."""
    return Image.project.in_([project, "default"]) if project else Image.id.is_not(None)


def own_first(project: str | None):  # type: ignore[no-untyped-def]
    """Order by: the project's own image before the catalog's of the same name (False sorts before True)."""
    return (Image.project == "default").asc() if project and project != "default" else Image.id.asc()


def find_image(session: Session, name: str, project: str | None = None) -> Image | None:
    """The image a project means by ``name``: its own, else the default project's. Another project's image of
    that name is never found (nor confirmed to exist)."""
    return session.scalars(
        select(Image).where(Image.name == name, _visible(project)).order_by(own_first(project))
    ).first()


def get_image(session: Session, name: str, project: str | None = None) -> Image:
    image = find_image(session, name, project)
    if image is None:
        raise NotFound(f"image {name!r} not found", "list images with `corral image list`")
    return image


def list_images(session: Session, project: str | None = None) -> list[Image]:
    return list(session.scalars(select(Image).where(_visible(project)).order_by(Image.name)))


def _host(session: Session) -> str:
    hosts = placement.online_hosts(session)
    if not hosts:
        raise Conflict("no host agent is online", "start the daemon with `corral serve`")
    return hosts[0].name


def build(session: Session, request: ImageBuild, project: str = "default") -> tuple[Image, Job | None]:
    """Queue a recipe build; an image that is already built is returned as it is (no job)."""
    if request.recipe not in RECIPES:
        raise InvalidInput(f"unknown image recipe {request.recipe!r}", f"choose one of: {', '.join(RECIPES)}")
    name = validate_name(request.name or request.recipe, "image name")
    existing = session.scalars(select(Image).where(Image.name == name, Image.project == project)).first()
    catalog = find_image(session, name, project) if existing is None else None
    if catalog is not None and catalog.state == "ready" and catalog.details.get("recipe") == request.recipe:
        return catalog, None  # the shared catalog's build serves every project
    if existing is not None:
        if existing.state == "ready" and existing.details.get("recipe") == request.recipe:
            return existing, None
        active = jobs.active_for(session, "image", existing.id)
        if active:
            return existing, active[0]
        raise AlreadyExists(f"image {name!r} already exists", "remove it first with `corral image rm`")
    if request.recipe == "debian":
        from corral.spec.debian import validate_packages, validate_release, validate_size

        params = ImageBuildParams(
            recipe=request.recipe,
            release=validate_release(request.release or "bookworm"),
            packages=validate_packages(request.packages),
            size=validate_size(request.size or (4 << 30)),
        )
    elif request.release or request.packages or request.size:
        raise InvalidInput("--release, --packages and --size are for the debian recipe", "drop them for tiny")
    else:
        params = ImageBuildParams(recipe=request.recipe)
    image = Image(name=name, project=project, state="pending", source=f"recipe:{request.recipe}")
    session.add(image)
    session.flush()
    job = jobs.submit(
        session,
        JobKind.IMAGE_BUILD,
        "image",
        name,
        target_id=image.id,
        host=_host(session),
        project=project,
        params=params,
    )
    return image, job


def import_(session: Session, request: ImageImport, project: str, origin: Origin) -> tuple[Image, Job]:
    """Check every source (corral.spec.sources: an upload, a name in the import directory, or a host path for the
    local admin only) before a row or a job is made; the job opens them again without following links."""
    if session.scalars(select(Image.id).where(Image.name == request.name, Image.project == project)).first():
        raise AlreadyExists(f"image {request.name!r} already exists", "choose another name or remove it first")
    if (request.initrd or request.initrd_upload) and not (request.kernel or request.kernel_upload):
        raise InvalidInput("--initrd needs --kernel", "pass the kernel the initrd belongs to")
    disk = sources.resolve(origin, project, file=request.file, upload=request.upload, what="image file")
    params = ImageImportParams(
        source=disk.params(),
        format=request.format,
        cmdline=request.cmdline,
        cloud_init=request.cloud_init,
        firmware=request.firmware.value if request.firmware else None,
    )
    if request.kernel or request.kernel_upload:
        params.kernel = sources.resolve(
            origin, project, file=request.kernel, upload=request.kernel_upload, what="kernel"
        ).params()
    if request.initrd or request.initrd_upload:
        params.initrd = sources.resolve(
            origin, project, file=request.initrd, upload=request.initrd_upload, what="initrd"
        ).params()
    shown = {
        # A file name, not the host path: default-project images are every tenant's catalog.
        sources.SourceKind.PATH: f"file:{disk.path.name}",
        sources.SourceKind.IMPORT_DIR: f"import-dir:{disk.label}",
        sources.SourceKind.UPLOAD: f"upload:{disk.path.name[:12]}",
    }[disk.kind]
    image = Image(name=request.name, project=project, state="pending", source=shown)
    session.add(image)
    session.flush()
    job = jobs.submit(
        session,
        JobKind.IMAGE_IMPORT,
        "image",
        image.name,
        target_id=image.id,
        host=_host(session),
        project=project,
        params=params,
    )
    return image, job


def delete(session: Session, name: str, project: str = "default") -> Job:
    image = get_image(session, name, project)
    if image.project != project:
        raise Forbidden(f"image {name!r} belongs to project {image.project!r}", f"delete it from {image.project!r}")
    users = session.scalars(
        select(VM.name).join(Volume, Volume.vm_id == VM.id).where(Volume.backing_image == image.id)
    ).all()
    orphans = session.scalars(select(Volume.name).where(Volume.backing_image == image.id, Volume.vm_id.is_(None))).all()
    scope = select(Template) if project == "default" else select(Template).where(Template.project == project)
    templates = [t.name for t in session.scalars(scope) if t.spec.get("image") == name]
    if users or orphans or templates:
        names = ", ".join(sorted({*users, *(f"volume {v}" for v in orphans), *(f"template {t}" for t in templates)}))
        raise Conflict(f"image {name!r} is used by {names}", "delete those first")
    if jobs.active_for(session, "image", image.id):
        raise Conflict(f"image {name!r} is busy", "wait for its job to finish")
    return jobs.submit(
        session, JobKind.IMAGE_DELETE, "image", name, target_id=image.id, host=_host(session), project=project
    )
