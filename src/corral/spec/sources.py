"""Where an import reads its bytes from, and how such a file is opened so that no link leads anywhere else.

Three sources, decided by who asks (see docs/images.md, "Importing over a remote"):

- ``path``: any file of the server's host. Only the local admin (the unix socket, root already) names one.
- ``import-dir``: a plain name in ``import_dir/<project>/``, a directory the administrator configured. The
  project directory and the file are opened without following links and the file must be a regular file.
- ``upload``: bytes a caller streamed to ``POST /uploads``, kept in ``CORRAL_HOME/uploads/<project>/<id>`` (root,
  0600) until an import consumes them or they expire.

Whatever the source, the file is opened once and read through that descriptor (or ``/proc/self/fd/N``, which is the
same open file): nothing reads the path again, so a file swapped for a link after the check is never followed.
Remote callers are never told whether a host path exists: they are refused before anything is looked up.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from corral.errors import Forbidden, InvalidInput, NotFound

TRANSFER_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_BYTES = 255


class SourceKind(StrEnum):
    PATH = "path"
    IMPORT_DIR = "import-dir"
    UPLOAD = "upload"


@dataclass(frozen=True)
class Origin:
    """Who asks, and where this server keeps files: decides which sources a request may name."""

    home: Path
    import_dir: Path | None
    local: bool  # the unix socket: local root, who may name any host path
    expiry: float = 86400.0  # seconds an unused upload is kept (the transfer_expiry setting)


@dataclass(frozen=True)
class Source:
    """A checked source: what the job opens (again without following links) and what messages call it."""

    kind: SourceKind
    path: Path
    label: str  # never a host path for a remote caller: the upload id or the plain name

    def params(self) -> dict[str, str]:
        return {"kind": self.kind.value, "path": str(self.path), "label": self.label}

    @classmethod
    def of(cls, params: dict[str, str]) -> Source:
        return cls(SourceKind(params["kind"]), Path(params["path"]), params["label"])


def uploads_dir(home: Path, project: str) -> Path:
    return home / "uploads" / project


def exports_dir(home: Path, project: str) -> Path:
    return home / "exports" / project


def private_dir(path: Path) -> Path:
    """``path`` and its parent (``uploads/`` or ``exports/`` under the home): root-only directories (0700), made
    on first use and kept so; a link in their place is refused."""
    for directory in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        info = directory.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise InvalidInput(f"{directory.name} under the server's home is not a directory",
                               "the admin must remove it")  # fmt: skip
        if info.st_mode & 0o077:
            directory.chmod(0o700)
    return path


def plain_name(name: str, what: str = "file name") -> str:
    """A name inside one directory: no ``/``, not ``.`` or ``..``, no NUL, at most 255 bytes."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidInput(f"invalid {what} {name[:64]!r}", "give a plain file name (no '/', not '..')")
    return name


def transfer_id(value: str, what: str = "upload id") -> str:
    if not TRANSFER_ID.match(value):
        raise InvalidInput(f"invalid {what} {value[:40]!r}", "give the id that the upload or export answered")
    return value


def expire(directory: Path, max_age: float) -> None:
    """Remove files older than ``max_age`` seconds (unfinished uploads, exports nobody fetched)."""
    if not directory.is_dir():
        return
    cutoff = time.time() - max_age
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)


def open_source(source: Source) -> int:
    """A read-only descriptor of the source's regular file; the caller closes it.

    For the import directory and uploads, neither the file nor its directory may be a link (O_NOFOLLOW on both),
    and FIFOs or devices are refused after the open (O_NONBLOCK, so a FIFO cannot stall the open)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        if source.kind is SourceKind.PATH:
            fd = os.open(source.path, flags)
        else:
            parent = os.open(source.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fd = os.open(source.path.name, flags | os.O_NOFOLLOW, dir_fd=parent)
            finally:
                os.close(parent)
    except OSError as exc:
        raise _open_error(source, exc) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InvalidInput(f"{source.label} is not a regular file", "give a plain file, not a device or a FIFO")
    return fd


def _open_error(source: Source, exc: OSError) -> InvalidInput | NotFound:
    import errno

    if source.kind is SourceKind.UPLOAD:
        return NotFound(f"upload {source.label} not found", "it was used by an import or expired: upload again")
    if source.kind is SourceKind.IMPORT_DIR:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return InvalidInput(
                f"{source.label!r} in the import directory is a link",
                "links are not followed: ask the admin to put the file itself there",
            )
        return NotFound(
            f"no file {source.label!r} in the import directory of this project",
            "ask the admin to put it there, or upload it",
        )
    if exc.errno == errno.ENOENT:
        return InvalidInput(f"{source.label} does not exist or is not a file", "check the path")
    return InvalidInput(f"cannot read {source.label}: {exc.strerror}", "check its permissions")


@contextlib.contextmanager
def opened(source: Source) -> Iterator[tuple[int, Path]]:
    """The open descriptor and its ``/proc/self/fd/N`` name (the same open file, for tools that want a path)."""
    fd = open_source(source)
    try:
        yield fd, Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def resolve(origin: Origin, project: str, *, file: str | None, upload: str | None, what: str) -> Source:
    """Check one source a request names (a host path, an import-directory name, or an upload id) and open it once.

    A remote caller naming a host path is refused before anything is looked up, so the answer tells nothing
    about the host's files."""
    if (file is None) == (upload is None):
        raise InvalidInput(
            f"give the {what} either as a file or as an upload id, not both or neither",
            "upload it first (POST /uploads), then pass its id",
        )
    if upload is not None:
        ident = transfer_id(upload)
        expire(uploads_dir(origin.home, project), origin.expiry)
        source = Source(SourceKind.UPLOAD, uploads_dir(origin.home, project) / ident, f"upload {ident[:12]}")
    else:
        assert file is not None
        if "/" in file or (origin.local and origin.import_dir is None):
            if not origin.local:
                raise Forbidden(
                    f"a {what} cannot be read from a path on the server: that is for the local admin",
                    "upload it (the CLI does so over a remote), or name a file in the import directory",
                )
            path = Path(file)
            if not path.is_absolute():
                raise InvalidInput(f"{what} path {file!r} is not absolute", "give the full path")
            source = Source(SourceKind.PATH, path, f"{what} {file}")
        else:
            name = plain_name(file, f"{what} name")
            if origin.import_dir is None:
                raise InvalidInput(
                    "this server has no import directory",
                    "upload the file instead "
                    "(`corral image import` does so over a remote), or ask the admin to set import_dir",
                )
            source = Source(SourceKind.IMPORT_DIR, origin.import_dir / project / name, name)
    with opened(source):
        pass
    return source
