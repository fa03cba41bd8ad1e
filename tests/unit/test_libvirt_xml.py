"""The libvirt domain XML reader on crafted inputs: libvirt's documented format, hostile XML, unmappable parts."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from corral.errors import InvalidInput
from corral.spec.firmware import Firmware
from corral.spec.libvirt_xml import check_disk_paths, looks_like_domain, parse_domain, spec_fields
from corral.spec.vm import VMSpec

# As `virsh dumpxml` writes a domain (libvirt's formatdomain documentation), trimmed of nothing that matters.
DOMAIN = b"""<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/data.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <interface type='network'>
      <mac address='52:54:00:AB:cd:01'/>
      <source network='default'/>
      <model type='e1000'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='spice' autoport='yes'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x06' slot='0x00' function='0x0'/></source>
    </hostdev>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def test_maps_what_libvirt_writes() -> None:
    vm = parse_domain(DOMAIN)
    assert (vm.name, vm.cpus, vm.max_cpus) == ("web1", 2, 4)
    assert (vm.memory, vm.max_memory) == (512 << 20, 1 << 30)
    assert vm.firmware is Firmware.UEFI
    assert [d.target for d in vm.boot_disks()] == ["vda", "vdb"]  # boot order first
    assert [d.format for d in vm.boot_disks()] == ["qcow2", "raw"]
    assert vm.nics[0].mac == "52:54:00:AB:cd:01" and vm.nics[0].source == "default"
    assert vm.serial and vm.guest_agent
    joined = "\n".join(vm.warnings)
    for dropped in ("hostdev", "graphics", "cdrom sda", "e1000", "host-passthrough", "nvram"):
        assert dropped in joined, dropped
    assert all("\n" not in line for line in vm.warnings)
    spec = VMSpec.model_validate({"name": "web1", "image": "tiny", **spec_fields(vm, "lan")})
    assert spec.nics[0].mac == "52:54:00:ab:cd:01" and spec.nics[0].network == "lan"
    assert (spec.cpus, spec.max_cpus, spec.firmware) == (2, 4, Firmware.UEFI)


def test_direct_kernel_boot_and_bios() -> None:
    vm = parse_domain(b"""<domain type='qemu'><name>k</name><memory>65536</memory><vcpu>1</vcpu>
      <os><type>hvm</type><kernel>/srv/k/vmlinuz</kernel><initrd>/srv/k/initrd</initrd>
      <cmdline>console=ttyS0 root=/dev/vda</cmdline></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/srv/k/root.qcow2'/><target dev='vda'/></disk></devices></domain>""")
    assert (vm.kernel, vm.initrd, vm.cmdline) == ("/srv/k/vmlinuz", "/srv/k/initrd", "console=ttyS0 root=/dev/vda")
    assert vm.firmware is None and vm.memory == 64 << 20 and vm.max_memory is None
    check_disk_paths(vm, PurePosixPath("/srv/k"))


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        (
            DOMAIN.replace(
                b"type='file' device='disk'>\n      <driver name='qemu' type='raw'/>",
                b"type='network' device='disk'>\n      <driver name='qemu' type='raw'/>",
            ),
            "type 'network'",
        ),
        (
            DOMAIN.replace(b"type='block' ", b"").replace(
                b"<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>",
                b"<disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>",
            ),
            "type 'block'",
        ),
        (DOMAIN.replace(b"type='qcow2'", b"type='vmdk'"), "vmdk"),
        (b"<domain><name>x</name><memory>65536</memory><devices/></domain>", "no disk"),
        (b"<domain><name>x</name><devices/></domain>", "no <memory>"),
        (b"<network><name>x</name></network>", "not <domain>"),
        (b"<domain><name>x</name", "not well-formed"),
        (
            b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]><domain>&b;</domain>",
            "DOCTYPE",
        ),
        (b"<!DOCTYPE d SYSTEM 'file:///etc/shadow'><domain><name>&x;</name></domain>", "DOCTYPE"),
        (DOMAIN.replace(b"current='2'>4", b"current='9'>4"), "vcpu current"),
        (DOMAIN.replace(b"<type arch='x86_64' machine='pc-q35-7.2'>hvm", b"<type arch='aarch64'>hvm"), "x86_64"),
        (b" " * (1 << 20) + b"<domain/>", "larger"),
    ],
)
def test_unusable_domains_are_refused(xml: bytes, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_domain(xml)
    assert words in caught.value.message
    assert caught.value.hint


@pytest.mark.parametrize(
    ("path", "words"),
    [("images/web1.qcow2", "absolute"), ("/srv/vm/../../etc/shadow", "'..'"), ("/etc/shadow", "outside /srv/vm")],
)
def test_paths_outside_the_allowed_directory_are_refused(path: str, words: str) -> None:
    vm = parse_domain(DOMAIN.replace(b"/var/lib/libvirt/images/web1.qcow2", path.encode()))
    with pytest.raises(InvalidInput, match=words.replace(".", r"\.")):
        check_disk_paths(vm, PurePosixPath("/srv/vm") if words.startswith("outside") else None)


def test_format_detection_by_content() -> None:
    assert looks_like_domain(DOMAIN)
    assert looks_like_domain(b"\xef\xbb\xbf<?xml version='1.0'?>\n<!-- virsh edit -->\n<domain type='kvm'>")
    assert not looks_like_domain(b"<domainx/>")
    assert not looks_like_domain(b"<?xml version='1.0'?><Envelope/>")


def test_a_doctype_still_reads_as_a_domain_to_be_refused() -> None:
    assert looks_like_domain(b"<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/shadow'>]><domain type='kvm'>")


def test_remote_callers_cannot_name_host_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Over HTTPS a domain XML is refused before it is read: its <source file=...> would name host files."""
    from corral.cluster.appliances import import_libvirt
    from corral.errors import Forbidden
    from corral.spec.sources import Origin, Source, SourceKind

    xml = tmp_path / "d.xml"
    xml.write_bytes(DOMAIN)
    source = Source(SourceKind.UPLOAD, xml, "upload 0123")
    with pytest.raises(Forbidden, match="local admin"):
        import_libvirt(None, source, xml, None, None, "default", Origin(tmp_path, None, local=False))  # type: ignore[arg-type]
