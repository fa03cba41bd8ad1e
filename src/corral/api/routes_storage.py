"""Image and volume routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status
from sqlalchemy.orm import Session

from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, ImageView, JobView, VolumeView
from corral.cluster import images, volumes
from corral.cluster.requests import ImageBuild, ImageImport, VolumeCreate, VolumeResize

router = APIRouter(tags=["storage"])
ACCEPTED = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


@router.get("/images", response_model=list[ImageView])
def list_images(session: Session = Depends(db_session)) -> list[ImageView]:
    return [ImageView.of(image) for image in images.list_images(session)]


@router.get("/images/{name}", response_model=ImageView)
def show_image(name: str, session: Session = Depends(db_session)) -> ImageView:
    return ImageView.of(images.get_image(session, name))


@router.post("/images/build", **ACCEPTED)
def build_image(request: ImageBuild, state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        image, job = images.build(session, request)
        return Accepted(job=JobView.of(job) if job else None, image=ImageView.of(image))


@router.post("/images/import", **ACCEPTED)
def import_image(request: ImageImport, state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        image, job = images.import_(session, request)
        return Accepted(job=JobView.of(job), image=ImageView.of(image))


@router.delete("/images/{name}", **ACCEPTED)
def delete_image(name: str, state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(images.delete(session, name)))


@router.get("/volumes", response_model=list[VolumeView])
def list_volumes(session: Session = Depends(db_session)) -> list[VolumeView]:
    return [VolumeView.of(volume) for volume in volumes.list_volumes(session)]


@router.get("/volumes/{name}", response_model=VolumeView)
def show_volume(name: str, session: Session = Depends(db_session)) -> VolumeView:
    return VolumeView.of(volumes.get_volume(session, name))


@router.post("/volumes", **ACCEPTED)
def create_volume(request: VolumeCreate, state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        job = volumes.create(session, request, state.layout.pool())
        session.flush()
        return Accepted(job=JobView.of(job), volume=VolumeView.of(volumes.get_volume(session, request.name)))


@router.post("/volumes/{name}/resize", **ACCEPTED)
def resize_volume(name: str, request: VolumeResize, state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(volumes.resize(session, name, request, state.layout.pool())))


@router.delete("/volumes/{name}", **ACCEPTED)
def delete_volume(name: str, state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(volumes.delete(session, name)))
