"""What an error may tell whom: the trust doors of the API applied to messages.

The local root (unix socket) and cluster-wide callers run the pool, so they get every detail. A project's token is
a tenant: it must not learn where things live on the host, how large the hosts are, or what other projects use.
Messages are written for tenants at their source where they can be (placement's refusals carry a tenant version);
this module is the backstop for the rest: absolute host paths are cut from every problem a tenant receives, and
an unexpected error tells a tenant only an id to quote, its detail going to the daemon's log under that id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.requests import HTTPConnection

from corral.api.auth import LOCAL
from corral.cluster.placement import NoHostOnline, NoRoom
from corral.errors import CorralError

HIDDEN = "[host path]"
# The top directories of a Linux host: an absolute path under one of them is a host path, while API paths
# (/vms/..., /docs, /jobs/...) never start with one.
_ROOTS = (
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt", "nix", "opt", "proc",
    "root", "run", "sbin", "snap", "srv", "sys", "tmp", "usr", "var",
)  # fmt: skip
_PATH_CHARS = r"[^\s'\"`,;:()\[\]{}<>|]"
HOST_PATH = re.compile(rf"(?<![\w.~:/-])/(?:{'|'.join(_ROOTS)})(?=/|\s|$|[^\w.-]){_PATH_CHARS}*")


def insider(connection: HTTPConnection) -> bool:
    """True for callers trusted with host facts: the local root and cluster-wide principals. A caller not yet
    identified (refused before authentication) is not one."""
    if connection.scope.get(LOCAL):
        return True
    who = connection.scope.get("corral.principal")
    return bool(who is not None and who.cluster)


def scrub(text: str, roots: tuple[Path, ...] = ()) -> str:
    """``text`` with every absolute host path replaced by ``[host path]``; ``roots`` (corral's home and cache)
    are cut wherever they are, even outside the usual top directories."""
    for root in roots:
        prefix = str(root).rstrip("/")
        if len(prefix) > 1:
            text = re.sub(rf"{re.escape(prefix)}(?:/{_PATH_CHARS}*)?", HIDDEN, text)
    return HOST_PATH.sub(HIDDEN, text)


def scrub_data(value: Any, roots: tuple[Path, ...] = ()) -> Any:
    """:func:`scrub` applied to every string inside ``value`` (dicts, lists, tuples), for what jobs and events
    carry from the agent: a job's error or log line may quote qemu-img naming a file."""
    if isinstance(value, str):
        return scrub(value, roots)
    if isinstance(value, dict):
        return {key: scrub_data(item, roots) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub_data(item, roots) for item in value)
    return value


def roots_of(connection: HTTPConnection) -> tuple[Path, ...]:
    """corral's home and cache on this host: cut from tenants' answers wherever they are."""
    app = connection.scope.get("app")
    state = getattr(getattr(app, "state", None), "corral", None)
    if state is None:
        return ()
    return (state.settings.home, state.settings.cache)


def for_caller(connection: HTTPConnection, error: CorralError) -> CorralError:
    """The error as ``connection``'s caller may see it: as raised for insiders; for tenants, placement's tenant
    version and no host path in its message or hint."""
    if insider(connection):
        return error
    if isinstance(error, NoRoom | NoHostOnline):
        error = error.for_tenants()
    roots = roots_of(connection)
    message = scrub(error.message, roots)
    hint = scrub(error.hint, roots) if error.hint else error.hint
    if message == error.message and hint == error.hint:
        return error
    shown = CorralError(message, hint)
    shown.http_status, shown.code = error.http_status, error.code  # same kind of answer, fewer words
    return shown


def tell(connection: HTTPConnection, exc: BaseException) -> str:
    """One line for an in-band error (the console's websocket): what :func:`for_caller` allows."""
    if isinstance(exc, CorralError):
        return str(for_caller(connection, exc))
    return str(exc) if insider(connection) else "internal error; see the daemon's log"
