"""The "debian" guest image: a minimal but complete Debian with systemd, cloud-init and qemu-guest-agent.

Unlike the tiny image it is a real distribution a user can log in to and `apt install` into. It is built with
debootstrap from the Debian mirror the host's apt already uses, and booted directly (`-kernel/-initrd/-append`)
with the kernel and initrd taken out of the image, so no bootloader or partition table is needed:

* `vmlinuz`, `initrd.img` - Debian's cloud kernel and an initramfs-tools initrd with the virtio drivers;
* `rootfs.qcow2` - ext4 labelled `corral-root` filling the whole disk (made with `mkfs.ext4 -d`, so no loop
  mounts), with systemd, udev, openssh-server, qemu-guest-agent, cloud-init (NoCloud), sudo and C.UTF-8;
* `image.json` - what the host needs to boot it (`kind: kernel`, file names, cmdline), the recipe and the
  exact package versions installed.

A guest configures itself on first boot from a NoCloud seed (see `corral.images.cloudinit`): the image holds no
SSH host keys, no machine id and no users besides root (locked). Builds are cached under
`<cache>/debian/<recipe_hash>/`, where the hash covers the release, the mirror, the package lists, the disk size
and this builder's source; a build happens in a temporary directory renamed into place at the end.
Downloaded packages are kept in `<cache>/debian/debs/`, so a rebuild with another package list is much faster.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.images import debian_guest
from corral.images.debian_guest import AGENT_DROPIN, CLOUD_CFG, FALLBACK_NETWORK, SSH_DROPIN, WAIT_ONLINE_DROPIN
from corral.images.debian_recipe import (  # noqa: F401 - part of this module's interface
    DEFAULT_RELEASE,
    DEFAULT_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    ROLLING_RELEASES,
    check_mirror,
    host_mirror,
    validate_packages,
    validate_release,
    validate_size,
)
from corral.images.tiny import ImageBuildError

#: Bump when the builder's output changes for the same inputs (it is part of the recipe hash).
BUILDER_VERSION = "debian-1"

#: Installed by debootstrap itself. Kept to packages with plain dependencies: debootstrap's resolver follows
#: Depends only and cannot pick providers of virtual packages (cloud-init's python3-cryptography fails there).
BASE_PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus")

#: Installed with apt inside the new system, after the initramfs configuration is in place (so the kernel's
#: initrd is built with it). systemd-resolved comes last because its postinst replaces /etc/resolv.conf.
LATE_PACKAGES = (
    "linux-image-cloud-amd64",
    "openssh-server",
    "qemu-guest-agent",
    "cloud-init",
    "sudo",
    "locales",
    "iproute2",
    "procps",
    "ca-certificates",
    "e2fsprogs",
    "systemd-resolved",
)

#: Modules the initramfs loads to find the root disk (ext4 is built into the cloud kernel; listing it is harmless).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ext4")

#: Units that only cost boot time or background CPU in a short-lived VM under TCG.
DISABLED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

ROOT_LABEL = "corral-root"

#: `mitigations=off`: the guest's Spectre workarounds protect nothing under TCG and cost time;
#: `net.ifnames=0`: the NIC is eth0 as in the tiny image.
CMDLINE = f"console=ttyS0 root=LABEL={ROOT_LABEL} rw panic=-1 mitigations=off net.ifnames=0"

ARTIFACTS = ("vmlinuz", "initrd.img", "rootfs.qcow2", "image.json")

_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class DebianImage:
    """Paths of a built Debian image in its destination directory, and how to boot it."""

    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    recipe_hash: str


# --- public entry point -------------------------------------------------------------------------------------


def build_debian_image(
    dest: Path,
    cache: Path,
    release: str = DEFAULT_RELEASE,
    packages: Sequence[str] = (),
    size: int = DEFAULT_SIZE,
    progress: Progress | None = None,
) -> DebianImage:
    """Build (or reuse from `cache`) a Debian `release` image with extra `packages` and place it in `dest`.

    `size` is the root disk's size in bytes. Cached artifacts are hard-linked into `dest` and are read-only:
    boot from a qcow2 overlay, never from `rootfs.qcow2` itself. Raises InvalidInput for bad arguments and
    ImageBuildError (with a hint) when the build fails, e.g. when the mirror cannot be reached.
    """
    report = progress or (lambda _f, _m: None)
    dest, cache = Path(dest), Path(cache)
    extra = validate_packages(packages)
    validate_release(release)
    validate_size(size)
    image_recipe = Recipe(release, host_mirror(), host_mirror(archive="debian-security"), tuple(extra), size)
    built = cache / "debian" / image_recipe.hash
    try:
        if not (built / "image.json").is_file():
            _build(built, image_recipe, cache, report)
        report(0.98, "installing image files")
        _install(built, dest)
    except OSError as exc:
        raise ImageBuildError(
            f"cannot write the Debian image ({exc})", f"check free space and permissions of {cache} and {dest}"
        ) from exc
    report(1.0, "Debian image ready")
    return DebianImage(
        kernel=dest / "vmlinuz",
        initrd=dest / "initrd.img",
        rootfs=dest / "rootfs.qcow2",
        cmdline=CMDLINE,
        recipe_hash=image_recipe.hash,
    )


# --- inputs and recipe --------------------------------------------------------------------------------------


def apt_sources(release: str, mirror: str, security_mirror: str) -> str:
    """The guest's sources.list: the release, and for stable releases its -updates and -security suites."""
    lines = [f"deb {mirror} {release} main"]
    if release not in ROLLING_RELEASES:
        lines += [f"deb {mirror} {release}-updates main", f"deb {security_mirror} {release}-security main"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Recipe:
    """The build's inputs. Its `as_dict()` is everything that determines the image's content, and its hash
    names the cache entry.

    Package *versions* are not in it: they are whatever the mirror serves at build time, and are recorded in
    image.json. A new cache entry (e.g. after a point release) needs a changed input or a removed entry.
    """

    release: str
    mirror: str
    security_mirror: str
    packages: tuple[str, ...]
    size: int

    def as_dict(self) -> dict[str, object]:
        return {
            "builder": BUILDER_VERSION,
            # The builder's own code too, so an edit is never served a cache entry built by older code.
            "builder_source": hashlib.sha256(
                Path(__file__).read_bytes() + Path(debian_guest.__file__).read_bytes()
            ).hexdigest(),
            "release": self.release,
            "mirror": self.mirror,
            "security_mirror": self.security_mirror,
            "base_packages": list(BASE_PACKAGES),
            "late_packages": list(LATE_PACKAGES),
            "packages": list(self.packages),
            "size": self.size,
            "cmdline": CMDLINE,
        }

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --- building -----------------------------------------------------------------------------------------------


def _build(final: Path, image_recipe: Recipe, cache: Path, report: Progress) -> None:
    """Build every artifact in a private temporary directory, then rename it to `final` in one step."""
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the Debian image needs root (debootstrap and chroot)", "run the build as root (sudo)"
        )
    release, mirror = image_recipe.release, image_recipe.mirror
    report(0.0, f"checking the Debian mirror {mirror}")
    check_mirror(mirror, release)
    _ensure_debootstrap(report)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{final.name}-", dir=final.parent))
    root = tmp / "root"
    try:
        debs = cache / "debian" / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        _debootstrap(root, release, mirror, debs, report)
        report(0.55, "configuring the system")
        _configure(root, release, mirror, image_recipe.security_mirror)
        packages = [*LATE_PACKAGES, *image_recipe.packages]
        report(0.6, f"installing {', '.join(packages)}")
        _apt_install(root, packages, debs, report)
        report(0.75, "cleaning up")
        _finalize(root)
        _make_artifacts(tmp, root, image_recipe, report)
        _remove_tree(root)
        for name in ARTIFACTS:
            (tmp / name).chmod(0o444)
        tmp.chmod(0o755)
        if final.exists() and not (final / "image.json").is_file():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "image.json").is_file():
                raise
    finally:
        _remove_tree(tmp)


