"""The "tiny" guest image: Debian's cloud kernel, a busybox userland and Debian's qemu-guest-agent.

It boots to a guest agent in a few seconds under TCG and is what tests, benchmarks and demos run. The
output is a direct-kernel-boot image (`-kernel/-initrd/-append`) plus an ext4 root disk:

* `vmlinuz` - the kernel from `linux-image-<abi>-cloud-amd64` (downloaded and unpacked, never installed);
* `initrd.img` - an uncompressed newc cpio with busybox, the virtio/ACPI modules the cloud kernel builds
  as modules, and `guest/initramfs/init`, which loads them and switches to the root disk;
* `rootfs.qcow2` - ext4 (made with `mkfs.ext4 -d`, no loop mounts, so no privileges beyond file access)
  with busybox init, the scripts under `guest/rootfs/` and qemu-ga with the host's copies of its libraries;
* `image.json` - what the host needs to boot it (`kind: kernel`, file names, cmdline) and provenance.

Builds are cached under `<cache>/tiny/<recipe_hash>/`: the hash covers every input (package versions, the
guest scripts, the module list, the builder version), so a changed input builds a new image and an unchanged
one costs only a few file links. A build happens in a temporary directory renamed into place at the end, so
an interrupted build never leaves a half-made cache entry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError
from corral.images import debpkg
from corral.images.debpkg import DebPackage, PackageError

#: Bump when the builder's output changes for the same inputs (it is part of the recipe hash).
BUILDER_VERSION = "tiny-1"

#: Guest-side scripts copied into the images, shipped as package data.
GUEST_DIR = Path(__file__).with_name("guest")

#: Modules the initramfs loads (plus their dependencies). ext4 is built into the cloud kernel. virtio_mmio
#: lets the same image boot on microvm (no PCI bus; its virtio devices are found through ACPI, as the cloud
#: kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); on q35/pc it finds no device and costs nothing measurable.
MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_balloon",
    "button",
    "evdev",
)

#: Kernel command line; the host appends `corral.hostname=NAME` (and optionally `corral.machine_id=HEX32`).
CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1"

#: Size of the root filesystem (the guest sees this disk size unless the host grows its overlay).
ROOTFS_SIZE = "128M"

BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_BINARY = "usr/sbin/qemu-ga"
ARTIFACTS = ("vmlinuz", "initrd.img", "rootfs.qcow2", "image.json")

Progress = Callable[[float, str], None]


class ImageBuildError(CorralError):
    """Building the tiny image failed; `message` says what failed and `hint` what to do about it.

    A CorralError (hence an Exception) so the CLI and API report it as one line with its hint.
    """

    code = "image-build-failed"


@dataclass(frozen=True)
class TinyImage:
    """Paths of a built tiny image in its destination directory, and how to boot it."""

    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    recipe_hash: str


@dataclass(frozen=True)
class _Packages:
    """The three packages an image is made of, pinned to the versions apt offers right now."""

    kernel: DebPackage
    busybox: DebPackage
    agent: DebPackage

    @property
    def kernel_version(self) -> str:
        """The kernel ABI name (`6.1.0-56-cloud-amd64`), which is also its modules directory name."""
        return self.kernel.name.removeprefix("linux-image-")

    def all(self) -> list[DebPackage]:
        return [self.kernel, self.busybox, self.agent]


# --- public entry point -------------------------------------------------------------------------------------


def build_tiny_image(dest: Path, cache: Path, progress: Progress | None = None) -> TinyImage:
    """Build (or reuse from `cache`) the tiny image and place its files in `dest`.

    Resolves the current package versions, computes the recipe hash and, when `<cache>/tiny/<hash>` does not
    exist yet, builds it there. The artifacts are then hard-linked into `dest` (copied across filesystems).
    Cached artifacts are made read-only: they may be shared by links, so treat them as immutable (boot from
    a qcow2 overlay, never from `rootfs.qcow2` itself). Raises ImageBuildError with a hint on any failure.
    """
    report = progress or (lambda _f, _m: None)
    dest, cache = Path(dest), Path(cache)
    try:
        for attempt in range(2):
            report(0.0, "resolving package versions")
            packages = _resolve_packages(cache)
            recipe_hash = _recipe_hash(packages)
            built = cache / "tiny" / recipe_hash
            if (built / "image.json").is_file():
                break
            try:
                _build(built, packages, cache, report)
                break
            except debpkg.DownloadError:
                # A download 404 usually means stale package lists (a newer version replaced the old one
                # on the mirror): refresh them once and re-resolve, which also changes the recipe hash.
                if attempt:
                    raise
                report(0.05, "refreshing apt package lists")
                debpkg.update_package_lists()
        report(0.97, "installing image files")
        _install(built, dest)
    except PackageError as exc:
        raise ImageBuildError(exc.message, exc.hint) from exc
    except OSError as exc:
        raise ImageBuildError(
            f"cannot write the tiny image ({exc})", f"check free space and permissions of {cache} and {dest}"
        ) from exc
    report(1.0, "tiny image ready")
    return TinyImage(
        kernel=dest / "vmlinuz",
        initrd=dest / "initrd.img",
        rootfs=dest / "rootfs.qcow2",
        cmdline=CMDLINE,
        recipe_hash=recipe_hash,
    )


# --- inputs and recipe --------------------------------------------------------------------------------------


def _resolve_packages(cache: Path) -> _Packages:
    """Ask apt which versions it would download now, memoized while apt's state files are unchanged.

    Each `apt-cache` call costs ~0.5 s here; the memo is what makes a warm build take milliseconds.
    An empty apt list directory (fresh container) triggers one `apt-get update`.
    """
    memo_file = cache / "tiny" / "apt-resolve.json"
    fingerprint = debpkg.apt_state_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        memo = json.loads(memo_file.read_text())
        if memo["fingerprint"] == fingerprint:
            return _Packages(**{role: DebPackage(**pkg) for role, pkg in memo["packages"].items()})
    if debpkg.package_lists_empty():
        debpkg.update_package_lists()
        fingerprint = debpkg.apt_state_fingerprint()
    kernel_name = debpkg.resolve_dependency(debpkg.CLOUD_KERNEL_METAPACKAGE, "linux-image-")
    versions = debpkg.candidate_versions([kernel_name, BUSYBOX_PACKAGE, AGENT_PACKAGE])
    missing = [n for n in (kernel_name, BUSYBOX_PACKAGE, AGENT_PACKAGE) if n not in versions]
    if missing:
        raise PackageError(
            f"apt offers no version of {', '.join(missing)}",
            "run `apt-get update`; is Debian's main component in /etc/apt/sources.list*?",
        )
    packages = _Packages(
        kernel=DebPackage(kernel_name, versions[kernel_name]),
        busybox=DebPackage(BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE]),
        agent=DebPackage(AGENT_PACKAGE, versions[AGENT_PACKAGE]),
    )
    memo = {
        "fingerprint": fingerprint,
        "packages": {role: vars(getattr(packages, role)) for role in ("kernel", "busybox", "agent")},
    }
    _write_atomic(memo_file, json.dumps(memo, indent=2).encode())
    return packages


def guest_files() -> dict[str, Path]:
    """The guest scripts by their path relative to GUEST_DIR (`rootfs/etc/inittab`, `initramfs/init`...)."""
    return {
        p.relative_to(GUEST_DIR).as_posix(): p
        for p in sorted(GUEST_DIR.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def recipe(packages: _Packages) -> dict[str, object]:
    """Everything that determines the image's content; its hash names the cache entry."""
    return {
        "builder": BUILDER_VERSION,
        # The builder's own code too, so an edit can never be served a cache entry built by older code.
        "builder_source": _source_digest(),
        "packages": [p.spec for p in packages.all()],
        "guest": {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in guest_files().items()},
        "modules": list(MODULES),
        "cmdline": CMDLINE,
        "rootfs_size": ROOTFS_SIZE,
    }


