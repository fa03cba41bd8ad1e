"""UEFI on this host: OVMF's files, and each UEFI VM's own variable store.

OVMF comes as two flash images. The code is the same for every VM and is mapped read-only straight from the
ovmf package. The variable store is where the firmware keeps boot entries and settings, and a guest writes to it
(a distribution installer or ``efibootmgr`` adds its boot entry there): every VM gets its own copy, made from
the package's empty template on the VM's first UEFI boot and kept in the VM's run directory, which belongs to
the VM's uid like its disks and goes away with the VM. The copy is qcow2 rather than raw so that internal
snapshots, which QEMU takes of every writable block node, can include it.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.config import Settings
from corral.engine import qemu_img
from corral.engine.plan import UefiFirmware
from corral.errors import Conflict, InvalidInput

VARS_FILE = "uefi-vars.qcow2"
MACHINES_WITH_FLASH = ("q35", "pc")


def ovmf_files(settings: Settings) -> tuple[Path, Path]:
    """OVMF's code and variable template, or one clear error naming the package to install."""
    for path in (settings.ovmf_code, settings.ovmf_vars):
        if not path.is_file():
            raise Conflict(
                f"UEFI firmware is not installed on this host ({path} is missing)",
                "install the ovmf package (apt-get install ovmf), or boot with --firmware bios",
            )
    return settings.ovmf_code, settings.ovmf_vars


def check_machine(machine: str) -> None:
    """OVMF needs the flash chips only the PC machine types have (microvm has none)."""
    if not machine.split(",")[0].startswith(MACHINES_WITH_FLASH):
        raise InvalidInput(f"machine type {machine!r} cannot boot UEFI firmware", "use q35 (the default) or pc")


def vars_path(run_dir: Path) -> Path:
    return run_dir / VARS_FILE


def uefi_firmware(settings: Settings, run_dir: Path) -> UefiFirmware:
    """The VM's UEFI flash: OVMF's code and the VM's variable store, made from the template if it has none."""
    check_machine(settings.machine)
    code, template = ovmf_files(settings)
    store = vars_path(run_dir)
    if not store.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        partial = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        try:
            qemu_img.run(["convert", "-f", "raw", "-O", "qcow2", str(template), str(partial)], settings.qemu_img_binary)
            os.chmod(partial, 0o600)
            os.replace(partial, store)
        finally:
            partial.unlink(missing_ok=True)
    return UefiFirmware(code=code, vars=store, vars_format="qcow2")
