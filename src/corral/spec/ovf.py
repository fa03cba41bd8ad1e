"""OVF 1.x envelopes and OVA archives: read (the virtual hardware, the manifest, the member list) and write.

An OVA is a tar: the ``.ovf`` envelope first, then usually a ``.mf`` manifest (``SHA256(name)= hex`` lines) and
the disks, VMDK in the ``streamOptimized`` subformat. Everything here is checked before anything is made:
members are plain files with plain names (no ``/``, no ``..``, no links), every file the envelope references is
in the archive and in the manifest, and each VMDK is a single self-contained sparse extent (``vmdk_problem``): a
VMDK *descriptor* names other files and qemu-img would open them (``/etc/shadow``), the hole issue 11 closed
for images, so one is refused, as is a sparse VMDK whose embedded descriptor names a parent.
"""

from __future__ import annotations

import hashlib
import re
import struct
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from corral.errors import InvalidInput

MAX_ENVELOPE_BYTES = 4 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 64
HINT = "give an OVF 1.x appliance (an .ova, or an .ovf with its files beside it)"
OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
CORRAL = "https://corral.dev/ovf/1"  # corral's own section: the image a corral VM boots (ovf:required="false")
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_MANIFEST_LINE = re.compile(r"^(SHA256|SHA1|SHA512)\(([^)]+)\)\s*=\s*([0-9a-fA-F]+)$")
_UNITS = re.compile(r"^byte\s*\*\s*2\^\s*(\d+)$")
# CIM ResourceType numbers (DSP0243): what maps, and what is made by corral anyway (controllers).
CPU, MEMORY, ETHERNET, DISK = 3, 4, 10, 17
_CONTROLLERS = {5: "IDE controller", 6: "SCSI controller", 20: "SATA controller", 23: "USB controller"}
_NAMED = {
    14: "floppy drive",
    15: "CD drive",
    16: "DVD drive",
    21: "other storage",
    24: "graphics",
    35: "sound card",
    1: "other device",
}
# A VMDK4 sparse extent header (VMware's "Virtual Disk Format 5.0"), little-endian.
_VMDK_HEADER = struct.Struct("<4sIIQQQQIQQQ")
VMDK_MAGIC = b"KDMV"


@dataclass(frozen=True)
class OvfDisk:
    href: str  # the member of the archive (or the file beside the .ovf) holding it
    capacity: int  # virtual size in bytes
    size: int | None  # the file's length, when the envelope says


@dataclass
class Appliance:
    """A virtual system of an envelope, in corral's terms, plus a warning line per thing corral drops."""

    name: str
    cpus: int
    memory: int
    disks: list[OvfDisk] = field(default_factory=list)
    macs: list[str | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    image: str | None = None  # from corral's section: the image it booted where it was exported


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _attr(element: ET.Element, name: str) -> str | None:
    return element.get(_q(OVF, name), element.get(name))


def _units(text: str | None, default: int) -> int:
    """``byte * 2^20`` style units (also ``MegaBytes``, ``GigaBytes``, which some tools write)."""
    if not text:
        return default
    value = text.strip()
    named = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30}
    if value.lower() in named:
        return named[value.lower()]
    match = _UNITS.match(value)
    if not match or int(match.group(1)) > 50:
        raise InvalidInput(f"the envelope's unit {value!r} is not understood", HINT)
    return 1 << int(match.group(1))


def _number(text: str | None, what: str, high: int) -> int:
    value = (text or "").strip()
    if not value.isdigit() or not 0 < int(value) <= high:
        raise InvalidInput(f"the envelope's {what} {value!r} is not a number from 1 to {high}", HINT)
    return int(value)