def _source_digest() -> str:
    h = hashlib.sha256()
    for module in (Path(__file__), Path(debpkg.__file__)):
        h.update(module.read_bytes())
    return h.hexdigest()


def _recipe_hash(packages: _Packages) -> str:
    blob = json.dumps(recipe(packages), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- building -----------------------------------------------------------------------------------------------


def _build(final: Path, packages: _Packages, cache: Path, report: Progress) -> None:
    """Build every artifact in a private temporary directory, then rename it to `final` in one step."""
    final.parent.mkdir(parents=True, exist_ok=True)
    debpkg.remove_abandoned_dirs(final.parent, ".tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{final.name}-", dir=final.parent))
    try:
        report(0.1, f"downloading {', '.join(p.spec for p in packages.all())}")
        debs = debpkg.download(packages.all(), cache / "debs")
        work = tmp / "work"
        trees = {}
        for i, (role, deb) in enumerate(zip(("kernel", "busybox", "agent"), debs, strict=True)):
            report(0.25 + 0.05 * i, f"unpacking {deb.name}")
            trees[role] = work / role
            debpkg.extract(deb, trees[role])
        _build_artifacts(tmp, work, trees, debs[2], packages, report)
        shutil.rmtree(work)
        for name in ARTIFACTS:
            (tmp / name).chmod(0o444)
        tmp.chmod(0o755)  # mkdtemp made it private; the cache entry is meant to be readable
        if final.exists() and not (final / "image.json").is_file():
            shutil.rmtree(final)  # damaged by hand: the rename below replaces it
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "image.json").is_file():  # not just a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_artifacts(
    out: Path, work: Path, trees: dict[str, Path], agent_deb: Path, packages: _Packages, report: Progress
) -> None:
    """Turn the unpacked packages into vmlinuz, initrd.img, rootfs.qcow2 and image.json inside `out`."""
    version = packages.kernel_version
    vmlinuz = trees["kernel"] / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        raise PackageError(f"{packages.kernel.name} has no /boot/vmlinuz-{version}", "delete its cached .deb")
    shutil.copyfile(vmlinuz, out / "vmlinuz")

    report(0.4, "ordering kernel modules")
    modules = debpkg.resolve_modules(trees["kernel"] / "lib" / "modules" / version, MODULES)
    busybox = trees["busybox"] / "bin" / "busybox"
    applets = _busybox_applets(busybox)

    report(0.5, "writing initrd.img")
    (out / "initrd.img").write_bytes(_initramfs(busybox, applets, modules))

    report(0.6, "assembling the root filesystem")
    root = work / "rootfs"
    _populate_rootfs(root, busybox, applets, trees["agent"], agent_deb)
    report(0.75, "making the ext4 root filesystem")
    raw = work / "rootfs.raw"
    # -b 4096 -I 256: the "small" defaults mke2fs picks for 128M (1 KiB blocks, 128-byte inodes) make the
    # kernel warn that timestamps end in 2038. No lazy init: otherwise every guest's first boot spends a
    # kernel thread writing zeroed inode tables into its own overlay.
    mkfs_options = ["-q", "-F", "-b", "4096", "-I", "256", "-L", "corral-root"]
    mkfs_options += ["-E", "lazy_itable_init=0,lazy_journal_init=0"]
    _tool(
        ["mkfs.ext4", *mkfs_options, "-d", str(root), str(raw), ROOTFS_SIZE],
        "make the ext4 root filesystem",
        "is e2fsprogs >= 1.43 installed (mkfs.ext4 -d)?",
    )
    report(0.85, "converting the root filesystem to qcow2")
    _tool(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "rootfs.qcow2")],
        "convert the root filesystem to qcow2",
        "is qemu-utils installed?",
    )
    manifest = {
        "kind": "kernel",
        "name": "tiny",
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "rootfs": "rootfs.qcow2",
        "rootfs_format": "qcow2",
        "cmdline": CMDLINE,
        "recipe_hash": _recipe_hash(packages),
        "kernel_version": version,
        "packages": {p.name: p.version for p in packages.all()},
        "modules": [name for name, _ in modules],
        "builder": BUILDER_VERSION,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (out / "image.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _tool(argv: list[str], what: str, hint: str) -> None:
    """Run a build tool; a failure becomes an ImageBuildError quoting the tool's own complaint."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"cannot {what}: {argv[0]} not found", hint) from exc
    if proc.returncode != 0:
        detail = " / ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
        raise ImageBuildError(f"cannot {what} ({argv[0]}: {detail})", hint)


def _busybox_applets(busybox: Path) -> list[str]:
    """Install paths of busybox's applets (`sbin/init`, `usr/bin/[`...), asked from the binary itself."""
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    applets = [line.strip() for line in proc.stdout.splitlines() if "/" in line]
    if proc.returncode != 0 or "sbin/init" not in applets:
        raise ImageBuildError(
            f"cannot list the applets of {busybox}", "the busybox-static package must be for this host's CPU"
        )
    return applets


# --- initramfs ----------------------------------------------------------------------------------------------


class Cpio:
    """Writer for the `newc` cpio format the kernel unpacks as its initramfs.

    Written in Python rather than with `cpio -o` so that device nodes (the kernel needs /dev/console before
    /init runs) can be added without root or mknod, and so that the archive is reproducible (mtime 0).
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks += [header, name.encode() + b"\0", _pad4(len(header) + len(name) + 1), data]
        self._chunks.append(_pad4(len(data)))

    def mkdir(self, name: str) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(name))
        self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.mkdir(os.path.dirname(name))
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdir(os.path.dirname(name))
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        """The archive with its trailer."""
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _initramfs(busybox: Path, applets: list[str], modules: list[tuple[str, bytes]]) -> bytes:
    """The initramfs: busybox and its applet links, the modules in load order, and /init.

    Left uncompressed (2.7 MB; gzip makes it 1.2 MB): measured boot times were the same either way,
    and the cached file is shared by hard links, so the size hardly matters.
    """
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "newroot", "etc", "lib/modules"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    for name, elf in modules:
        cpio.file(f"lib/modules/{name}.ko", elf)
    cpio.file("etc/corral-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    cpio.file("init", (GUEST_DIR / "initramfs" / "init").read_bytes(), 0o755)
    return cpio.getvalue()


# --- root filesystem ----------------------------------------------------------------------------------------


def _populate_rootfs(root: Path, busybox: Path, applets: list[str], agent_tree: Path, agent_deb: Path) -> None:
    """Lay out the root filesystem tree that `mkfs.ext4 -d` copies into the image."""
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "home", "var/lib", "var/log", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    (root / "var" / "run").symlink_to("../run")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in applets:
        link = root / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for rel, src in guest_files().items():
        if rel.startswith("rootfs/"):
            _install_guest_file(src, root / rel.removeprefix("rootfs/"))
    agent = root / AGENT_BINARY
    agent.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(agent_tree / AGENT_BINARY, agent)
    _copy_shared_libraries(agent_tree / AGENT_BINARY, root, agent_deb)


def _install_guest_file(src: Path, dst: Path) -> None:
    """Copy a guest script, replacing any busybox link, executable iff it starts with `#!`.

    Modes are decided here rather than trusted from the package data, because wheels and sdists do not
    reliably keep executable bits.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    data = src.read_bytes()
    dst.write_bytes(data)
    mode = 0o755 if data.startswith(b"#!") else 0o644
    if dst.name == "shadow":
        mode = 0o600
    dst.chmod(mode)


def _copy_shared_libraries(binary: Path, root: Path, deb: Path) -> None:
    """Copy the host's copies of the libraries `binary` links, and the dynamic loader, into `root`.

    Debian's qemu-ga is dynamically linked; the host (also Debian 12) has ABI-compatible libraries, which
    saves downloading and unpacking half a dozen more packages. A library missing on the host is reported
    with the package to install.
    """
    libs = _ldd(binary)
    missing = [soname for soname, path in libs.items() if path is None]
    if missing:
        depends = debpkg.depends_names(debpkg.deb_field(deb, "Depends"))
        packages = sorted({debpkg.guess_package_for_soname(s, depends) for s in missing})
        raise ImageBuildError(
            f"{binary.name} needs {', '.join(missing)}, which this host does not have",
            f"install it with `apt-get install {' '.join(packages)}`",
        )
    for path in libs.values():
        assert path is not None
        target = root / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), target)


