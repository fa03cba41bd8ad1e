"""Projects, users, tokens and the audit log.

Projects, users and tokens are managed by cluster admins. Anyone may read the projects they can act in (with their
quotas and usage), so a project's members see how much room they have left.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api.auth import Caller, admin, authenticated, cluster_admin
from corral.api.state import AppState, app_state, db_session
from corral.cluster import identity, quotas
from corral.cluster.identity import Principal, Role
from corral.cluster.requests import size_in_bytes
from corral.errors import NotFound
from corral.spec.names import validate_name
from corral.store.models import AuditEntry, Project, Token, User

router = APIRouter(tags=["access"])

Size = Annotated[int, BeforeValidator(size_in_bytes)]


class Quotas(BaseModel):
    """Limits of a project; null means unlimited."""

    model_config = ConfigDict(extra="forbid")
    max_vcpus: int | None = Field(default=None, ge=0, le=1_000_000)
    max_memory: Size | None = None
    max_disk: Size | None = None
    max_vms: int | None = Field(default=None, ge=0, le=1_000_000)


class ProjectCreate(Quotas):
    name: str
    description: str = Field(default="", max_length=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "project name")


class ProjectUpdate(Quotas):
    description: str | None = Field(default=None, max_length=1000)


class UsageView(BaseModel):
    vcpus: int
    memory: int
    disk: int
    vms: int


class ProjectView(BaseModel):
    name: str
    description: str
    max_vcpus: int | None
    max_memory: int | None
    max_disk: int | None
    max_vms: int | None
    usage: UsageView
    created_at: datetime

    @classmethod
    def of(cls, session: Session, project: Project) -> ProjectView:
        used = quotas.usage(session, project.name)
        return cls(
            name=project.name,
            description=project.description,
            max_vcpus=project.max_vcpus,
            max_memory=project.max_memory,
            max_disk=project.max_disk,
            max_vms=project.max_vms,
            usage=UsageView(vcpus=used.vcpus, memory=used.memory, disk=used.disk, vms=used.vms),
            created_at=project.created_at,
        )


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    cluster_admin: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "user name")


class UserView(BaseModel):
    name: str
    cluster_admin: bool
    tokens: int
    created_at: datetime


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str
    project: str = identity.DEFAULT_PROJECT
    role: str = "viewer"
    expires: str | None = Field(default=None, description="lifetime such as 30d, 12h or 15m; none: never expires")
    description: str = Field(default="", max_length=1000)

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        return Role.parse(value).label

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        return validate_name(value, "user name")

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        return validate_name(value, "project name")

    @field_validator("expires")
    @classmethod
    def _expires(cls, value: str | None) -> str | None:
        if value is not None:
            identity.parse_duration(value)
        return value


class TokenView(BaseModel):
    id: str
    user: str
    project: str
    role: str
    description: str
    expires_at: datetime | None
    revoked: bool
    created_at: datetime

    @classmethod
    def of(cls, token: Token) -> TokenView:
        return cls.model_validate(token, from_attributes=True)


class NewToken(TokenView):
    """A token just made: ``secret`` is shown here once and cannot be read again."""

    secret: str


class AuditView(BaseModel):
    id: int
    at: datetime
    user: str
    token_id: str | None
    source: str
    project: str | None
    method: str
    path: str
    action: str
    status: int
    result: str
    job_id: str | None

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditView:
        return cls.model_validate(entry, from_attributes=True)


# -- projects -------------------------------------------------------------------------------------------------


@router.get("/projects", response_model=list[ProjectView])
def list_projects(who: Principal = Depends(authenticated), session: Session = Depends(db_session)) -> list[ProjectView]:
    """Every project for cluster-wide callers; a token's own project otherwise."""
    rows = identity.list_projects(session)
    return [ProjectView.of(session, row) for row in rows if who.role_in(row.name) is not None]


@router.post("/projects", response_model=ProjectView, status_code=status.HTTP_201_CREATED)
def create_project(
    request: ProjectCreate, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)
) -> ProjectView:
    with state.store.session() as session:
        quota = request.model_dump(include={"max_vcpus", "max_memory", "max_disk", "max_vms"})
        project = identity.create_project(session, request.name, request.description, **quota)
        return ProjectView.of(session, project)


