"""Debian packages as raw material for guest images, without installing anything on the host.

Image builders need a kernel, busybox and qemu-guest-agent exactly as Debian ships them, but must never
install them on the host (a cloud kernel in the host's /boot would be a surprise). So this module only asks
apt *about* packages (`apt-cache`), fetches their `.deb` files (`apt-get download`) and unpacks them into a
scratch directory (`dpkg-deb -x`). It also works out a kernel-module load order from the modules' own
`.modinfo` sections, because the `.deb` ships no `modules.dep` (depmod runs at install time).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The metapackage that always depends on Debian's current cloud kernel.
CLOUD_KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

#: Where apt keeps its package lists; empty after a fresh container build ("apt-get update" never ran).
APT_LISTS_DIR = Path("/var/lib/apt/lists")

#: Files whose change can change what apt resolves a package name to (lists, sources, pins, installed set).
_APT_STATE_PATHS = (
    APT_LISTS_DIR,
    Path("/etc/apt/sources.list"),
    Path("/etc/apt/sources.list.d"),
    Path("/etc/apt/preferences"),
    Path("/etc/apt/preferences.d"),
    Path("/var/lib/dpkg/status"),
)

#: Kernel module file suffixes we can read, most common first.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


class PackageError(Exception):
    """A package could not be resolved, downloaded or unpacked.

    Carries a `hint` telling the user what to do, because the cause is almost always the host's apt setup
    (no package lists, no reachable mirror) rather than a bug.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class DownloadError(PackageError):
    """apt-get download failed: often stale package lists (the mirror dropped that version) or no mirror."""


@dataclass(frozen=True)
class DebPackage:
    """A package name pinned to one version, so that a build downloads exactly what its recipe hashed."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        """The `name=version` form apt-get understands."""
        return f"{self.name}={self.version}"

    @property
    def filename(self) -> str:
        """The file name `apt-get download` gives the .deb (epoch colon URL-encoded, as apt does)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


# --- running apt --------------------------------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, cwd: Path | None = None, what: str, hint: str, error: type[PackageError] = PackageError
) -> str:
    """Run a host tool and return its stdout; turn every failure into a PackageError naming `what`."""
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
        )
    except FileNotFoundError as exc:
        raise error(f"cannot {what}: {argv[0]} is not installed", hint) from exc
    if proc.returncode != 0:
        detail = _useful_stderr(proc.stderr)
        raise error(f"cannot {what} ({argv[0]} exited {proc.returncode}: {detail})", hint)
    return proc.stdout


def _useful_stderr(stderr: str) -> str:
    """Drop apt's harmless `_apt` sandbox warning so the real error is what the user reads."""
    lines = [ln for ln in stderr.strip().splitlines() if "unsandboxed" not in ln and ln.strip()]
    return " / ".join(lines[-3:]) or "no error output"


def package_lists_empty(lists_dir: Path = APT_LISTS_DIR) -> bool:
    """True when apt has no package index at all, i.e. `apt-get update` has never run here."""
    try:
        return not any("_Packages" in p.name for p in lists_dir.iterdir())
    except OSError:
        return True


def update_package_lists() -> None:
    """Run `apt-get update` (needs root and a reachable Debian mirror)."""
    _run(
        ["apt-get", "update"],
        what="update the apt package lists",
        hint="is a Debian mirror reachable, and are you root? try `apt-get update` by hand",
    )


def apt_state_fingerprint() -> str:
    """A cheap digest of everything that decides apt's answers, so resolutions can be memoized.

    `apt-cache` takes ~0.5 s per call on hosts without a binary package cache (Docker images disable it);
    stat-ing a handful of files takes microseconds, which keeps a warm image build well under a second.
    """
    h = hashlib.sha256()
    for base in _APT_STATE_PATHS:
        paths = sorted(base.iterdir()) if base.is_dir() else [base]
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def candidate_versions(names: Iterable[str]) -> dict[str, str]:
    """Map each package name to the version apt would install (`apt-cache policy`'s Candidate)."""
    names = list(names)
    out = _run(
        ["apt-cache", "policy", *names],
        what=f"query apt for {', '.join(names)}",
        hint="run `apt-get update`",
    )
    return parse_policy(out)