def parse_envelope(data: bytes, max_cpus: int = 255) -> Appliance:
    """The first virtual system of an OVF envelope; InvalidInput for what is not an envelope or unusable."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise InvalidInput(f"the OVF envelope is larger than {MAX_ENVELOPE_BYTES >> 20} MiB", HINT)
    if _DECLARATION.search(data):
        raise InvalidInput("the OVF envelope declares a DOCTYPE or entities, which corral does not read", HINT)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise InvalidInput(f"the OVF envelope is not well-formed: {exc}", HINT) from exc
    if root.tag != _q(OVF, "Envelope"):
        raise InvalidInput(f"the XML's root is {root.tag!r}, not an OVF 1.x Envelope", HINT)
    files: dict[str, tuple[str, int | None]] = {}
    for element in root.findall(f"{_q(OVF, 'References')}/{_q(OVF, 'File')}"):
        ident, href = _attr(element, "id"), _attr(element, "href")
        if not ident or not href:
            raise InvalidInput("a <File> of the envelope lacks its id or href", HINT)
        check_member_name(href)
        size = _attr(element, "size")
        files[ident] = (href, int(size) if size and size.isdigit() else None)
    disks: dict[str, OvfDisk] = {}
    for element in root.findall(f"{_q(OVF, 'DiskSection')}/{_q(OVF, 'Disk')}"):
        ident, ref = _attr(element, "diskId"), _attr(element, "fileRef")
        if ident is None or ref is None or ref not in files:
            raise InvalidInput(
                f"disk {ident!r} of the envelope references no file in <References>",
                "the appliance is incomplete; export it again",
            )
        capacity = _number(_attr(element, "capacity"), f"capacity of disk {ident}", 1 << 62)
        capacity *= _units(_attr(element, "capacityAllocationUnits"), 1)
        fmt = _attr(element, "format") or ""
        if fmt and "vmdk" not in fmt.lower():
            raise InvalidInput(f"disk {ident} is in format {fmt!r}; corral reads VMDK disks", HINT)
        disks[ident] = OvfDisk(href=files[ref][0], capacity=capacity, size=files[ref][1])
    system = root.find(_q(OVF, "VirtualSystem"))
    if system is None:
        system = root.find(f"{_q(OVF, 'VirtualSystemCollection')}/{_q(OVF, 'VirtualSystem')}")
    if system is None:
        raise InvalidInput("the envelope has no <VirtualSystem>", HINT)
    name = (system.findtext(_q(OVF, "Name")) or _attr(system, "id") or "").strip()
    hardware = system.find(_q(OVF, "VirtualHardwareSection"))
    if hardware is None:
        raise InvalidInput(f"virtual system {name!r} has no <VirtualHardwareSection>", HINT)
    appliance = Appliance(name=name or "appliance", cpus=1, memory=0)
    if len(root.findall(f".//{_q(OVF, 'VirtualSystem')}")) > 1:
        appliance.warnings.append("the envelope holds several virtual systems: only the first is imported")
    corral = system.find(_q(CORRAL, "Boot"))
    if corral is not None and corral.get("image"):
        appliance.image = corral.get("image")
    used: list[OvfDisk] = []
    for item in hardware.findall(_q(OVF, "Item")):
        kind_text = item.findtext(_q(RASD, "ResourceType")) or ""
        kind = int(kind_text) if kind_text.strip().isdigit() else -1
        label = (item.findtext(_q(RASD, "ElementName")) or f"resource type {kind}").strip()
        if kind == CPU:
            appliance.cpus = _number(item.findtext(_q(RASD, "VirtualQuantity")), "CPU count", max_cpus)
        elif kind == MEMORY:
            quantity = _number(item.findtext(_q(RASD, "VirtualQuantity")), "memory", 1 << 40)
            appliance.memory = quantity * _units(item.findtext(_q(RASD, "AllocationUnits")), 1 << 20)
        elif kind == ETHERNET:
            address = (item.findtext(_q(RASD, "Address")) or "").strip() or None
            appliance.macs.append(address)
            subtype = (item.findtext(_q(RASD, "ResourceSubType")) or "").strip()
            if subtype and subtype.lower() not in ("virtio", "virtio-net"):
                appliance.warnings.append(f"NIC {label!r} of model {subtype} becomes virtio-net")
        elif kind == DISK:
            resource = (item.findtext(_q(RASD, "HostResource")) or "").strip()
            ident = resource.rsplit("/", 1)[-1]
            if not resource.startswith(("ovf:/disk/", "/disk/")) or ident not in disks:
                raise InvalidInput(
                    f"disk {label!r} names {resource!r}, which the envelope does not describe",
                    "the appliance is incomplete; export it again",
                )
            used.append(disks[ident])
        elif kind in _CONTROLLERS:
            continue
        else:
            what = _NAMED.get(kind, f"resource type {kind}")
            appliance.warnings.append(f"{what} {label!r} is not mapped: corral gives the VM its own devices")
    if not used:
        raise InvalidInput(f"virtual system {name!r} has no disk", "the appliance is incomplete; export it again")
    if appliance.memory == 0:
        raise InvalidInput(f"virtual system {name!r} names no memory", HINT)
    appliance.memory = -(-appliance.memory // (1 << 20)) << 20
    appliance.disks = used
    return appliance


def check_member_name(name: str) -> str:
    """An archive member or file reference: a plain name, never a path (``../x``, ``/etc/x``, ``a/b``)."""
    if not _MEMBER.match(name) or ".." in name:
        raise InvalidInput(
            f"the appliance names the file {name!r}, which is not a plain file name",
            "the appliance was tampered with; its files must sit beside the envelope",
        )
    return name


def parse_manifest(text: str) -> dict[str, tuple[str, str]]:
    """``SHA256(name)= hex`` lines as ``{name: (algorithm, hex)}``; any other line is refused."""
    entries: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if not match:
            raise InvalidInput(f"the manifest line {line[:80]!r} is not `SHA256(FILE)= HEX`", HINT)
        algorithm, name, digest = match.group(1).lower(), check_member_name(match.group(2)), match.group(3).lower()
        if len(digest) != hashlib.new(algorithm).digest_size * 2 or name in entries:
            raise InvalidInput(f"the manifest entry for {name} is malformed or repeated", HINT)
        entries[name] = (algorithm, digest)
    return entries


@dataclass
class Ova:
    """A checked OVA: its envelope, manifest entries and the disk members' names."""

    envelope: str
    appliance: Appliance
    manifest: dict[str, tuple[str, str]]


