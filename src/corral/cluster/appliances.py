"""Foreign VMs in and out: libvirt domain XML and OVF/OVA import, OVA export (docs/import.md).

`vm import FILE` picks the format by content (corral.cluster.backups.import_ calls ``detect``): a corral export
(tar with ``manifest.json``) stays with corral.cluster.backups; an OVA and a libvirt domain XML come here. Every
check the control plane can make happens before a row is written: the envelope or the XML, the archive's member
list, the manifest's coverage, the disk files' existence and formats. Checksums and qemu-img's checks run in the
job (corral.host.appliance_jobs) before any disk is converted; a failure there removes the VM and its boot image.

A foreign VM boots without a corral image, so the import makes one for it, ``NAME-boot``: its kernel and initrd
for a domain that boots a kernel directly, else an empty "disk" image (firmware boots the VM's first disk). An
OVA that corral wrote names the image it booted; when that image is here, the VM boots it again.

A domain XML names files on the server host, so importing one is for the local admin only (the unix socket):
over HTTPS a tenant could otherwise read any file of the host through a ``<source file=...>``. Remote users
convert to an OVA (`corral vm export --format ova`, or virt-v2v, VirtualBox, VMware) and upload that.
"""

from __future__ import annotations

import os
import struct
import tarfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.cluster import placement
from corral.cluster.vm_rows import new_vm_with_disks
from corral.errors import AlreadyExists, Conflict, Forbidden, InvalidInput
from corral.spec.backup import MANIFEST
from corral.spec.job import JobKind
from corral.spec.job_params import VMImportParams
from corral.spec.libvirt_xml import MAX_XML_BYTES, check_disk_paths, looks_like_domain, parse_domain, spec_fields
from corral.spec.names import validate_name
from corral.spec.ovf import read_ova
from corral.spec.sources import Origin, Source
from corral.spec.vm import MAX_VM_NAME, VMSpec
from corral.store import jobs
from corral.store.models import VM, Image, Job, Network

OVA_SUFFIX = ".ova"
MAX_BOOT_FILE = 512 << 20


def detect(readable: Path) -> str:
    """``corral``, ``ova`` or ``libvirt`` from the file's content (never its name); anything else is refused."""
    with readable.open("rb") as handle:
        head = handle.read(4096)
    if tarfile.is_tarfile(readable):
        # The first member decides (OVF 1.x puts the envelope first; corral writes manifest.json first), so a
        # large compressed export is not read through twice; the chosen reader then checks every member.
        try:
            with tarfile.open(readable, "r:*") as archive:
                first = archive.next()
        except (tarfile.TarError, OSError, EOFError):
            first = None
        if first is not None and first.name.endswith(".ovf") and first.name != MANIFEST:
            return "ova"
        return "corral"
    if looks_like_domain(head):
        return "libvirt"
    if b"<Envelope" in head and b"dmtf.org/ovf/envelope" in head:
        raise InvalidInput(
            "a bare .ovf envelope cannot be imported on its own",
            "pack it with its files into an OVA: `tar cf VM.ova VM.ovf VM.mf DISK.vmdk`",
        )
    return "corral"  # the export reader says what is wrong with it (not a tar archive)


def _image_for(session: Session, project: str, vm_name: str, kind: str, source: str) -> Image:
    name = f"{vm_name}-boot"
    if session.scalars(select(Image.id).where(Image.project == project, Image.name == name)).first():
        raise AlreadyExists(
            f"image {name!r} (the boot image an import makes) already exists",
            "import under another name with --name NEW, or delete that image",
        )
    image = Image(name=name, project=project, state="pending", kind=kind, source=source, details={"imported": True})
    session.add(image)
    session.flush()
    return image


def _new_name(session: Session, project: str, wanted: str) -> str:
    validate_name(wanted, "VM name")
    if len(wanted) > MAX_VM_NAME:
        raise InvalidInput(f"VM name {wanted!r} is longer than {MAX_VM_NAME} characters", "give --name NEW")
    if session.scalars(select(VM.id).where(VM.project == project, VM.name == wanted)).first():
        raise AlreadyExists(f"VM {wanted!r} already exists", "import under another name with --name NEW")
    return wanted


def _name_from(session: Session, project: str, name: str | None, found: str) -> str:
    if name is not None:
        return _new_name(session, project, name)
    try:
        return _new_name(session, project, found)
    except InvalidInput as exc:
        raise InvalidInput(
            f"the VM's name {found[:64]!r} cannot be a corral name: {exc.message}", "give one with --name NEW"
        ) from None


def _disk_size(path: Path, fmt: str) -> int:
    """The virtual size without running qemu-img (the control plane never does): a qcow2 header's size field,
    else the raw file's length. The job compares it with qemu-img's answer."""
    with path.open("rb") as handle:
        head = handle.read(32)
        length = os.fstat(handle.fileno()).st_size
    if fmt == "qcow2":
        if head[:4] != b"QFI\xfb" or len(head) < 32:
            raise InvalidInput(f"{path} is not a qcow2 image", "fix <driver type=...> in the XML")
        return int(struct.unpack(">Q", head[24:32])[0])
    return length


def _submit(
    session: Session, spec: VMSpec, project: str, sizes: list[int], image: Image, params: VMImportParams
) -> Job:
    hosts = placement.online_hosts(session)
    if not hosts:
        raise Conflict("no host agent is online", "start the daemon with `corral serve`")
    with placement.placement_lock:
        vm = new_vm_with_disks(session, spec, hosts[0].name, project, sizes, image)
        return jobs.submit(
            session,
            JobKind.VM_IMPORT,
            "vm",
            vm.name,
            target_id=vm.id,
            host=hosts[0].name,
            project=project,
            params=params,
        )


