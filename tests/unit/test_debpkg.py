"""Unit tests for corral.images.debpkg: apt output parsing and kernel-module ordering, without apt or a kernel.

Modules are synthesized as minimal ELF files with a `.modinfo` section, which is all the builder reads.
"""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from corral.images import debpkg
from corral.images.debpkg import DebPackage, PackageError


def make_module(depends: str, extra: dict[str, str] | None = None) -> bytes:
    """A minimal 64-bit little-endian ELF with `.modinfo` and `.shstrtab` sections, like a kernel module."""
    info = {"license": "GPL", "depends": depends, **(extra or {})}
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    modinfo_off = 64
    shstrtab_off = modinfo_off + len(modinfo)
    shoff = (shstrtab_off + len(shstrtab) + 7) & ~7
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)  # shentsize, shnum, shstrndx
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, modinfo_off, len(modinfo), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstrtab_off, len(shstrtab), 0, 0, 1, 0),
    ]
    body = bytes(header) + modinfo + shstrtab
    return body + b"\0" * (shoff - len(body)) + b"".join(sections)


@pytest.fixture
def module_tree(tmp_path: Path) -> Path:
    """A /lib/modules/<version> tree shaped like the cloud kernel's virtio stack, some modules xz-packed."""
    root = tmp_path / "lib" / "modules" / "6.1.0-99-cloud-amd64"
    modules = {
        "kernel/drivers/virtio/virtio_ring.ko": "",
        "kernel/drivers/virtio/virtio.ko": "virtio_ring",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko": "",
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz": "",
        "kernel/drivers/virtio/virtio_pci.ko": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
        "kernel/drivers/block/virtio_blk.ko.xz": "virtio,virtio_ring",
        "kernel/net/core/failover.ko": "",
        "kernel/drivers/net/net_failover.ko": "failover",
        "kernel/drivers/net/virtio_net.ko.xz": "virtio_ring,virtio,net_failover",
        "kernel/drivers/acpi/button.ko": "",
        "kernel/drivers/unrelated/unused.ko": "",
    }
    for rel, depends in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make_module(depends)
        path.write_bytes(lzma.compress(data) if rel.endswith(".xz") else data)
    return root


def test_modinfo_reads_depends_and_other_keys() -> None:
    elf = make_module("a,b", {"alias": "pci:v00001AF4d*"})
    assert debpkg.module_depends(elf) == ["a", "b"]
    assert debpkg.modinfo(elf)["alias"] == ["pci:v00001AF4d*"]
    assert debpkg.module_depends(make_module("")) == []


def test_elf_section_rejects_non_elf() -> None:
    with pytest.raises(ValueError, match="ELF"):
        debpkg.elf_section(b"not an elf file at all, sorry" * 4, ".modinfo")


def test_read_module_decompresses_xz(tmp_path: Path) -> None:
    elf = make_module("virtio")
    packed = tmp_path / "virtio_blk.ko.xz"
    packed.write_bytes(lzma.compress(elf))
    assert debpkg.read_module(packed) == elf
    assert debpkg.module_name(packed) == "virtio_blk"


def test_resolve_modules_orders_dependencies_first(module_tree: Path) -> None:
    resolved = debpkg.resolve_modules(module_tree, ["virtio_pci", "virtio_blk", "virtio_net", "button"])
    names = [name for name, _ in resolved]
    assert set(names) == {
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "button",
    }
    for name, elf in resolved:
        assert elf.startswith(b"\x7fELF"), f"{name} was not decompressed"
        for dep in debpkg.module_depends(elf):
            assert names.index(dep) < names.index(name), f"{dep} must load before {name}"


def test_resolve_modules_names_a_missing_module(module_tree: Path) -> None:
    with pytest.raises(PackageError, match="virtio_console"):
        debpkg.resolve_modules(module_tree, ["virtio_console"])


def test_load_order_is_stable_and_detects_cycles() -> None:
    deps = {"a": ["b"], "b": [], "c": ["a"]}
    assert debpkg.load_order(["c", "b"], deps) == ["b", "a", "c"]
    assert debpkg.load_order(["virtio-blk"], {"virtio_blk": ["virtio"], "virtio": []}) == ["virtio", "virtio_blk"]
    with pytest.raises(ValueError, match="cycle"):
        debpkg.load_order(["a"], {"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError, match="not found"):
        debpkg.load_order(["a"], {"a": ["zz"]})


POLICY = """\
linux-image-6.1.0-56-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
 *** 1:1.35.0-4+deb12u1+b1 500
        100 /var/lib/dpkg/status
ghost-package:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


def test_parse_policy_reads_candidates_and_skips_none() -> None:
    assert debpkg.parse_policy(POLICY) == {
        "linux-image-6.1.0-56-cloud-amd64": "6.1.192-2",
        "busybox-static": "1:1.35.0-4+deb12u1+b1",
    }


def test_parse_depends_finds_the_versioned_kernel() -> None:
    text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert debpkg.parse_depends(text, "linux-image-cloud-amd64", "linux-image-") == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(PackageError, match="no dependency"):
        debpkg.parse_depends("linux-image-cloud-amd64\n", "linux-image-cloud-amd64", "linux-image-")


def test_deb_package_file_name_encodes_the_epoch() -> None:
    pkg = DebPackage("qemu-guest-agent", "1:7.2+dfsg-7+deb12u18+b3")
    assert pkg.spec == "qemu-guest-agent=1:7.2+dfsg-7+deb12u18+b3"
    assert pkg.filename == "qemu-guest-agent_1%3a7.2+dfsg-7+deb12u18+b3_amd64.deb"


def test_depends_names_and_soname_guesses() -> None:
    depends = "libc6 (>= 2.34), libglib2.0-0 (>= 2.63.3), libnuma1 (>= 2.0.11) | libfoo, liburing2 (>= 2.3)"
    names = debpkg.depends_names(depends)
    assert names == ["libc6", "libglib2.0-0", "libnuma1", "libfoo", "liburing2"]
    assert debpkg.guess_package_for_soname("libglib-2.0.so.0", names) == "libglib2.0-0"
    assert debpkg.guess_package_for_soname("libnuma.so.1", names) == "libnuma1"
    assert debpkg.guess_package_for_soname("libudev.so.1", names) == "libudev1"


def test_package_lists_empty(tmp_path: Path) -> None:
    assert debpkg.package_lists_empty(tmp_path / "missing")
    assert debpkg.package_lists_empty(tmp_path)
    (tmp_path / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4").write_bytes(b"")
    assert not debpkg.package_lists_empty(tmp_path)


def test_useful_stderr_drops_the_apt_sandbox_warning() -> None:
    stderr = (
        "W: Download is performed unsandboxed as root as file 'x.deb' couldn't be accessed by user '_apt'.\n"
        "E: Can't find a source to download version '1.0' of 'nope:amd64'\n"
    )
    assert debpkg._useful_stderr(stderr) == "E: Can't find a source to download version '1.0' of 'nope:amd64'"