def read_ova(path: Path, label: str | None = None) -> Ova:
    """Open an OVA and check it whole except the disks' checksums (``verify_members`` hashes them): members,
    envelope, that every referenced disk is present, and that the manifest covers every member."""
    shown = label or path.name
    try:
        with tarfile.open(path, "r:") as archive:
            members = archive.getmembers()
            if len(members) > MAX_MEMBERS:
                raise InvalidInput(f"{shown} has {len(members)} members", HINT)
            for member in members:
                check_member_name(member.name)
                if not member.isreg():
                    raise InvalidInput(
                        f"member {member.name!r} of {shown} is not a regular file", "the appliance was tampered with"
                    )
            names = [m.name for m in members]
            if len(set(names)) != len(names):
                raise InvalidInput(f"{shown} holds a member twice", "the appliance was tampered with")
            envelopes = [m for m in members if m.name.endswith(".ovf")]
            if len(envelopes) != 1:
                raise InvalidInput(f"{shown} holds {len(envelopes)} .ovf envelopes, not one", HINT)
            data = _read_member(archive, envelopes[0], MAX_ENVELOPE_BYTES, shown)
            manifests = [m for m in members if m.name.endswith(".mf")]
            manifest_text = _read_member(archive, manifests[0], MAX_MANIFEST_BYTES, shown) if manifests else b""
    except tarfile.TarError as exc:
        raise InvalidInput(f"{shown} is not a readable OVA (tar) archive: {exc}", HINT) from exc
    appliance = parse_envelope(data)
    manifest = parse_manifest(manifest_text.decode("utf-8", "replace"))
    sizes = {m.name: m.size for m in members}
    for disk in appliance.disks:
        if disk.href not in sizes:
            raise InvalidInput(
                f"{shown} lacks the disk {disk.href} its envelope references",
                "the appliance is incomplete; export it again",
            )
        if disk.size is not None and sizes[disk.href] != disk.size:
            raise InvalidInput(
                f"{disk.href} in {shown} is {sizes[disk.href]} bytes, the envelope says {disk.size}",
                "the appliance was truncated or tampered with",
            )
    if manifests:
        unlisted = sorted(set(names) - set(manifest) - {manifests[0].name})
        if unlisted:
            raise InvalidInput(
                f"the manifest of {shown} has no checksum for {unlisted[0]}", "the appliance was tampered with"
            )
        extra = sorted(set(manifest) - set(names))
        if extra:
            raise InvalidInput(
                f"{shown} lacks {extra[0]}, which its manifest lists", "the appliance is incomplete; export it again"
            )
    else:
        appliance.warnings.append(f"{shown} has no manifest: its files' integrity cannot be checked")
    return Ova(envelope=envelopes[0].name, appliance=appliance, manifest=manifest)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int, shown: str) -> bytes:
    if member.size > limit:
        raise InvalidInput(f"{member.name} in {shown} is larger than {limit >> 20} MiB", HINT)
    handle = archive.extractfile(member)
    assert handle is not None
    return handle.read()


