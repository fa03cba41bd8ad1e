"""qemu-img, the one tool that creates, inspects and resizes disk images.

Every call is a short subprocess; a failure raises EngineError with qemu-img's own words, which name the file
and the problem better than anything we could paraphrase.
"""

from __future__ import annotations

import json
import os
import re
import struct
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


def info(path: Path, binary: str = QEMU_IMG, fmt: str | None = None) -> dict[str, Any]:
    """Image facts (format, virtual-size, backing file); a file that is not an image is an InvalidInput.

    ``fmt`` names the format instead of letting qemu-img probe it: always given for a user's file, whose bytes
    could otherwise pass for a format that points at other files (a VMDK descriptor naming /etc/shadow)."""
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist or is not a file", "check the path")
    try:
        out = run(["info", "--output=json", "-U", *(["-f", fmt] if fmt else []), str(path)], binary)
    except EngineError as exc:
        raise InvalidInput(f"{path} is not a readable disk image: {exc.message}", "check the file") from exc
    return json.loads(out)


QCOW_MAGIC = b"QFI\xfb"
MIN_RAW_SIZE = 1 << 20
IMPORT_FORMATS = ("raw", "qcow2")
# qcow2 incompatible feature bits: 0 dirty, 1 corrupt, 2 external data file, 3 compression type, 4 extended L2.
_QCOW2_KNOWN_INCOMPATIBLE = 0b11111
_QCOW2_DATA_FILE_BIT = 1 << 2
_QCOW2_CORRUPT_BIT = 1 << 1
_QCOW2_RAW_DATA_AUTOCLEAR = 1 << 1
_QCOW2_EXT_END = 0
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # version 2 header, 72 bytes


def detect_format(path: Path) -> str:
    """qcow2 if the file starts with its magic, else raw: the only two formats a user's file may be."""
    with path.open("rb") as handle:
        return "qcow2" if handle.read(4) == QCOW_MAGIC else "raw"


def qcow2_header_problem(head: bytes) -> str | None:
    """What in a qcow2 header would make QEMU open another file, or is not understood; None if it stands alone.

    Read before qemu-img sees the file: even `qemu-img info` opens an external data file it names."""
    if len(head) < _QCOW2_HEADER.size:
        return "its qcow2 header is truncated"
    (magic, version, backing_offset, backing_size, cluster_bits, _size, crypt_method, *_rest) = _QCOW2_HEADER.unpack(
        head[: _QCOW2_HEADER.size]
    )
    if magic != QCOW_MAGIC or version not in (2, 3) or not 9 <= cluster_bits <= 21:
        return "its qcow2 header is not one qemu-img writes (version or cluster size)"
    if backing_offset or backing_size:
        return "it has a backing file"
    if crypt_method:
        return "it is encrypted"
    extensions = 72
    if version == 3:
        if len(head) < 104:
            return "its qcow2 header is truncated"
        incompatible, _compatible, autoclear = struct.unpack(">QQQ", head[72:96])
        (header_length,) = struct.unpack(">I", head[100:104])
        if incompatible & _QCOW2_DATA_FILE_BIT or autoclear & _QCOW2_RAW_DATA_AUTOCLEAR:
            return "it uses an external data file"
        if incompatible & _QCOW2_CORRUPT_BIT:
            return "its qcow2 header marks the image corrupt"
        if incompatible & ~_QCOW2_KNOWN_INCOMPATIBLE:
            return "it uses qcow2 features this server does not know"
        extensions = header_length
    for _ in range(64):  # header extensions, each 8-byte aligned, until the end marker
        if extensions + 8 > len(head):
            return "its qcow2 header extensions are truncated"
        kind, length = struct.unpack(">II", head[extensions : extensions + 8])
        if kind == _QCOW2_EXT_END:
            return None
        if kind in (_QCOW2_EXT_DATA_FILE, _QCOW2_EXT_BACKING_FORMAT):
            return "it names another file (an external data file or a backing file's format)"
        extensions += 8 + ((length + 7) & ~7)
    return "its qcow2 header has too many extensions"


