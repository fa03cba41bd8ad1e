"""A small whole-disk image that boots through firmware and its own bootloaders, built without mounting anything.

It is what a user's own disk image looks like to corral (a partition table, a bootloader, a kernel inside the
disk), small enough to build in seconds from the tiny image's kernel, initramfs and root filesystem:

* an MBR partition table (``sfdisk`` on the image file) with syslinux's ``mbr.bin`` in the boot code;
* partition 1, active, type EF: a FAT16 filesystem made in a separate file (``mkfs.fat -h 2048``, so its
  boot sector knows where it lives) and filled with mtools: the kernel, the initramfs, ``syslinux.cfg``
  with ``ldlinux.sys`` installed by ``syslinux --install`` (which works on an unmounted file), and
  ``EFI/BOOT/BOOTX64.EFI``, a standalone GRUB (``grub-mkstandalone -O x86_64-efi``) with its config inside;
* partition 2: the tiny image's ext4 root filesystem.

SeaBIOS runs the MBR code, which chains to syslinux; OVMF finds the ESP's removable-media path and runs GRUB.
Each bootloader adds its own marker to the kernel command line (``corral.bootloader=syslinux`` or
``corral.bootloader=grub-efi``), which corral never passes: seeing it in the guest's /proc/cmdline proves the
disk booted through that firmware and that bootloader, not through corral's direct kernel boot.

Built images are cached under ``<cache>/bootdisk/<recipe hash>/`` (the hash covers this file, the tiny image's
recipe hash and the bootloader packages' versions); a build happens in a temporary directory renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from corral.images.tiny import build_tiny_image

BUILDER_VERSION = "bootdisk-1"
MARKER_BIOS = "corral.bootloader=syslinux"
MARKER_UEFI = "corral.bootloader=grub-efi"
# The tiny image's own command line, with the root on partition 2 instead of the whole disk.
CMDLINE = "console=ttyS0 root=/dev/vda2 rw quiet panic=-1"
SECTOR = 512
ESP_START, ESP_SECTORS = 2048, 64 << 11  # 1 MiB in, 64 MiB
ROOT_START = ESP_START + ESP_SECTORS
DISK_SIZE = 200 << 20
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
# Debian packages the build needs, with the command each provides (checked before anything is made).
TOOLS = {
    "sfdisk": "fdisk",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "grub-mkstandalone": "grub-common",
}
PACKAGES = ("fdisk", "dosfstools", "mtools", "syslinux", "syslinux-common", "grub-efi-amd64-bin", "grub-common")


def missing_tools() -> list[str]:
    """Packages to install before this image can be built (empty when everything is there)."""
    missing = {package for tool, package in TOOLS.items() if shutil.which(tool) is None}
    if not MBR_CODE.is_file():
        missing.add("syslinux-common")
    if not Path("/usr/lib/grub/x86_64-efi/linux.mod").is_file():
        missing.add("grub-efi-amd64-bin")
    return sorted(missing)


def _run(*argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _package_versions() -> dict[str, str]:
    out = _run("dpkg-query", "-W", "-f", "${Package} ${Version}\n", *PACKAGES)
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def build_boot_disk(cache: Path) -> Path:
    """The cached qcow2 disk image (built first when missing); treat it as read-only."""
    with tempfile.TemporaryDirectory(prefix="bootdisk-tiny-") as tiny_dir:
        tiny = build_tiny_image(Path(tiny_dir), cache)
        recipe = {
            "builder": BUILDER_VERSION,
            "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "tiny": tiny.recipe_hash,
            "packages": _package_versions(),
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        final = cache / "bootdisk" / key
        if (final / "disk.qcow2").is_file():
            return final / "disk.qcow2"
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=final.parent))
        try:
            _build(work, tiny.kernel, tiny.initrd, tiny.rootfs)
            (work / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
            work.chmod(0o755)
            try:
                work.rename(final)
            except OSError:
                if not (final / "disk.qcow2").is_file():  # not just a concurrent build that won
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final / "disk.qcow2"


def _build(work: Path, kernel: Path, initrd: Path, rootfs: Path) -> None:
    grub_cfg = work / "grub.cfg"
    grub_cfg.write_text(
        "set timeout=0\n"
        "insmod part_msdos\ninsmod fat\n"
        "search --no-floppy --file --set=root /vmlinuz\n"
        f"linux /vmlinuz {CMDLINE} {MARKER_UEFI}\n"
        "initrd /initrd.img\n"
        "boot\n"
    )
    efi = work / "BOOTX64.EFI"
    _run(
        "grub-mkstandalone",
        "-O",
        "x86_64-efi",
        "-o",
        efi,
        "--locales=",
        "--fonts=",
        "--themes=",
        f"boot/grub/grub.cfg={grub_cfg}",
    )
    syslinux_cfg = work / "syslinux.cfg"
    syslinux_cfg.write_text(
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {CMDLINE} {MARKER_BIOS}\n"
    )
    esp = work / "esp.img"
    # -h: the sectors before the partition, written into the boot sector that syslinux's loader reads.
    _run("mkfs.fat", "-F", "16", "-n", "CORRALBOOT", "-h", str(ESP_START), "-C", esp, str(ESP_SECTORS // 2))
    mtools = ["-i", str(esp)]
    _run("mmd", *mtools, "::/EFI", "::/EFI/BOOT")
    for source, target in (
        (kernel, "/vmlinuz"),
        (initrd, "/initrd.img"),
        (syslinux_cfg, "/syslinux.cfg"),
        (efi, "/EFI/BOOT/BOOTX64.EFI"),
    ):
        _run("mcopy", *mtools, source, f"::{target}")
    _run("syslinux", "--install", esp)

    root = work / "root.raw"
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", rootfs, root)
    root_sectors = root.stat().st_size // SECTOR
    disk = work / "disk.raw"
    with disk.open("wb") as handle:
        handle.truncate(DISK_SIZE)
    table = (
        "label: dos\n"
        f"start={ESP_START}, size={ESP_SECTORS}, type=ef, bootable\n"
        f"start={ROOT_START}, size={root_sectors}, type=83\n"
    )
    proc = subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", str(disk)],
        input=table,
        text=True,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sfdisk failed: {proc.stderr.strip()}")
    with disk.open("r+b") as out:
        out.write(MBR_CODE.read_bytes()[:440])  # boot code only: the partition table sfdisk wrote stays
        for offset, part in ((ESP_START, esp), (ROOT_START, root)):
            out.seek(offset * SECTOR)
            with part.open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, work / "disk.qcow2")
    for name in ("disk.raw", "root.raw", "esp.img", "BOOTX64.EFI", "grub.cfg", "syslinux.cfg"):
        (work / name).unlink()
    (work / "disk.qcow2").chmod(0o444)
