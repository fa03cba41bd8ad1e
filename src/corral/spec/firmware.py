"""Which firmware a VM boots through: SeaBIOS (QEMU's default) or UEFI (OVMF).

An image says what its disk needs (a disk with only an EFI system partition cannot boot through SeaBIOS, an
MBR-only disk cannot boot through OVMF); a VM may override it. Both choices live here so that the CLI, the API,
the control plane and the host agent resolve them the same way.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from corral.errors import InvalidInput


class Firmware(StrEnum):
    BIOS = "bios"  # SeaBIOS: runs the disk's MBR boot code
    UEFI = "uefi"  # OVMF: runs \EFI\BOOT\BOOTX64.EFI (or a boot entry in its variable store)


DEFAULT_FIRMWARE = Firmware.BIOS


def parse_firmware(value: object) -> Firmware | None:
    """``None`` (no choice) or a Firmware; anything else is one clear error naming the choices."""
    if value is None or isinstance(value, Firmware):
        return value
    if isinstance(value, str) and value.lower() in Firmware.__members__.values():
        return Firmware(value.lower())
    raise InvalidInput(f"unknown firmware {value!r}", "choose bios (SeaBIOS, the default) or uefi (OVMF)")


def effective_firmware(requested: Firmware | str | None, image_details: dict[str, Any] | None) -> Firmware:
    """The VM's own choice, else the image's, else SeaBIOS (what QEMU boots without being told)."""
    chosen = parse_firmware(requested)
    if chosen is not None:
        return chosen
    return parse_firmware((image_details or {}).get("firmware")) or DEFAULT_FIRMWARE
