"""libvirt domain XML (as ``virsh dumpxml`` writes it), read into what corral can make of it.

The XML comes from a user and is treated as hostile: it is size-limited, any DOCTYPE or entity declaration is
refused before the parser sees it (no entity expansion, no external fetch), and nothing in it is trusted as a
path until the caller has checked it (``check_disk_paths``). What corral maps: name, vCPUs (and their maximum),
memory (and current memory), firmware (BIOS or UEFI from ``<os>``/``<loader>``), direct kernel boot
(``<kernel>``, ``<initrd>``, ``<cmdline>``), file-backed disks in qcow2 or raw (their order and boot order),
NICs (MAC, model), the serial console and the guest agent channel. Everything else under ``<devices>`` (and the
few top-level elements that change what the guest sees) is one warning line each; what leaves the VM unusable
(no bootable disk, a disk that is not a file, a format corral does not read) is an ``InvalidInput``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from corral.errors import InvalidInput
from corral.spec.firmware import Firmware

MAX_XML_BYTES = 1 << 20
DISK_FORMATS = ("qcow2", "raw")
HINT = "give the domain XML as `virsh dumpxml NAME` writes it"
_UNITS = {
    "b": 1,
    "bytes": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}
_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
# Devices corral makes itself, whatever the XML says: silently covered, not "unmapped".
_COVERED_DEVICES = {
    "disk",
    "interface",
    "serial",
    "console",
    "channel",
    "emulator",
    "controller",
    "input",
    "memballoon",
    "rng",
    "watchdog",
}
_IGNORED_TOP = {
    "name",
    "uuid",
    "title",
    "description",
    "metadata",
    "memory",
    "currentMemory",
    "vcpu",
    "os",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "pm",
    "devices",
    "resource",
    "seclabel",
    "maxMemory",
}


@dataclass(frozen=True)
class ForeignDisk:
    """A disk to copy in: its source file as the XML names it (checked later), format, and boot order."""

    path: str
    format: str
    target: str
    boot_order: int | None = None


@dataclass(frozen=True)
class ForeignNic:
    mac: str | None
    model: str | None
    source: str | None  # the libvirt network or bridge it was on, for --network rules and messages


@dataclass
class ForeignVM:
    """What a foreign definition asks for, in corral's terms, plus a warning line per thing corral drops."""

    name: str
    cpus: int
    memory: int
    max_memory: int | None = None
    max_cpus: int | None = None
    firmware: Firmware | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    disks: list[ForeignDisk] = field(default_factory=list)
    nics: list[ForeignNic] = field(default_factory=list)
    serial: bool = False
    guest_agent: bool = False
    warnings: list[str] = field(default_factory=list)

    def boot_disks(self) -> list[ForeignDisk]:
        """Disks in boot order: those with ``<boot order>`` first by order, then the rest as listed. corral
        boots its first disk, so this is the order the volumes are made in."""
        ordered = sorted((d for d in self.disks if d.boot_order is not None), key=lambda d: d.boot_order or 0)
        return ordered + [d for d in self.disks if d.boot_order is None]


def _size(element: ET.Element | None, what: str) -> int | None:
    """A libvirt size element (``<memory unit='KiB'>1048576</memory>``; KiB when no unit) in bytes."""
    if element is None:
        return None
    unit = (element.get("unit") or "KiB").lower()
    text = (element.text or "").strip()
    if unit not in _UNITS or not text.isdigit():
        raise InvalidInput(f"<{what}> {text!r} {unit!r} is not a size", HINT)
    return int(text) * _UNITS[unit]