@router.get("/projects/{name}", response_model=ProjectView)
def show_project(
    name: str, who: Principal = Depends(authenticated), session: Session = Depends(db_session)
) -> ProjectView:
    if who.role_in(name) is None:  # as good as missing: names of other tenants are not disclosed
        raise NotFound(f"project {name!r} not found", "list projects with `corral project list`")
    return ProjectView.of(session, identity.get_project(session, name))


@router.patch("/projects/{name}", response_model=ProjectView)
def update_project(
    name: str, request: ProjectUpdate, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)
) -> ProjectView:
    """Change quotas or the description; a field sent as null removes that quota."""
    changes = {key: getattr(request, key) for key in request.model_fields_set}
    if changes.get("description") is None:
        changes.pop("description", None)
    with state.store.session() as session:
        return ProjectView.of(session, identity.update_project(session, name, changes))


@router.delete("/projects/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_project(name: str, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)) -> None:
    with state.store.session() as session:
        identity.delete_project(session, name)


# -- users ----------------------------------------------------------------------------------------------------


def _user_view(session: Session, user: User) -> UserView:
    count = len(identity.list_tokens(session, user=user.name))
    return UserView(name=user.name, cluster_admin=user.cluster_admin, tokens=count, created_at=user.created_at)


@router.get("/users", response_model=list[UserView])
def list_users(_: Principal = Depends(cluster_admin), session: Session = Depends(db_session)) -> list[UserView]:
    return [_user_view(session, user) for user in session.scalars(select(User).order_by(User.name))]


@router.post("/users", response_model=UserView, status_code=status.HTTP_201_CREATED)
def create_user(
    request: UserCreate, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)
) -> UserView:
    with state.store.session() as session:
        return _user_view(session, identity.create_user(session, request.name, request.cluster_admin))


@router.delete("/users/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_user(name: str, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)) -> None:
    with state.store.session() as session:
        identity.delete_user(session, name)


# -- tokens ---------------------------------------------------------------------------------------------------


@router.get("/tokens", response_model=list[TokenView])
def list_tokens(
    user: str | None = Query(None, max_length=63),
    of_project: str | None = Query(None, alias="of-project", max_length=63, description="only this project's"),
    _: Principal = Depends(cluster_admin),
    session: Session = Depends(db_session),
) -> list[TokenView]:
    return [TokenView.of(token) for token in identity.list_tokens(session, user=user, project=of_project)]


@router.post("/tokens", response_model=NewToken, status_code=status.HTTP_201_CREATED)
def create_token(
    request: TokenCreate, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)
) -> NewToken:
    expires = identity.parse_duration(request.expires) if request.expires else None
    with state.store.session() as session:
        token, secret = identity.create_token(
            session, request.user, request.project, Role.parse(request.role), expires, request.description
        )
        return NewToken(**TokenView.of(token).model_dump(), secret=secret)


@router.post("/tokens/{token_id}/revoke", response_model=TokenView)
def revoke_token(
    token_id: str, _: Principal = Depends(cluster_admin), state: AppState = Depends(app_state)
) -> TokenView:
    with state.store.session() as session:
        return TokenView.of(identity.revoke_token(session, token_id))


# -- audit ----------------------------------------------------------------------------------------------------


@router.get("/audit", response_model=list[AuditView])
def audit_log(
    limit: int = Query(100, ge=1, le=10000),
    before: int | None = Query(None, ge=1, le=2**62, description="only entries with a smaller id (paging backwards)"),
    all_projects: bool = Query(False, description="cluster admins: every project's entries and cluster changes"),
    caller: Caller = Depends(admin),
    session: Session = Depends(db_session),
) -> list[AuditView]:
    """Newest first. A project admin reads its project's entries; a cluster admin may read everything."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if not (all_projects and caller.principal.cluster):
        query = query.where(AuditEntry.project == caller.project)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    return [AuditView.of(entry) for entry in session.scalars(query)]