def _remove_abandoned(parent: Path) -> None:
    """Delete temporary build directories of builds whose process is gone (interrupted or killed)."""
    for entry in parent.glob(".tmp-*"):
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove_tree(entry)


def _ensure_debootstrap(report: Progress) -> None:
    if shutil.which("debootstrap"):
        return
    report(0.01, "installing debootstrap on the host")
    _run(
        ["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"],
        "install debootstrap",
        "install it by hand: apt-get install debootstrap (needs root)",
    )


def _debootstrap(root: Path, release: str, mirror: str, debs: Path, report: Progress) -> None:
    """Run debootstrap, turning its `I: Retrieving/Extracting/...` lines into progress between 5% and 55%."""
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        f"--cache-dir={debs.resolve()}",
        release,
        str(root),
        mirror,
    ]
    expected_lines = 520.0  # measured: debootstrap's output for bookworm with BASE_PACKAGES
    lines: list[str] = []
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **_CHROOT_ENV},
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(("I: ", "W: ", "E: ")):
                report(0.05 + 0.5 * min(1.0, len(lines) / expected_lines), f"debootstrap: {line[3:].strip()}")
    if proc.returncode != 0:
        errors = [ln for ln in lines if ln.startswith("E:")] or lines[-3:]
        log = root / "debootstrap" / "debootstrap.log"
        with contextlib.suppress(OSError):
            errors += [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-2:]
        raise ImageBuildError(
            f"debootstrap failed ({' / '.join(errors[-4:]) or f'exit code {proc.returncode}'})",
            f"is {mirror} reachable and complete, and does it carry {release}?",
        )