def _names_a_file(facts: dict[str, Any]) -> bool:
    """Anything in qemu-img's facts that refers to another file (checked again after the header)."""
    if facts.get("backing-filename") or facts.get("full-backing-filename") or facts.get("backing-filename-format"):
        return True
    data = (facts.get("format-specific") or {}).get("data") or {}
    return any(key in data for key in ("data-file", "data-file-raw", "encrypt"))


def check_importable(
    path: Path, binary: str = QEMU_IMG, fmt: str | None = None, label: str | None = None
) -> dict[str, Any]:
    """A user's file must be a sound raw or qcow2 disk image that reads no other file.

    The format is given (``fmt``) or taken from the magic (qcow2, else raw), never probed by qemu-img, and every
    later qemu-img call gets it with -f. A raw file must at least look like a disk (whole sectors, at least
    1 MiB); a qcow2 file must not name a backing file, an external data file, or be encrypted. ``label`` is what
    messages call the file (an upload id or a plain name; never a host path for a remote caller)."""
    name = label or str(path)
    if fmt is not None and fmt not in IMPORT_FORMATS:
        raise InvalidInput(f"format {fmt!r} cannot be imported", "convert it to raw or qcow2 first")
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
        size = os.fstat(handle.fileno()).st_size
    detected = "qcow2" if head[:4] == QCOW_MAGIC else "raw"
    if fmt is None:
        fmt = detected
    elif fmt == "raw" and detected == "qcow2":
        raise InvalidInput(
            f"{name} starts with a qcow2 header but was given as raw", "import it as qcow2, or leave the format out"
        )
    elif fmt == "qcow2" and detected != "qcow2":
        raise InvalidInput(f"{name} is not a qcow2 image", "import it as raw, or leave the format out")
    if fmt == "qcow2":
        problem = qcow2_header_problem(head)
        if problem and problem.startswith("its qcow2 header"):
            raise InvalidInput(f"{name} is a corrupt qcow2 image: {problem}", "check the file")
        if problem:
            raise InvalidInput(
                f"{name} cannot be imported: {problem}",
                "import a standalone image: `qemu-img convert -O qcow2` it first",
            )
    else:
        if size < MIN_RAW_SIZE or size % 512:
            raise InvalidInput(
                f"{name} is not a disk image ({size} bytes of raw data)",
                "give a qcow2 image, or a raw disk image of whole 512-byte sectors and at least 1 MiB",
            )
    try:
        facts = info(path, binary, fmt)
    except InvalidInput as exc:
        raise InvalidInput(
            f"{name} is a corrupt qcow2 image" if fmt == "qcow2" else f"{name} is unreadable", "check the file"
        ) from exc
    if facts.get("format") != fmt or _names_a_file(facts):
        raise InvalidInput(
            f"{name} cannot be imported: it refers to another file",
            "import a standalone image: `qemu-img convert -O qcow2` it first",
        )
    if fmt == "qcow2":
        try:
            run(["check", "-q", "-f", "qcow2", str(path)], binary)
        except EngineError as exc:
            raise InvalidInput(f"{name} is a corrupt qcow2 image", "check the file") from exc
    facts["format"] = fmt
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


def convert(source: Path, dest: Path, dest_format: str, binary: str, source_format: str) -> None:
    """A full, independent copy (image import). ``source_format`` is the one the check accepted: probing a
    user's file again here could read it as another format. The target is made 0600 before qemu-img writes it,
    so the copy is never readable by others, not even for a moment."""
    if source_format not in IMPORT_FORMATS:
        raise InvalidInput(f"format {source_format!r} cannot be imported", "convert it to raw or qcow2 first")
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    run(["convert", "-q", "-f", source_format, "-O", dest_format, str(source), str(dest)], binary, timeout=3600)


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