def parse_policy(text: str) -> dict[str, str]:
    """Parse `apt-cache policy` output into {name: candidate}; names without a candidate are left out."""
    result: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                result[current] = version
    return result


def resolve_dependency(metapackage: str, prefix: str) -> str:
    """Return the dependency of `metapackage` whose name starts with `prefix` (via `apt-cache depends`).

    Used to turn `linux-image-cloud-amd64` into the versioned `linux-image-6.1.0-NN-cloud-amd64`, whose
    name carries the kernel ABI and therefore the modules directory name.
    """
    out = _run(
        ["apt-cache", "depends", metapackage],
        what=f"resolve {metapackage}",
        hint="is a Debian mirror configured? run `apt-get update`",
    )
    return parse_depends(out, metapackage, prefix)


def parse_depends(text: str, metapackage: str, prefix: str) -> str:
    """Pick the `Depends:` line of `apt-cache depends` output that names a package starting with `prefix`."""
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix) and m.group(1) != metapackage:
            return m.group(1)
    raise PackageError(
        f"{metapackage} has no dependency named {prefix}*",
        "run `apt-get update`; is the Debian main component enabled in /etc/apt/sources.list*?",
    )


def download(packages: Sequence[DebPackage], cache_dir: Path) -> list[Path]:
    """Download the pinned packages' .deb files into `cache_dir`, skipping those already there.

    apt-get download writes into its working directory, so it runs in a private staging directory under
    `cache_dir` and complete files are moved into place afterwards: an interrupted download never leaves a
    truncated .deb that a later build would trust. As root apt warns that the download is "performed
    unsandboxed" because `_apt` cannot write there: harmless, and filtered out of error messages.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (cache_dir / p.filename).is_file()]
    if missing:
        remove_abandoned_dirs(cache_dir, ".download-")
        staging = Path(tempfile.mkdtemp(prefix=f".download-{os.getpid()}-", dir=cache_dir))
        try:
            _run(
                ["apt-get", "download", *(p.spec for p in missing)],
                cwd=staging,
                what=f"download {', '.join(p.spec for p in missing)}",
                hint="is a Debian mirror reachable? run `apt-get update`",
                error=DownloadError,
            )
            for p in missing:
                if not (staging / p.filename).is_file():
                    raise DownloadError(
                        f"apt-get download did not produce {p.filename}", "run `apt-get update` and try again"
                    )
                (staging / p.filename).rename(cache_dir / p.filename)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [cache_dir / p.filename for p in packages]


def remove_abandoned_dirs(parent: Path, prefix: str) -> None:
    """Delete `<prefix><pid>-*` scratch directories whose process is gone (killed mid-build or crashed)."""
    for path in parent.glob(f"{prefix}*"):
        m = re.match(re.escape(prefix) + r"(\d+)-", path.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True if `pid` runs; a zombie counts as gone (a killed builder can stay unreaped for a while)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files (not its maintainer scripts) under `dest` with `dpkg-deb -x`."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(
        ["dpkg-deb", "-x", str(deb), str(dest)],
        what=f"unpack {deb.name}",
        hint="the cached .deb may be truncated: delete it and build again",
    )


def deb_field(deb: Path, field: str) -> str:
    """Read one control field (e.g. Depends) of a .deb file."""
    return _run(
        ["dpkg-deb", "-f", str(deb), field], what=f"read {field} of {deb.name}", hint="delete the cached .deb"
    ).strip()


def depends_names(depends: str) -> list[str]:
    """Package names in a Depends field, without versions, alternatives flattened."""
    names = []
    for part in re.split(r"[,|]", depends):
        name = part.strip().split(" ", 1)[0].split(":", 1)[0]
        if name:
            names.append(name)
    return names


# --- kernel modules -----------------------------------------------------------------------------------------


def read_module(path: Path) -> bytes:
    """Return a kernel module's ELF bytes, decompressing `.ko.xz` (stdlib lzma) or `.ko.zst` (zstd tool).

    The initramfs stores plain `.ko` files so that busybox `insmod` never needs decompression support.
    """
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        try:
            proc = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise PackageError(f"cannot decompress {path.name}", "install zstd (`apt-get install zstd`)") from exc
        if proc.returncode != 0:
            raise PackageError(f"cannot decompress {path.name}", "install zstd (`apt-get install zstd`)")
        return proc.stdout
    return path.read_bytes()


def module_name(path: Path) -> str:
    """`virtio_pci.ko.xz` -> `virtio_pci`."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def elf_section(elf: bytes, wanted: str) -> bytes:
    """Return the contents of section `wanted` of a 64-bit little-endian ELF file (as kernel modules are)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = header(shstrndx)
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = elf.index(b"\0", str_off + name_off)
        if elf[str_off + name_off : end].decode() == wanted:
            return elf[offset : offset + size]
    raise ValueError(f"no {wanted} section")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Parse a module's `.modinfo` section (NUL-separated `key=value` strings) into {key: [values]}."""
    info: dict[str, list[str]] = {}
    for item in elf_section(elf, ".modinfo").split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


