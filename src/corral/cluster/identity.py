"""Projects, users and API tokens: who may do what, and where.

A project is a tenant with quotas; a user holds tokens; a token binds one user to one project with one role
(admin > operator > viewer). Users marked ``cluster_admin`` carry their token's role into every project, and with
the admin role they manage projects, users and tokens. The daemon's unix socket needs no token: only root can
open it, and root owns the host anyway.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.errors import AlreadyExists, Conflict, InvalidInput, NotFound, Unauthorized
from corral.spec.names import validate_name
from corral.store.models import VM, Image, Network, Project, Template, Token, User, Volume, utcnow

DEFAULT_PROJECT = "default"
TOKEN_PREFIX = "corral_"


class Role(IntEnum):
    """Roles in a project, ordered so that ``have >= need`` is the whole permission check."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidInput(f"unknown role {text!r}", "use admin, operator or viewer") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """The caller of one request, as the API resolved it."""

    user: str
    role: Role
    project: str  # the token's project: the one used when a request names none
    cluster: bool = False  # the role applies in every project (cluster admins, and root on the unix socket)
    token_id: str | None = None

    def role_in(self, project: str) -> Role | None:
        if self.cluster or project == self.project:
            return self.role
        return None


ROOT = Principal(user="root", role=Role.ADMIN, project=DEFAULT_PROJECT, cluster=True)


# -- durations ------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``15m``, ``90s``, ``2w``: how long a token lives."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) <= 0:
        raise InvalidInput(f"invalid duration {text!r}", "write a number and a unit, e.g. 30d, 12h, 15m or 90s")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > 10 * 365 * 86400:
        raise InvalidInput(f"duration {text!r} is longer than 10 years", "pick a shorter expiry")
    return timedelta(seconds=seconds)


# -- projects -------------------------------------------------------------------------------------------------


def get_project(session: Session, name: str) -> Project:
    project = session.get(Project, name)
    if project is None:
        raise NotFound(f"project {name!r} not found", "list projects with `corral project list`")
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.name)))


QUOTA_FIELDS = ("max_vcpus", "max_memory", "max_disk", "max_vms")


def create_project(session: Session, name: str, description: str = "", **quotas: int | None) -> Project:
    validate_name(name, "project name")
    if session.get(Project, name) is not None:
        raise AlreadyExists(f"project {name!r} already exists", "choose another name")
    project = Project(name=name, description=description, **{k: quotas.get(k) for k in QUOTA_FIELDS})
    session.add(project)
    session.flush()
    return project


def update_project(session: Session, name: str, changes: dict[str, object]) -> Project:
    project = get_project(session, name)
    for key, value in changes.items():
        setattr(project, key, value)
    session.flush()
    return project


def delete_project(session: Session, name: str) -> None:
    """Only an empty project goes (its tokens go with it); the default project never does."""
    if name == DEFAULT_PROJECT:
        raise Conflict("the default project cannot be deleted", "delete its resources instead")
    project = get_project(session, name)
    for model, what in (
        (VM, "VMs"),
        (Volume, "volumes"),
        (Image, "images"),
        (Template, "templates"),
        (Network, "networks"),
    ):
        count = session.scalar(select(func.count()).select_from(model).where(model.project == name)) or 0
        if count:
            raise Conflict(f"project {name!r} still has {count} {what}", f"delete them first (`--project {name}`)")
    for token in session.scalars(select(Token).where(Token.project == name)):
        session.delete(token)
    session.delete(project)


# -- users ----------------------------------------------------------------------------------------------------


def get_user(session: Session, name: str) -> User:
    user = session.get(User, name)
    if user is None:
        raise NotFound(f"user {name!r} not found", "list users with `corral user list`")
    return user


def create_user(session: Session, name: str, cluster_admin: bool = False) -> User:
    validate_name(name, "user name")
    if session.get(User, name) is not None:
        raise AlreadyExists(f"user {name!r} already exists", "choose another name")
    user = User(name=name, cluster_admin=cluster_admin)
    session.add(user)
    session.flush()
    return user


def delete_user(session: Session, name: str) -> None:
    """The user and every token it holds: a deleted user's tokens stop working at once."""
    user = get_user(session, name)
    for token in session.scalars(select(Token).where(Token.user == name)):
        session.delete(token)
    session.delete(user)


# -- tokens ---------------------------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """SHA-256 of the whole token. A slow password hash (bcrypt, argon2) protects low-entropy secrets that people
    choose; these tokens are 256 random bits, so no dictionary or brute force can invert a plain SHA-256, and a
    fast hash lets every request be checked by one indexed lookup instead of costing tens of milliseconds."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session, user: str, project: str, role: Role, expires: timedelta | None = None, description: str = ""
) -> tuple[Token, str]:
    """A new token and its secret. The secret is returned here once and never stored."""
    get_user(session, user)
    get_project(session, project)
    token_id = secrets.token_hex(6)
    secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    token = Token(
        id=token_id,
        secret_hash=hash_secret(secret),
        user=user,
        project=project,
        role=role.label,
        description=description,
        expires_at=utcnow() + expires if expires else None,
    )
    session.add(token)
    session.flush()
    return token, secret


def list_tokens(session: Session, user: str | None = None, project: str | None = None) -> list[Token]:
    query = select(Token).order_by(Token.created_at)
    if user:
        query = query.where(Token.user == user)
    if project:
        query = query.where(Token.project == project)
    return list(session.scalars(query))


def revoke_token(session: Session, token_id: str) -> Token:
    token = session.get(Token, token_id)
    if token is None:
        raise NotFound(f"token {token_id!r} not found", "list tokens with `corral token list`")
    token.revoked = True
    session.flush()
    return token


def authenticate(session: Session, secret: str, now: datetime | None = None) -> Principal:
    """The principal a bearer token stands for; Unauthorized if it is unknown, revoked or expired."""
    token = session.scalars(select(Token).where(Token.secret_hash == hash_secret(secret))).first()
    if token is None:
        raise Unauthorized("invalid API token", "create one with `corral token create`, then set CORRAL_TOKEN")
    if token.revoked:
        raise Unauthorized(f"API token {token.id} was revoked", "ask an admin for a new token")
    if token.expires_at is not None and token.expires_at <= (now or utcnow()):
        raise Unauthorized(
            f"API token {token.id} expired at {token.expires_at:%Y-%m-%d %H:%M:%S} UTC", "ask an admin for a new token"
        )
    user = session.get(User, token.user)
    if user is None:
        raise Unauthorized(f"the user of API token {token.id} no longer exists", "ask an admin for a new token")
    return Principal(
        user=user.name,
        role=Role.parse(token.role),
        project=token.project,
        cluster=user.cluster_admin,
        token_id=token.id,
    )
