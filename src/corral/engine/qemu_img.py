"""qemu-img, the one tool that creates, inspects and resizes disk images.

Every call is a short subprocess; a failure raises EngineError with qemu-img's own words, which name the file
and the problem better than anything we could paraphrase.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import EngineError, InvalidInput

QEMU_IMG = "qemu-img"
_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def run(args: list[str], binary: str = QEMU_IMG, timeout: float = 600) -> str:
    try:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise EngineError(f"{binary} not found", "install qemu-utils (apt-get install qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"{binary} {args[0]} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise EngineError(f"{binary} {args[0]} failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def info(path: Path, binary: str = QEMU_IMG) -> dict[str, Any]:
    """Image facts (format, virtual-size, backing file); a file that is not an image is an InvalidInput."""
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist or is not a file", "check the path")
    try:
        out = run(["info", "--output=json", "-U", str(path)], binary)
    except EngineError as exc:
        raise InvalidInput(f"{path} is not a readable disk image: {exc.message}", "check the file") from exc
    return json.loads(out)


QCOW_MAGIC = b"QFI\xfb"
MIN_RAW_SIZE = 1 << 20


def check_importable(path: Path, binary: str = QEMU_IMG) -> dict[str, Any]:
    """A user's file must be a sound disk image: qemu-img calls anything raw, so a raw file must at least look
    like a disk (whole sectors, at least 1 MiB) and must not be a qcow2 whose header qemu-img rejected."""
    facts = info(path, binary)
    # A backing file or an external data file would make the copy read another file on this host (anything,
    # /etc/shadow included): an image to import must stand alone.
    if facts.get("backing-filename") or facts.get("full-backing-filename"):
        raise InvalidInput(f"{path} has a backing file ({facts.get('backing-filename')})",
                           "import a standalone image: qemu-img convert -O qcow2 it first")
    if (facts.get("format-specific") or {}).get("data", {}).get("data-file"):
        raise InvalidInput(f"{path} uses an external data file", "import a standalone image")
    if facts.get("format") == "raw":
        with path.open("rb") as handle:
            if handle.read(4) == QCOW_MAGIC:
                raise InvalidInput(f"{path} is a corrupt qcow2 image (its header is unreadable)", "check the file")
        size = path.stat().st_size
        if size < MIN_RAW_SIZE or size % 512:
            raise InvalidInput(
                f"{path} is not a disk image ({size} bytes of raw data)", "give a qcow2 image or a raw disk image"
            )
    check(path, binary)
    return facts


def check(path: Path, binary: str = QEMU_IMG) -> None:
    """Raise unless qemu-img finds the image consistent; only qcow2 has metadata to check."""
    if info(path, binary).get("format") == "qcow2":
        try:
            run(["check", "-q", str(path)], binary)
        except EngineError as exc:
            raise InvalidInput(f"{path} is corrupt: {exc.message}", "rebuild or re-import the image") from exc


def create_overlay(
    path: Path, backing: Path, backing_format: str = "qcow2", size: int | None = None, binary: str = QEMU_IMG
) -> None:
    """A linked disk: instant and small, reading unchanged blocks from ``backing``."""
    args = ["create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_format, str(path)]
    if size is not None:
        args.append(str(size))
    run(args, binary)


def create_blank(path: Path, size: int, binary: str = QEMU_IMG) -> None:
    run(["create", "-q", "-f", "qcow2", str(path), str(size)], binary)


def resize(path: Path, size: int, binary: str = QEMU_IMG) -> None:
    """Grow only: shrinking a disk under a filesystem loses data, so it is refused before qemu-img is asked."""
    current = int(info(path, binary)["virtual-size"])
    if size < current:
        raise InvalidInput(
            f"cannot shrink {path.name} from {current} to {size} bytes", "give a size larger than the current one"
        )
    if size > current:
        run(["resize", "-q", str(path), str(size)], binary)


def convert(source: Path, dest: Path, dest_format: str = "qcow2", binary: str = QEMU_IMG,
            source_format: str | None = None) -> None:
    """A full, independent copy (image import). Give ``source_format`` when known: probing a user's file again
    here could read it differently from the check that accepted it."""
    fmt = ["-f", source_format] if source_format else []
    run(["convert", "-q", *fmt, "-O", dest_format, str(source), str(dest)], binary, timeout=3600)


def copy_with_progress(
    source: Path,
    dest: Path,
    snapshot: str | None = None,
    force_share: bool = False,
    progress: Callable[[float], None] | None = None,
    binary: str = QEMU_IMG,
) -> None:
    """A full, flattened qcow2 copy (optionally of an internal snapshot), reporting qemu-img's own progress."""
    args = [binary, "convert", "-p", "-O", "qcow2"]
    if force_share:
        args.append("-U")
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    args += [str(source), str(dest)]
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise EngineError(f"{binary} not found", "install qemu-utils (apt-get install qemu-utils)") from exc
    assert proc.stdout is not None
    buffer = b""
    while chunk := proc.stdout.read1(256) if hasattr(proc.stdout, "read1") else proc.stdout.read(256):
        buffer = (buffer + chunk)[-256:]
        for match in _PERCENT.findall(buffer.decode(errors="replace"))[-1:]:
            if progress is not None:
                progress(float(match) / 100)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        dest.unlink(missing_ok=True)
        lines = stderr.strip().splitlines()
        raise EngineError(f"copying {source.name} failed: {lines[-1] if lines else 'qemu-img convert failed'}")