def verify_members(path: Path, ova: Ova, label: str | None = None) -> None:
    """Hash every member the manifest lists against it (streamed); the first mismatch is an InvalidInput."""
    shown = label or path.name
    with tarfile.open(path, "r:") as archive:
        for member in archive.getmembers():
            if member.name not in ova.manifest:
                continue
            algorithm, expected = ova.manifest[member.name]
            digest = hashlib.new(algorithm)
            handle = archive.extractfile(member)
            assert handle is not None
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
            if digest.hexdigest() != expected:
                raise InvalidInput(
                    f"{member.name} in {shown} does not match its manifest checksum",
                    "the appliance is damaged or was tampered with; download or export it again",
                )


def vmdk_problem(head: bytes) -> str | None:
    """Why a VMDK could make qemu-img open another file, or None when it is one self-contained sparse extent
    (monolithicSparse or streamOptimized) whose embedded descriptor names no parent. ``head``: its first 64 KiB
    or more (the embedded descriptor usually sits at sector 1)."""
    if head.startswith(b"# Disk DescriptorFile") or head.lstrip().startswith(b"#"):
        return "it is a VMDK descriptor, which names other files"
    if len(head) < _VMDK_HEADER.size or head[:4] != VMDK_MAGIC:
        return "it is not a sparse VMDK (no KDMV header)"
    (_magic, version, _flags, _capacity, _grain, desc_offset, desc_size, *_rest) = _VMDK_HEADER.unpack(
        head[: _VMDK_HEADER.size]
    )
    if version not in (1, 2, 3):
        return f"its VMDK version {version} is not one qemu-img writes"
    if desc_offset and desc_size:
        start, end = desc_offset * 512, (desc_offset + desc_size) * 512
        if end > len(head):
            return "its embedded descriptor lies beyond what was read"
        descriptor = head[start:end].split(b"\0", 1)[0].decode("ascii", "replace")
        for line in descriptor.splitlines():
            key = line.split("=", 1)[0].strip().lower()
            value = line.split("=", 1)[1].strip().strip('"').lower() if "=" in line else ""
            if key == "parentfilenamehint" or (key == "parentcid" and value != "ffffffff"):
                return "its descriptor names a parent disk"
            if key == "createtype" and value not in ("monolithicsparse", "streamoptimized"):
                return f"its descriptor's createType {value!r} is not a single sparse extent"
    return None