def _whole_mib(value: int) -> int:
    """corral sizes memory in MiB: round a KiB-exact size up, as a guest never gets less than it had."""
    return -(-value // (1 << 20)) << 20


def _int(text: str | None, what: str, low: int, high: int) -> int:
    value = (text or "").strip()
    if not value.isdigit() or not low <= int(value) <= high:
        raise InvalidInput(f"{what} {value!r} is not a number from {low} to {high}", HINT)
    return int(value)


def parse_domain(data: bytes, max_cpus: int = 255) -> ForeignVM:
    """Read a domain XML; raise InvalidInput for anything that would make the VM unusable or is not a domain."""
    if len(data) > MAX_XML_BYTES:
        raise InvalidInput(f"the domain XML is larger than {MAX_XML_BYTES >> 20} MiB", HINT)
    if _DECLARATION.search(data):
        raise InvalidInput(
            "the domain XML declares a DOCTYPE or entities, which corral does not read",
            "remove the <!DOCTYPE ...> (virsh dumpxml never writes one)",
        )
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise InvalidInput(f"the domain XML is not well-formed: {exc}", HINT) from exc
    if root.tag != "domain":
        raise InvalidInput(f"the XML's root is <{root.tag}>, not <domain>", HINT)
    name = (root.findtext("name") or "").strip()
    if not name:
        raise InvalidInput("the domain XML has no <name>", HINT)
    warnings: list[str] = []
    if root.get("type") not in (None, "kvm", "qemu", "test"):
        warnings.append(f"domain type {root.get('type')!r}: corral runs it on QEMU")
    vcpu = root.find("vcpu")
    slots = _int(vcpu.text if vcpu is not None else "1", "<vcpu>", 1, max_cpus)
    current = vcpu.get("current") if vcpu is not None else None
    cpus = _int(current, "<vcpu current>", 1, slots) if current is not None else slots
    memory = _size(root.find("memory"), "memory")
    current_memory = _size(root.find("currentMemory"), "currentMemory")
    if memory is None and current_memory is None:
        raise InvalidInput("the domain XML has no <memory>", HINT)
    ceiling = _whole_mib(memory or current_memory or 0)
    booted = _whole_mib(min(current_memory or ceiling, ceiling))
    vm = ForeignVM(
        name=name,
        cpus=cpus,
        memory=booted,
        max_memory=ceiling if ceiling != booted else None,
        max_cpus=slots if slots != cpus else None,
        warnings=warnings,
    )
    _read_os(root.find("os"), vm)
    devices = root.find("devices")
    for element in list(devices) if devices is not None else []:
        _read_device(element, vm)
    for element in root:
        if element.tag not in _IGNORED_TOP:
            vm.warnings.append(f"<{element.tag}> is not mapped: corral ignores it")
    cpu = root.find("cpu")
    if cpu is not None and cpu.get("mode") in ("host-passthrough", "host-model"):
        vm.warnings.append(f"<cpu mode='{cpu.get('mode')}'> is not mapped: corral uses its own CPU model")
    if not vm.disks and vm.kernel is None:
        raise InvalidInput(f"domain {name} has no disk and no kernel to boot", "give a domain with a file disk")
    return vm


def _read_os(os_element: ET.Element | None, vm: ForeignVM) -> None:
    if os_element is None:
        return
    os_type = os_element.find("type")
    if os_type is not None and (os_type.text or "").strip() not in ("hvm", ""):
        raise InvalidInput(f"<os><type> {os_type.text!r} is not a full virtual machine", "corral runs hvm guests")
    if os_type is not None and os_type.get("arch") not in (None, "x86_64"):
        raise InvalidInput(f"the guest architecture {os_type.get('arch')!r} is not x86_64", "corral runs x86_64")
    loader = os_element.find("loader")
    if os_element.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
        vm.firmware = Firmware.UEFI
    elif loader is not None and loader.get("type") not in (None, "rom"):
        vm.warnings.append(f"<loader type='{loader.get('type')}'> is not mapped: BIOS is used")
    if os_element.find("nvram") is not None:
        vm.warnings.append("<nvram> is not copied: UEFI variables start fresh (boot entries are found again)")
    for tag in ("kernel", "initrd"):
        text = (os_element.findtext(tag) or "").strip()
        if text:
            setattr(vm, tag, text)
    vm.cmdline = (os_element.findtext("cmdline") or "").strip()
    if vm.initrd and not vm.kernel:
        raise InvalidInput("the domain has an <initrd> but no <kernel>", HINT)
    if len(vm.cmdline) > 1024 or "\n" in vm.cmdline:
        raise InvalidInput("the domain's <cmdline> is too long or spans lines", "keep it to one line")


def _read_device(element: ET.Element, vm: ForeignVM) -> None:
    tag = element.tag
    if tag == "disk":
        _read_disk(element, vm)
    elif tag == "interface":
        mac = element.find("mac")
        model = element.find("model")
        source = element.find("source")
        where = None
        if source is not None:
            where = source.get("network") or source.get("bridge") or source.get("dev")
        if element.get("type") not in ("network", "bridge", "user", "direct", "ethernet"):
            vm.warnings.append(f"interface of type {element.get('type')!r} is made a corral NIC")
        if model is not None and model.get("type") not in ("virtio", None):
            vm.warnings.append(f"NIC model {model.get('type')!r} becomes virtio-net")
        vm.nics.append(
            ForeignNic(
                mac=mac.get("address") if mac is not None else None,
                model=model.get("type") if model is not None else None,
                source=where,
            )
        )
    elif tag in ("serial", "console"):
        vm.serial = True
    elif tag == "channel":
        target = element.find("target")
        if target is not None and target.get("name") == "org.qemu.guest_agent.0":
            vm.guest_agent = True
        elif target is not None:
            vm.warnings.append(f"channel {target.get('name') or target.get('type')!r} is not mapped")
    elif tag in _COVERED_DEVICES:
        return
    elif tag == "hostdev":
        vm.warnings.append("<hostdev> (device passthrough) is not mapped: the device is left out")
    else:
        vm.warnings.append(f"<{tag}> is not mapped: corral gives the VM its own devices")


def _read_disk(element: ET.Element, vm: ForeignVM) -> None:
    device = element.get("device") or "disk"
    kind = element.get("type")
    target = element.find("target")
    name = (target.get("dev") if target is not None else None) or f"disk{len(vm.disks)}"
    source = element.find("source")
    if device in ("cdrom", "floppy"):
        vm.warnings.append(f"{device} {name} is not mapped: attach what it held as a disk if needed")
        return
    if device != "disk":
        raise InvalidInput(f"disk {name} is a {device!r} device", "corral imports plain disks (device='disk')")
    if kind != "file":
        raise InvalidInput(
            f"disk {name} is of type {kind!r}: only file disks can be copied in",
            "copy it to a qcow2 or raw file and name it with <disk type='file'>",
        )
    path = source.get("file") if source is not None else None
    if not path:
        raise InvalidInput(f"disk {name} names no source file", HINT)
    driver = element.find("driver")
    fmt = (driver.get("type") if driver is not None else None) or "raw"
    if fmt not in DISK_FORMATS:
        raise InvalidInput(
            f"disk {name} is {fmt}; corral imports qcow2 or raw",
            f"convert it first: `qemu-img convert -O qcow2 {PurePosixPath(path).name} NEW.qcow2`",
        )
    if element.find("backingStore/source") is not None:
        raise InvalidInput(f"disk {name} has a backing chain", "flatten it first: `qemu-img convert -O qcow2`")
    boot = element.find("boot")
    order = _int(boot.get("order"), f"boot order of disk {name}", 1, 64) if boot is not None else None
    if element.find("readonly") is not None:
        vm.warnings.append(f"disk {name} is read-only in the domain; corral attaches it read-write")
    vm.disks.append(ForeignDisk(path=path, format=fmt, target=name, boot_order=order))
    if len(vm.disks) > 17:
        raise InvalidInput(f"domain {vm.name} has more than 17 disks", "corral attaches a root disk and 16 more")


def check_disk_paths(vm: ForeignVM, allowed: PurePosixPath | None = None) -> None:
    """Every file the domain names (disks, kernel, initrd) is an absolute, normalised path; with ``allowed``, it
    lies under that directory. A ``..`` or a relative path is refused whoever asks: libvirt never writes one."""
    named = [(f"disk {d.target}", d.path) for d in vm.disks]
    named += [(tag, path) for tag, path in (("kernel", vm.kernel), ("initrd", vm.initrd)) if path]
    for what, text in named:
        path = PurePosixPath(text)
        if not path.is_absolute() or ".." in path.parts or "\0" in text:
            raise InvalidInput(f"the {what} path {text!r} is not an absolute path without '..'", HINT)
        if allowed is not None and not path.is_relative_to(allowed):
            raise InvalidInput(
                f"the {what} path {text!r} is outside {allowed}", f"put the files under {allowed} and name them there"
            )


def looks_like_domain(head: bytes) -> bool:
    """Whether a file's first bytes are a libvirt domain XML (how `vm import` picks the format by content)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<?xml"):
        end = text.find(b"?>")
        text = text[end + 2 :].lstrip() if end >= 0 else text
    while text.startswith(b"<!--"):
        end = text.find(b"-->")
        text = text[end + 3 :].lstrip() if end >= 0 else b""
    if text.startswith(b"<!") and re.search(rb"<domain[\s>]", text):
        return True  # a DOCTYPE before <domain>: parse_domain refuses it with a reason
    return text.startswith(b"<domain") and text[7:8] in (b" ", b">", b"\t", b"\n", b"\r")


def spec_fields(vm: ForeignVM, network: str | None = None) -> dict[str, object]:
    """The VMSpec fields a foreign VM maps to (name and image are the caller's): NICs keep their MACs and go on
    ``network`` (default: user-mode NAT, which every host has)."""
    from corral.spec.vm import USER_NETWORK

    fields: dict[str, object] = {
        "cpus": vm.cpus,
        "memory": vm.memory,
        "max_memory": vm.max_memory,
        "max_cpus": vm.max_cpus,
        "nics": [
            {"network": network or USER_NETWORK, **({"mac": nic.mac.lower()} if nic.mac else {})} for nic in vm.nics
        ],
    }
    if vm.firmware is not None:
        fields["firmware"] = vm.firmware.value
    return fields
