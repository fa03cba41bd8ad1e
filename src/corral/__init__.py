"""Corral: virtual machines on QEMU, from one laptop to a pool of hosts."""

__version__ = "0.1.0"