# -- writing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedDisk:
    href: str
    capacity: int
    size: int


def write_envelope(
    name: str, cpus: int, memory: int, disks: list[ExportedDisk], macs: list[str | None], image: str | None = None
) -> str:
    """An OVF 1.x envelope for one virtual system: CPUs, memory in MiB, a SCSI-less virtio-agnostic layout that
    VirtualBox, VMware and qemu-img's users read (an IDE controller the disks hang off, as such tools expect)."""
    refs = "".join(
        f'    <File ovf:id="file{i}" ovf:href={quoteattr(d.href)} ovf:size="{d.size}"/>\n' for i, d in enumerate(disks)
    )
    disk_lines = "".join(
        f'    <Disk ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:capacity="{d.capacity}" '
        f'ovf:capacityAllocationUnits="byte" ovf:format="{STREAM_OPTIMIZED}"/>\n'
        for i, d in enumerate(disks)
    )
    items = [
        (CPU, f"{cpus} virtual CPU(s)", f"<rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>"),
        (
            MEMORY,
            f"{memory >> 20} MB of memory",
            "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>"
            f"<rasd:VirtualQuantity>{memory >> 20}</rasd:VirtualQuantity>",
        ),
        (5, "IDE controller 0", "<rasd:Address>0</rasd:Address>"),
    ]
    for i, _disk in enumerate(disks):
        items.append(
            (
                DISK,
                f"disk{i}",
                f"<rasd:AddressOnParent>{i}</rasd:AddressOnParent>"
                f"<rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource><rasd:Parent>3</rasd:Parent>",
            )
        )
    for i, mac in enumerate(macs):
        address = f"<rasd:Address>{escape(mac)}</rasd:Address>" if mac else ""
        items.append(
            (
                ETHERNET,
                f"ethernet{i}",
                f"{address}<rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>"
                "<rasd:ResourceSubType>virtio</rasd:ResourceSubType>",
            )
        )
    item_lines = "".join(
        f"      <Item>{body}<rasd:ElementName>{escape(label)}</rasd:ElementName>"
        f"<rasd:InstanceID>{index + 1}</rasd:InstanceID><rasd:ResourceType>{kind}</rasd:ResourceType></Item>\n"
        for index, (kind, label, body) in enumerate(items)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Envelope xmlns="{OVF}" xmlns:ovf="{OVF}" xmlns:rasd="{RASD}" xmlns:vssd="{VSSD}" '
        f'xmlns:corral="{CORRAL}">\n'
        f"  <References>\n{refs}  </References>\n"
        f"  <DiskSection>\n    <Info>Virtual disks</Info>\n{disk_lines}  </DiskSection>\n"
        f"  <NetworkSection>\n    <Info>Networks</Info>\n"
        f'    <Network ovf:name="default"><Description>corral network</Description></Network>\n'
        f"  </NetworkSection>\n"
        f"  <VirtualSystem ovf:id={quoteattr(name)}>\n    <Info>A virtual machine exported by corral</Info>\n"
        f"    <Name>{escape(name)}</Name>\n"
        + (
            f'    <corral:Boot ovf:required="false" image={quoteattr(image)}><Info>The corral image it boots'
            "</Info></corral:Boot>\n"
            if image
            else ""
        )
        + f"    <VirtualHardwareSection>\n      <Info>Virtual hardware</Info>\n"
        f"      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName>"
        f"<vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemIdentifier>{escape(name)}"
        f"</vssd:VirtualSystemIdentifier><vssd:VirtualSystemType>corral-qemu</vssd:VirtualSystemType></System>\n"
        f"{item_lines}    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n"
    )


def write_manifest(digests: dict[str, str]) -> str:
    """``SHA256(name)= hex`` per file, in the order given (the envelope first)."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in digests.items())
