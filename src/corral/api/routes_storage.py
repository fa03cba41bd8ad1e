"""Image and volume routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, status
from sqlalchemy.orm import Session

from corral.api.auth import Caller, admin, viewer
from corral.api.routes_uploads import origin_of
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, ImageView, JobView, VolumeView
from corral.cluster import images, volumes
from corral.cluster.requests import ImageBuild, ImageImport, VolumeCreate, VolumeResize

router = APIRouter(tags=["storage"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


@router.get("/images", response_model=list[ImageView])
def list_images(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[ImageView]:
    return [ImageView.of(image) for image in images.list_images(session, caller.project)]


@router.get("/images/{name}", response_model=ImageView)
def show_image(name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> ImageView:
    return ImageView.of(images.get_image(session, name, caller.project))


@router.post("/images/build", **ACCEPTED)
def build_image(request: ImageBuild, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        image, job = images.build(session, request, caller.project)
        return Accepted(job=JobView.of(job) if job else None, image=ImageView.of(image))


@router.post("/images/import", **ACCEPTED)
def import_image(
    request: ImageImport, http: Request, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    """From uploads or the import directory; host paths only on the unix socket (corral.spec.sources)."""
    with state.store.session() as session:
        image, job = images.import_(session, request, caller.project, origin_of(http))
        return Accepted(job=JobView.of(job), image=ImageView.of(image))


@router.delete("/images/{name}", **ACCEPTED)
def delete_image(name: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(images.delete(session, name, caller.project)))


@router.get("/volumes", response_model=list[VolumeView])
def list_volumes(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[VolumeView]:
    return [VolumeView.of(volume) for volume in volumes.list_volumes(session, caller.project)]


@router.get("/volumes/{name}", response_model=VolumeView)
def show_volume(name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> VolumeView:
    return VolumeView.of(volumes.get_volume(session, name, caller.project))


@router.post("/volumes", **ACCEPTED)
def create_volume(
    request: VolumeCreate, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        job = volumes.create(session, request, caller.project)
        session.flush()
        volume = volumes.get_volume(session, request.name, caller.project)
        return Accepted(job=JobView.of(job), volume=VolumeView.of(volume))


@router.post("/volumes/{name}/resize", **ACCEPTED)
def resize_volume(
    name: str, request: VolumeResize, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(volumes.resize(session, name, request, caller.project)))


@router.delete("/volumes/{name}", **ACCEPTED)
def delete_volume(name: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(volumes.delete(session, name, caller.project)))
