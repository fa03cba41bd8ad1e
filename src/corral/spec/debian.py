"""The inputs of a Debian image recipe as the control plane checks them (release, packages, size), before a
job is written: plain validation, so it sits in spec/ where the control plane may import it; the builder
(corral.images.debian) re-checks with the same functions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from corral.errors import InvalidInput

DEFAULT_RELEASE = "bookworm"
DEFAULT_SIZE = 4 << 30
MIN_SIZE = 2 << 30
MAX_SIZE = 2 << 40
ROLLING_RELEASES = ("sid", "unstable", "experimental")
_RELEASE = re.compile(r"[a-z][a-z0-9-]{1,30}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")


def validate_release(release: str) -> str:
    """A Debian release name debootstrap knows (`bookworm`, `trixie`, `sid`, ...)."""
    if not isinstance(release, str) or not _RELEASE.fullmatch(release):
        raise InvalidInput(f"invalid Debian release {release!r}", "use a release code name such as 'bookworm'")
    if _DEBOOTSTRAP_SCRIPTS.is_dir() and not (_DEBOOTSTRAP_SCRIPTS / release).exists():
        raise InvalidInput(f"debootstrap does not know the release {release!r}", "use e.g. 'bookworm' or 'trixie'")
    return release


def validate_packages(packages: Sequence[str]) -> list[str]:
    """Extra package names, checked against Debian's naming rule, de-duplicated and sorted (for the hash)."""
    if isinstance(packages, str):
        packages = [p for p in packages.split(",") if p.strip()]
    names = sorted({p.strip() for p in packages})
    bad = [n for n in names if not _PACKAGE.fullmatch(n)]
    if bad:
        raise InvalidInput(
            f"invalid package name{'s' if len(bad) > 1 else ''}: {', '.join(repr(b) for b in bad)}",
            "Debian package names are lowercase letters, digits, '+', '-' and '.', e.g. 'vim,curl'",
        )
    return names


def validate_size(size: int) -> int:
    """The root disk size in bytes: room for the system plus some space to work in."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidInput(f"invalid image size {size!r}", "give a size in bytes, e.g. 4G")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidInput(
            f"image size {size >> 20} MiB is out of range",
            f"use between {MIN_SIZE >> 30} GiB and {MAX_SIZE >> 40} TiB (the guest can grow it later)",
        )
    if size % (1 << 20):
        raise InvalidInput(f"image size {size} is not a whole number of MiB", "use e.g. 4G or 4096M")
    return size