def _ldd(binary: Path) -> dict[str, Path | None]:
    """Map each library `binary` needs (and the loader) to its host path, or None when not found."""
    proc = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, check=False, env={**os.environ, "LC_ALL": "C"}
    )
    if proc.returncode != 0 and "not found" not in proc.stdout:
        raise ImageBuildError(f"cannot list the libraries of {binary.name} (ldd: {proc.stderr.strip()})")
    libs: dict[str, Path | None] = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if m := re.match(r"(\S+) => not found", line):
            libs[m.group(1)] = None
        elif m := re.match(r"(\S+) => (/\S+) \(0x", line):
            libs[m.group(1)] = Path(m.group(2))
        elif m := re.match(r"(/\S+) \(0x", line):
            libs[m.group(1)] = Path(m.group(1))
    return libs


# --- installing into dest -----------------------------------------------------------------------------------


def _install(built: Path, dest: Path) -> None:
    """Hard-link the cached artifacts into `dest` (copy when linking fails, e.g. across filesystems)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        src, dst = built / name, dest / name
        with contextlib.suppress(OSError):
            if os.path.samefile(src, dst):
                continue
        with _temp_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)


@contextlib.contextmanager
def _temp_path(final: Path) -> Iterator[Path]:
    """A unique sibling path of `final`, removed if the caller fails before renaming it into place."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temp_path(path) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, path)