def import_libvirt(
    session: Session,
    source: Source,
    readable: Path,
    name: str | None,
    network: str | None,
    project: str,
    origin: Origin,
) -> Job:
    if not origin.local:
        raise Forbidden(
            "importing a libvirt domain XML reads the files it names on the server: that is for the local admin",
            "convert the VM to an OVA and import that (it is uploaded)",
        )
    with readable.open("rb") as handle:
        data = handle.read(MAX_XML_BYTES + 1)
    domain = parse_domain(data)
    check_disk_paths(domain)
    files = [*(d.path for d in domain.disks), *(p for p in (domain.kernel, domain.initrd) if p)]
    for text in files:
        path = Path(text)
        if not path.is_file():
            raise InvalidInput(f"{text}, named in the XML, does not exist or is not a file", "check the XML")
    for text in (p for p in (domain.kernel, domain.initrd) if p):
        if Path(text).stat().st_size > MAX_BOOT_FILE:
            raise InvalidInput(f"{text} is larger than {MAX_BOOT_FILE >> 20} MiB", "give a kernel and an initrd")
    disks = domain.boot_disks()
    sizes = [_disk_size(Path(d.path), d.format) for d in disks]
    if not disks:
        raise InvalidInput(f"domain {domain.name} has no disk", "corral VMs boot with a root disk")
    new = _name_from(session, project, name, domain.name)
    image = _image_for(session, project, new, "kernel" if domain.kernel else "disk", f"libvirt:{source.label}")
    fields = spec_fields(domain, network)
    if network is None:  # the rule: a libvirt network of a corral network's name maps to it, else user-mode NAT
        ours = set(session.scalars(select(Network.name).where(Network.project == project)))
        for nic, mapped in zip(domain.nics, fields["nics"], strict=True):  # type: ignore[call-overload]
            if nic.source in ours:
                mapped["network"] = nic.source
            elif nic.source:
                domain.warnings.append(
                    f"NIC {nic.mac or '(no MAC)'} was on {nic.source!r}, which is no corral network here: it "
                    "uses user-mode NAT (or give --network)"
                )
    spec = VMSpec.model_validate({"name": new, "image": image.name, **fields}).with_macs()
    params = VMImportParams(
        foreign="libvirt",
        source=source.params(),
        image_id=image.id,
        disks=[
            {"path": d.path, "format": d.format, "size": s, "target": d.target}
            for d, s in zip(disks, sizes, strict=True)
        ],
        kernel=domain.kernel,
        initrd=domain.initrd,
        cmdline=domain.cmdline,
        warnings=domain.warnings,
    )
    return _submit(session, spec, project, sizes, image, params)


def import_ova(
    session: Session, source: Source, readable: Path, name: str | None, network: str | None, project: str
) -> Job:
    ova = read_ova(readable, source.label)
    appliance = ova.appliance
    new = _name_from(session, project, name, appliance.name)
    image = None
    if appliance.image is not None:
        image = session.scalars(
            select(Image)
            .where(Image.name == appliance.image, Image.project.in_([project, "default"]), Image.state == "ready")
            .order_by((Image.project == "default").asc())
        ).first()
        if image is None:
            appliance.warnings.append(f"image {appliance.image!r} it booted is not here: it boots from its disk")
    made_image = image is None
    if image is None:
        image = _image_for(session, project, new, "disk", f"ova:{source.label}")
    nics = []
    for mac in appliance.macs:
        nic: dict[str, object] = {"network": network or "user"}
        if mac and len(mac) == 17:
            nic["mac"] = mac.lower()
        nics.append(nic)
    try:
        spec = VMSpec.model_validate(
            {"name": new, "image": image.name, "cpus": appliance.cpus, "memory": appliance.memory, "nics": nics}
        ).with_macs()
    except InvalidInput as exc:
        raise InvalidInput(f"the appliance's hardware cannot be mapped: {exc.message}", exc.hint) from None
    params = VMImportParams(
        foreign="ova",
        source=source.params(),
        image_id=image.id if made_image else None,
        disks=[{"href": d.href, "size": d.capacity} for d in appliance.disks],
        manifest={k: list(v) for k, v in ova.manifest.items()},
        warnings=appliance.warnings,
    )
    return _submit(session, spec, project, [d.capacity for d in appliance.disks], image, params)


def check_ova_path(text: str) -> Path:
    """The local admin's OVA path: absolute, named .ova, new, in an existing directory."""
    path = Path(text)
    if not path.is_absolute():
        raise InvalidInput(f"archive path {text!r} is not absolute", "give the full path")
    if not text.endswith(OVA_SUFFIX):
        raise InvalidInput(f"an OVA's name {path.name!r} does not end with .ova", "name it like VM.ova")
    if len(text.encode()) > 4096 or any(len(part.encode()) > 255 for part in text.split("/")):
        raise InvalidInput("the archive path is too long", "give a shorter path (at most 255 bytes per name)")
    if not path.parent.is_dir():
        raise InvalidInput(f"directory {path.parent} does not exist", "create it first")
    if path.exists() or path.is_symlink():
        raise InvalidInput(f"{text} already exists", "choose a new file name, or remove the old one")
    return path
