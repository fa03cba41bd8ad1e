"""Backups and VM export archives: the names and the archive format, validated once for the API and the agent.

An export is a plain tar: ``manifest.json`` (this module's ``ExportManifest``) and one flattened qcow2 per disk
under ``disks/``. Nothing in an archive is ever extracted by its own name: members are read by the names the
manifest allows and streamed to paths corral chooses, and an archive with any other member (``../x``, an absolute
path, a link, a device) is refused whole, before anything is made.
"""

from __future__ import annotations

import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.errors import InvalidInput

EXPORT_FORMAT = "corral-vm-export"
EXPORT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
EXPORT_SUFFIXES = (".tar", ".tar.gz", ".tgz")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_INTERVAL = 366 * 86400


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w`` or plain seconds, as seconds; zero, negative or absurd is refused."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise InvalidInput(f"interval {text!r} is not a duration", "write it like 30s, 15m, 1h, 1d or 1w") from None
    if not 0 < seconds <= MAX_INTERVAL:
        raise InvalidInput(f"interval {text!r} is out of range", "give more than 0 s and at most a year")
    return seconds


def default_backup_name(kind: str, now: datetime | None = None) -> str:
    """A sortable name when the user gives none: ``full-20250101-120000``."""
    return f"{kind}-{(now or datetime.now(UTC)).strftime('%Y%m%d-%H%M%S')}"


class ExportDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(pattern=r"^disks/disk[0-9]{1,2}\.qcow2$")
    size: int = Field(gt=0, description="virtual size in bytes")
    bytes: int = Field(ge=0, description="length of the qcow2 file in the archive")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExportVM(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    spec: dict[str, Any]


class ExportManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["corral-vm-export"]
    version: Literal[1]
    corral_version: str
    qemu_img_version: str
    created_at: str
    vm: ExportVM
    disks: list[ExportDisk] = Field(min_length=1, max_length=16)


def check_export_path(text: str, must_exist: bool) -> Path:
    """An archive path on the server: absolute, a tar name, and (to export) new, in an existing directory."""
    path = Path(text)
    if not path.is_absolute():
        raise InvalidInput(f"archive path {text!r} is not absolute", "give the full path")
    if must_exist:
        if not path.is_file():
            raise InvalidInput(f"archive {text} does not exist or is not a file", "check the path")
        return path
    if not text.endswith(EXPORT_SUFFIXES):
        raise InvalidInput(f"archive name {path.name!r} does not end with .tar", "name it like VM.tar")
    if not path.parent.is_dir():
        raise InvalidInput(f"directory {path.parent} does not exist", "create it first")
    if path.exists() or path.is_symlink():
        raise InvalidInput(f"{text} already exists", "choose a new file name, or remove the old one")
    return path


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        return f"member {member.name!r} points outside the archive"
    if not member.isreg():
        return f"member {member.name!r} is not a regular file"
    return None


def read_export_manifest(path: Path, label: str | None = None) -> ExportManifest:
    """Open an archive and validate its manifest and its member list; raise InvalidInput naming the problem.

    ``label`` is what messages call the archive when ``path`` is not for the caller's eyes (``/proc/self/fd/N``
    of an upload or an import-directory file opened without following links)."""
    if label is not None:
        try:
            return read_export_manifest(path)
        except InvalidInput as exc:
            message = exc.message.replace(str(path), label)
            for word in ("archive ", "of ", "in "):
                message = message.replace(f"{word}{path.name}", f"{word}{label}")
            raise InvalidInput(message, exc.hint) from None
    if not tarfile.is_tarfile(path):
        raise InvalidInput(f"{path} is not a tar archive", "give a file made by `corral vm export`")
    try:
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
            for member in members:
                problem = _member_problem(member)
                if problem:
                    raise InvalidInput(f"archive {path.name}: {problem}", "the archive was tampered with; export again")
            names = [m.name for m in members]
            if len(set(names)) != len(names):
                raise InvalidInput(f"archive {path.name} holds a member twice", "export again")
            if MANIFEST not in names:
                raise InvalidInput(f"archive {path.name} has no {MANIFEST}", "give a file made by `corral vm export`")
            info = archive.getmember(MANIFEST)
            if info.size > MAX_MANIFEST_BYTES:
                raise InvalidInput(f"{MANIFEST} of {path.name} is too large", "export again")
            handle = archive.extractfile(info)
            assert handle is not None
            raw = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidInput(f"archive {path.name} is unreadable: {exc}", "export again") from exc
    try:
        manifest = ExportManifest.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise InvalidInput(
            f"{MANIFEST} of {path.name} is invalid at {where}: {first['msg']}", "give a file made by `corral vm export`"
        ) from exc
    expected = {MANIFEST, *(disk.file for disk in manifest.disks)}
    if len(expected) != len(manifest.disks) + 1:
        raise InvalidInput(f"{MANIFEST} of {path.name} lists a disk twice", "export again")
    extra = sorted(set(names) - expected)
    missing = sorted(expected - set(names))
    if extra:
        raise InvalidInput(f"archive {path.name} holds an unexpected member {extra[0]!r}", "export again")
    if missing:
        raise InvalidInput(f"archive {path.name} lacks {missing[0]}", "export again")
    sizes = {m.name: m.size for m in members}
    for disk in manifest.disks:
        if sizes[disk.file] != disk.bytes:
            raise InvalidInput(
                f"{disk.file} in {path.name} is {sizes[disk.file]} bytes, the manifest says {disk.bytes}",
                "the archive was truncated or tampered with; export again",
            )
    return manifest
