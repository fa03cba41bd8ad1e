"""OVF envelopes, manifests and OVA archives on crafted files, and VMDKs made by the real qemu-img."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from corral.errors import InvalidInput
from corral.host.appliance_jobs import check_vmdk, vmdk_to_qcow2, write_ova
from corral.spec.ovf import parse_envelope, read_ova, verify_members, vmdk_problem

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0, reason="needs qemu-img"
)


def _qcow2(path: Path, size: str = "8M", data: bytes = b"") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if data:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {len(data)}", str(path)], check=True, capture_output=True
        )
    return path


@pytest.fixture
def ova(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    disk = _qcow2(tmp_path / "root.qcow2", data=b"x" * 4096)
    target = tmp_path / "web.ova"
    write_ova(target, "web", 2, 384 << 20, ["52:54:00:11:22:33"], [disk], staging, image="tiny")
    return target


def test_export_reads_back(ova: Path, tmp_path: Path) -> None:
    checked = read_ova(ova)
    assert (checked.appliance.name, checked.appliance.cpus, checked.appliance.memory) == ("web", 2, 384 << 20)
    assert checked.appliance.macs == ["52:54:00:11:22:33"]
    assert [d.capacity for d in checked.appliance.disks] == [8 << 20]
    assert checked.appliance.warnings == [] and checked.appliance.image == "tiny"
    verify_members(ova, checked)
    with tarfile.open(ova) as archive:
        assert archive.getnames()[:2] == ["web.ovf", "web.mf"]  # OVF 1.x: the envelope first
        archive.extract("web-disk0.vmdk", tmp_path, filter="data")
    vmdk = tmp_path / "web-disk0.vmdk"
    assert check_vmdk(vmdk, "disk")["format-specific"]["data"]["create-type"] == "streamOptimized"
    back = tmp_path / "back.qcow2"
    assert vmdk_to_qcow2(vmdk, back, "disk") == 8 << 20
    out = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(back), str(tmp_path / "root.qcow2")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _rewrite(ova: Path, target: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """A copy of ``ova`` with its members passed through ``change(name, data) -> [(name, data, kind)]``."""
    with tarfile.open(ova) as source, tarfile.open(target, "w") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read()  # type: ignore[union-attr]
            for name, new, kind in change(member.name, data):
                info = tarfile.TarInfo(name)
                info.size, info.type = len(new), kind
                if kind == tarfile.SYMTYPE:
                    info.size, info.linkname = 0, "/etc/shadow"
                out.addfile(info, io.BytesIO(new) if kind == tarfile.REGTYPE else None)
    return target


def _flip_disk(name: str, data: bytes) -> list:  # type: ignore[type-arg]
    if name.endswith(".vmdk"):
        data = data[:-1] + bytes([data[-1] ^ 1])
    return [(name, data, tarfile.REGTYPE)]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda n, d: [] if n.endswith(".vmdk") else [(n, d, tarfile.REGTYPE)], "lacks the disk"),
        (lambda n, d: [("../" + n if n.endswith(".vmdk") else n, d, tarfile.REGTYPE)], "not a plain file name"),
        (lambda n, d: [(n, d, tarfile.SYMTYPE if n.endswith(".vmdk") else tarfile.REGTYPE)], "not a regular file"),
        (
            lambda n, d: [
                (n, d.replace(b"web-disk0.vmdk", b"../../etc/shadow") if n.endswith(".ovf") else d, tarfile.REGTYPE)
            ],
            "not a plain file name",
        ),
        (
            lambda n, d: [
                (n, d, tarfile.REGTYPE),
                *([("extra.txt", b"x", tarfile.REGTYPE)] if n.endswith(".mf") else []),
            ],
            "no checksum for extra.txt",
        ),
    ],
)
def test_bad_archives_are_refused_before_reading_disks(ova: Path, tmp_path: Path, change, words: str) -> None:  # type: ignore[no-untyped-def]
    bad = _rewrite(ova, tmp_path / "bad.ova", change)
    with pytest.raises(InvalidInput, match=words):
        read_ova(bad)


def test_bad_checksum_is_found(ova: Path, tmp_path: Path) -> None:
    bad = _rewrite(ova, tmp_path / "bad.ova", _flip_disk)
    checked = read_ova(bad)  # the member list and envelope are sound
    with pytest.raises(InvalidInput, match="does not match its manifest checksum"):
        verify_members(bad, checked)


def test_vmdk_descriptor_naming_another_file_is_refused(tmp_path: Path) -> None:
    descriptor = tmp_path / "evil.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\nRW 2048 FLAT "/etc/shadow" 0\n'
    )
    with pytest.raises(InvalidInput, match="descriptor, which names other files"):
        check_vmdk(descriptor, "evil.vmdk")
    assert vmdk_problem(b"\n\n# Disk DescriptorFile") is not None
    assert vmdk_problem(b"not a vmdk at all" * 10) == "it is not a sparse VMDK (no KDMV header)"


def test_sparse_vmdk_with_a_parent_is_refused(tmp_path: Path) -> None:
    vmdk = tmp_path / "a.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "8M"], check=True)
    head = bytearray(vmdk.read_bytes()[: 1 << 16])
    assert vmdk_problem(bytes(head)) is None  # monolithicSparse, qemu-img's default, is fine
    offset = struct.unpack_from("<Q", head, 28)[0] * 512
    text = head[offset : offset + 1024].replace(b"parentCID=ffffffff", b"parentCID=12345678")
    head[offset : offset + 1024] = text
    assert vmdk_problem(bytes(head)) == "its descriptor names a parent disk"


ENVELOPE = """<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References><File ovf:id="f1" ovf:href="box-disk1.vmdk"/></References>
 <DiskSection><Info>d</Info><Disk ovf:diskId="vmdisk1" ovf:fileRef="f1" ovf:capacity="2"
   ovf:capacityAllocationUnits="byte * 2^30" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
 <VirtualSystem ovf:id="box"><Info>v</Info><Name>box</Name><VirtualHardwareSection><Info>h</Info>
  <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
  <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType>
   <rasd:VirtualQuantity>1024</rasd:VirtualQuantity></Item>
  <Item><rasd:ResourceType>20</rasd:ResourceType></Item>
  <Item><rasd:ElementName>sound</rasd:ElementName><rasd:ResourceType>35</rasd:ResourceType></Item>
  <Item><rasd:ElementName>adapter 1</rasd:ElementName><rasd:ResourceSubType>E1000</rasd:ResourceSubType>
   <rasd:ResourceType>10</rasd:ResourceType></Item>
  <Item><rasd:HostResource>/disk/vmdisk1</rasd:HostResource><rasd:ResourceType>17</rasd:ResourceType></Item>
 </VirtualHardwareSection></VirtualSystem></Envelope>"""


def test_virtualbox_style_envelope() -> None:
    box = parse_envelope(ENVELOPE.encode())
    assert (box.name, box.cpus, box.memory, box.disks[0].capacity) == ("box", 4, 1 << 30, 2 << 30)
    assert box.macs == [None]
    assert any("sound card 'sound'" in w for w in box.warnings) and any("E1000" in w for w in box.warnings)
    with pytest.raises(InvalidInput, match="DOCTYPE"):
        parse_envelope(b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/shadow'>]>" + ENVELOPE.encode()[21:])
    with pytest.raises(InvalidInput, match="does not describe"):
        parse_envelope(ENVELOPE.replace("/disk/vmdisk1</rasd", "/disk/vmdisk9</rasd").encode())
    assert hashlib.sha256(b"").hexdigest()  # keeps the import honest for linters


def test_import_tells_an_ova_from_a_corral_export_by_content(ova: Path, tmp_path: Path) -> None:
    from corral.cluster.appliances import detect

    renamed = tmp_path / "looks-like.tar"
    renamed.write_bytes(ova.read_bytes())
    assert detect(renamed) == "ova"
    export = tmp_path / "export.ova"
    with tarfile.open(export, "w") as out:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        out.addfile(info, io.BytesIO(b"{}"))
    assert detect(export) == "corral"
    xml = tmp_path / "domain.tar"
    xml.write_bytes(b"<?xml version='1.0'?>\n<domain type='kvm'><name>x</name></domain>")
    assert detect(xml) == "libvirt"
    bare = tmp_path / "bare.ova"
    bare.write_bytes(b"<?xml version='1.0'?><Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'/>")
    with pytest.raises(InvalidInput, match=r"bare \.ovf"):
        detect(bare)