def _configure(root: Path, release: str, mirror: str, security_mirror: str) -> None:
    """Write the image's own configuration before the kernel and the extra packages are installed."""
    files = {
        # Services must never start inside the build chroot.
        "usr/sbin/policy-rc.d": "#!/bin/sh\nexit 101\n",
        "etc/initramfs-tools/conf.d/corral.conf": "# Corral: only the listed modules keep the initrd small\n"
        "MODULES=list\n",
        "etc/initramfs-tools/modules": "".join(f"{m}\n" for m in INITRAMFS_MODULES),
        "etc/fstab": f"LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n",
        "etc/hostname": "debian\n",
        "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        "etc/default/locale": "LANG=C.UTF-8\n",
        "etc/cloud/cloud.cfg.d/90-corral.cfg": CLOUD_CFG,
        "etc/systemd/network/99-corral-dhcp.network": FALLBACK_NETWORK,
        "etc/systemd/system/ssh.service.d/corral.conf": SSH_DROPIN,
        "etc/systemd/system/qemu-guest-agent.service.d/corral.conf": AGENT_DROPIN,
        "etc/systemd/system/systemd-networkd-wait-online.service.d/corral.conf": WAIT_ONLINE_DROPIN,
        "etc/apt/apt.conf.d/90corral": 'APT::Install-Recommends "false";\n',
        "etc/apt/sources.list": apt_sources(release, mirror, security_mirror),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if text.startswith("#!") else 0o644)


def _apt_install(root: Path, packages: list[str], debs: Path, report: Progress) -> None:
    """apt-get install inside the new system; a missing package is named. `debs` is apt's (shared) cache."""
    with _chroot_mounts(root, debs):
        _chroot(root, ["apt-get", "update"], "update the package lists in the image")
        count = 0

        def on_line(line: str) -> None:
            nonlocal count
            if line.startswith(("Get:", "Unpacking", "Setting up")):
                count += 1  # measured: ~270 such lines for bookworm without extra packages
                report(0.6 + 0.1 * min(1.0, count / 280), f"apt: {line.strip()}")

        code, lines = _chroot_stream(root, ["apt-get", "install", "-y", "--no-install-recommends", *packages], on_line)
        if code != 0:
            errors = [ln for ln in lines if ln.startswith("E:")] or lines[-2:]
            raise ImageBuildError(
                f"cannot install {', '.join(packages)} in the image ({' / '.join(errors[-3:])})",
                "check that the package names exist in this Debian release (apt-cache policy NAME)",
            )
        report(0.7, "enabling services")
        _chroot(root, ["systemctl", "enable", "systemd-networkd.service"], "enable systemd-networkd")
        _chroot(root, ["systemctl", "disable", *_existing_units(root, DISABLED_UNITS)], "disable slow units")


def _existing_units(root: Path, units: Sequence[str]) -> list[str]:
    dirs = [root / "lib/systemd/system", root / "usr/lib/systemd/system", root / "etc/systemd/system"]
    return [u for u in units if any((d / u).exists() for d in dirs)]


def _finalize(root: Path) -> None:
    """Remove what must be unique per VM or is only build debris, so every first boot is a clean one."""
    for pattern in ("etc/ssh/ssh_host_*", "var/lib/apt/lists/*_*", "var/cache/apt/archives/*.deb", "var/log/*.log"):
        for path in root.glob(pattern):
            path.unlink()
    for rel in ("usr/sbin/policy-rc.d", "var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"):
        (root / rel).unlink(missing_ok=True)
    # An empty machine-id makes systemd generate one at first boot; clones must not share it.
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    # The build host's resolver config is no business of the guest (systemd-resolved's stub link replaces it).
    resolv = root / "etc/resolv.conf"
    if not resolv.is_symlink():
        resolv.unlink(missing_ok=True)
        resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    shutil.rmtree(root / "var/lib/cloud", ignore_errors=True)


