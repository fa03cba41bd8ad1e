"""Choosing between KVM and TCG.

On some hosts /dev/kvm exists but is a software implementation (a "PVM" module) that runs stock guest kernels
about a thousand times slower than TCG. So the device alone proves nothing: KVM is chosen only when a hardware
KVM module (kvm_intel or kvm_amd) is loaded and /dev/kvm can be opened.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.errors import InvalidInput


def hardware_kvm_available(sys_module: Path = Path("/sys/module"), dev: Path = Path("/dev/kvm")) -> bool:
    if not any((sys_module / name).exists() for name in ("kvm_intel", "kvm_amd")):
        return False
    return dev.exists() and os.access(dev, os.R_OK | os.W_OK)


def choose_accel(setting: str, sys_module: Path = Path("/sys/module"), dev: Path = Path("/dev/kvm")) -> str:
    """Resolve ``auto|kvm|tcg`` to what QEMU gets; asking for KVM where it is not real is an error."""
    if setting == "tcg":
        return "tcg"
    kvm = hardware_kvm_available(sys_module, dev)
    if setting == "kvm" and not kvm:
        raise InvalidInput(
            "accel=kvm but this host has no hardware KVM (no kvm_intel/kvm_amd module or no access to /dev/kvm)",
            'set accel = "auto" or "tcg" in config.toml',
        )
    return "kvm" if kvm else "tcg"
