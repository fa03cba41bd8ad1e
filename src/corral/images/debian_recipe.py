"""The inputs of a Debian image, checked before anything is built: release, packages, size, and the mirror the
host's apt already uses (and whether it answers)."""

from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from corral.images.tiny import ImageBuildError
from corral.spec.debian import (  # noqa: F401 - part of this module's interface
    DEFAULT_RELEASE,
    DEFAULT_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    ROLLING_RELEASES,
    validate_packages,
    validate_release,
    validate_size,
)


def host_mirror(apt_dir: Path = Path("/etc/apt"), archive: str = "debian") -> str:
    """The URL of Debian's `archive` (`debian` or `debian-security`) the host's apt uses, or deb.debian.org's.

    Reads one-line `deb URL suite ...` entries and deb822 `.sources` stanzas; a source counts when its URL's
    last path component is `archive`, which skips third-party repositories.
    """
    for url in _apt_source_urls(apt_dir):
        if url.rstrip("/").rsplit("/", 1)[-1] == archive:
            return url.rstrip("/")
    return f"http://deb.debian.org/{archive}"


def _apt_source_urls(apt_dir: Path) -> Iterator[str]:
    files = [apt_dir / "sources.list"]
    with contextlib.suppress(OSError):
        files += sorted((apt_dir / "sources.list.d").iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.name.endswith(".list"):
            yield from _one_line_urls(text)
        elif path.name.endswith(".sources"):
            yield from _deb822_urls(text)


def _one_line_urls(text: str) -> Iterator[str]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        if rest.startswith("["):  # options such as [arch=amd64 signed-by=...]
            rest = rest.split("]", 1)[1] if "]" in rest else ""
        words = rest.split()
        if words and "://" in words[0]:
            yield words[0]


def _deb822_urls(text: str) -> Iterator[str]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            yield from fields.get("uris", "").split()


def check_mirror(mirror: str, release: str, timeout: float = 15.0) -> None:
    """Fail early and clearly when the mirror is unreachable or lacks `release` (debootstrap fails obscurely)."""
    url = f"{mirror}/dists/{release}/Release"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read(1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ImageBuildError(
                f"the Debian mirror {mirror} has no release {release!r}",
                "check the release name (e.g. bookworm, trixie)",
            ) from exc
        raise ImageBuildError(f"the Debian mirror {mirror} answered HTTP {exc.code} for {url}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageBuildError(
            f"cannot reach the Debian mirror {mirror} ({reason})",
            "check the network (and proxy settings), or the mirror in /etc/apt/sources.list*",
        ) from exc