def _make_artifacts(out: Path, root: Path, image_recipe: Recipe, report: Progress) -> None:
    """Copy out the kernel and initrd, make the ext4 disk and qcow2, and write image.json."""
    kernel_version = _kernel_version(root)
    shutil.copyfile(root / "boot" / f"vmlinuz-{kernel_version}", out / "vmlinuz")
    shutil.copyfile(root / "boot" / f"initrd.img-{kernel_version}", out / "initrd.img")
    installed = _installed_packages(root)
    _unmount_below(root)  # mkfs -d must never copy a mounted /proc or /dev
    report(0.8, "making the ext4 root filesystem")
    raw = out / "rootfs.raw"
    size = image_recipe.size
    mkfs_options = ["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-L", ROOT_LABEL]
    mkfs_options += ["-E", "lazy_itable_init=0,lazy_journal_init=0"]
    _run(
        ["mkfs.ext4", *mkfs_options, "-d", str(root), str(raw), f"{size >> 10}k"],
        "make the ext4 root filesystem",
        "is e2fsprogs >= 1.43 installed (mkfs.ext4 -d), and is the image size big enough for the packages?",
    )
    report(0.9, "converting the root filesystem to qcow2")
    _run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "rootfs.qcow2")],
        "convert the root filesystem to qcow2",
        "is qemu-utils installed?",
    )
    raw.unlink()
    manifest = {
        "kind": "kernel",
        "name": "debian",
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "rootfs": "rootfs.qcow2",
        "rootfs_format": "qcow2",
        "cmdline": CMDLINE,
        "recipe_hash": image_recipe.hash,
        "recipe": image_recipe.as_dict(),
        "kernel_version": kernel_version,
        "cloud_init": True,
        "default_user": "corral",
        "packages": installed,
        "builder": BUILDER_VERSION,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (out / "image.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _kernel_version(root: Path) -> str:
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if not kernels or not (root / "boot" / f"initrd.img-{kernels[-1]}").is_file():
        raise ImageBuildError("the image has no kernel and initrd in /boot", "did the kernel package install?")
    return kernels[-1]


def _installed_packages(root: Path) -> dict[str, str]:
    out = _run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"],
        "list the installed packages",
        "is dpkg installed on the host?",
    )
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


# --- running tools ------------------------------------------------------------------------------------------


def _run(argv: list[str], what: str, hint: str) -> str:
    """Run a host tool; a failure becomes an ImageBuildError quoting the tool's own complaint."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError as exc:
        raise ImageBuildError(f"cannot {what}: {argv[0]} not found", hint) from exc
    if proc.returncode != 0:
        detail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]) or f"exit {proc.returncode}"
        raise ImageBuildError(f"cannot {what} ({argv[0]}: {detail})", hint)
    return proc.stdout


def _chroot_stream(root: Path, argv: list[str], on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run `argv` in the chroot, feeding each output line to `on_line`; (exit code, all lines)."""
    lines: list[str] = []
    with subprocess.Popen(
        ["chroot", str(root), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_CHROOT_ENV
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            on_line(line)
    return proc.returncode, lines


def _chroot(root: Path, argv: list[str], what: str) -> None:
    code, lines = _chroot_stream(root, argv, lambda _line: None)
    if code != 0:
        detail = " / ".join(lines[-3:]) or f"exit code {code}"
        raise ImageBuildError(f"cannot {what} ({argv[0]}: {detail})", "is the Debian mirror reachable?")


@contextlib.contextmanager
def _chroot_mounts(root: Path, debs: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside the build chroot, which package scripts (kernel, initramfs) expect, and the
    shared package cache as apt's archive directory so later builds download nothing twice.

    These are plain kernel filesystem and bind mounts, released in all cases; the disk image itself is never
    mounted.
    """
    mounts = [
        (["-t", "proc", "proc"], root / "proc"),
        (["-t", "sysfs", "sysfs"], root / "sys"),
        (["--bind", "/dev"], root / "dev"),
        (["--bind", "/dev/pts"], root / "dev/pts"),
        (["--bind", str(debs.resolve())], root / "var/cache/apt/archives"),
    ]
    try:
        for options, target in mounts:
            target.mkdir(parents=True, exist_ok=True)
            _run(["mount", *options, str(target)], f"mount {target.name} in the build chroot", "are you root?")
        yield
    finally:
        _unmount_below(root)


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root.resolve())
    try:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return []
    return [m for m in mounts if m == prefix or m.startswith(prefix + "/")]


def _unmount_below(root: Path) -> None:
    """Unmount everything mounted at or below `root`, deepest first (debootstrap or we may have left some)."""
    for target in sorted(_mounts_below(root), reverse=True):
        if subprocess.run(["umount", target], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _remove_tree(path: Path) -> None:
    """Delete a build directory, but never through a mount: a leftover bind mount of /dev would otherwise
    take the host's device nodes with it."""
    _unmount_below(path)
    if _mounts_below(path):
        raise ImageBuildError(
            f"cannot unmount the build chroot's filesystems under {path}",
            f"unmount them by hand (grep {path} /proc/mounts), then delete {path}",
        )
    shutil.rmtree(path, ignore_errors=True)


# --- installing into dest -----------------------------------------------------------------------------------


def _install(built: Path, dest: Path) -> None:
    """Hard-link the cached artifacts into `dest` (copy when linking fails, e.g. across filesystems)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        src, dst = built / name, dest / name
        with contextlib.suppress(OSError):
            if os.path.samefile(src, dst):
                continue
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