def module_depends(elf: bytes) -> list[str]:
    """The modules this one needs loaded first, from its `depends=` string (what depmod would record)."""
    values = modinfo(elf).get("depends", [""])
    return [d for d in values[0].split(",") if d]


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map module name -> file for every module under a `/lib/modules/<version>` tree.

    Names are normalised with `_` because the kernel treats `-` and `_` in module names as equal.
    """
    found: dict[str, Path] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        if path.name.endswith(MODULE_SUFFIXES):
            found[module_name(path).replace("-", "_")] = path
    return found


def load_order(wanted: Sequence[str], deps: dict[str, list[str]]) -> list[str]:
    """Order `wanted` plus everything they depend on so each module comes after its dependencies.

    Depth-first, so the result follows the order of `wanted` as far as dependencies allow, which keeps it
    stable (and the recipe hash with it). Raises ValueError on a missing module or a dependency cycle.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in deps:
            raise ValueError(f"module {name} not found (needed by {' -> '.join(chain) or 'the image'})")
        state[name] = "visiting"
        for dep in deps[name]:
            visit(dep.replace("-", "_"), (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def resolve_modules(modules_dir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """Return `(name, plain ELF bytes)` for `wanted` and their dependencies, in a valid load order.

    Only the modules reachable from `wanted` are read and parsed, so this stays fast on a full
    kernel tree (~1,100 modules).
    """
    index = index_modules(modules_dir)
    elves: dict[str, bytes] = {}
    deps: dict[str, list[str]] = {}
    todo = [w.replace("-", "_") for w in wanted]
    while todo:
        name = todo.pop()
        if name in deps:
            continue
        if name not in index:
            raise PackageError(
                f"kernel module {name} is not in {modules_dir}",
                "the kernel package changed its configuration; update the builder's module list",
            )
        elves[name] = read_module(index[name])
        try:
            deps[name] = [d.replace("-", "_") for d in module_depends(elves[name])]
        except ValueError as exc:
            raise PackageError(f"cannot read {index[name]}: {exc}", "delete the cached kernel .deb") from exc
        todo.extend(deps[name])
    try:
        order = load_order(wanted, deps)
    except ValueError as exc:
        raise PackageError(str(exc), "the kernel's module dependencies changed; update the builder") from exc
    return [(name, elves[name]) for name in order]


def guess_package_for_soname(soname: str, candidates: Iterable[str] = ()) -> str:
    """Best guess at the Debian package that ships a shared library, for "please install X" messages.

    Prefers a name from `candidates` (e.g. the binary's own Depends) that matches Debian's library naming
    policy (`libfoo.so.1` -> `libfoo1`, `libglib-2.0.so.0` -> `libglib2.0-0`), ignoring punctuation;
    otherwise returns the policy name itself.
    """
    base, _, version = soname.partition(".so.")
    policy = f"{base}-{version}" if base[-1:].isdigit() else f"{base}{version}"

    def squash(s: str) -> str:
        return re.sub(r"[-._]", "", s)

    for cand in candidates:
        if squash(cand) == squash(policy):
            return cand
    return policy
