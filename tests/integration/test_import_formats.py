"""`corral vm import` of a libvirt domain XML and of OVAs, and `vm export --format ova`, on real QEMU.

The domain XML is written as `virsh dumpxml` writes it (libvirt's documented format; libvirt is not installed
here) and boots the tiny image's kernel with a standalone copy of its root disk, as a libvirt user's direct-boot
VM would. The OVA is the one `vm export --format ova` wrote, re-imported and booted with its data; the hostile
inputs are made from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import unique

pytestmark = pytest.mark.integration

MAC = "52:54:00:3c:a1:07"
DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>6a1b5c1e-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='{disk_type}' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x1234'/><product id='0xbeef'/></source>
    </hostdev>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def _exec(daemon, vm: str, script: str) -> str:  # type: ignore[no-untyped-def]
    return daemon.cli("vm", "exec", vm, "--", "sh", "-c", script).stdout


def _state(daemon) -> tuple[set[str], set[str], list[str]]:  # type: ignore[no-untyped-def]
    """VMs, images and pool files: what a failed import must leave as it found."""
    pool = daemon.home / "pools" / "default"
    return (
        {v["name"] for v in daemon.cli_json("vm", "list")},
        {i["name"] for i in daemon.cli_json("image", "list")},
        sorted(p.name for p in pool.iterdir()) if pool.is_dir() else [],
    )


@pytest.fixture(scope="module")
def domain_files(daemon, tiny, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The tiny image's kernel and initrd, and a standalone qcow2 copy of its root disk, where a libvirt user
    keeps them."""
    image = next(i for i in daemon.cli_json("image", "list") if i["name"] == tiny)
    source = daemon.home / "images" / image["id"]
    where = tmp_path_factory.mktemp("libvirt")
    disk = where / "web.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(source / "rootfs.qcow2"), str(disk)], check=True)
    return {
        "kernel": source / "vmlinuz",
        "initrd": source / "initrd.img",
        "cmdline": image["cmdline"],
        "disk": disk,
        "dir": where,
    }


def _domain(files: dict, name: str, **changes: str) -> str:  # type: ignore[type-arg]
    values = {
        "name": name,
        "kernel": files["kernel"],
        "initrd": files["initrd"],
        "cmdline": files["cmdline"],
        "disk": files["disk"],
        "disk_type": "file",
        "mac": MAC,
        **changes,
    }
    return DOMAIN.format(**values)


@pytest.fixture(scope="module")
def imported(daemon, domain_files):  # type: ignore[no-untyped-def]
    """The domain imported and booted; yields its name and the import job's result."""
    name = unique("lv")
    xml = domain_files["dir"] / "web.xml"
    xml.write_text(_domain(domain_files, "web-from-libvirt"))
    job = daemon.cli_json("vm", "import", str(xml), "--name", name)
    daemon.cli("vm", "start", name, "--wait", timeout=240)
    yield name, job["result"]
    daemon.cli("vm", "delete", name, "--force", check=False)
    daemon.cli("image", "delete", f"{name}-boot", check=False)


def test_libvirt_domain_boots_with_its_mac_and_cpus(daemon, imported):  # type: ignore[no-untyped-def]
    name, result = imported
    assert result["format"] == "libvirt"
    warnings = "\n".join(result["warnings"])
    assert "hostdev" in warnings and "graphics" in warnings and "host-passthrough" in warnings
    assert f"NIC {MAC} was on 'default', which is no corral network here" in warnings  # no such network here
    assert _exec(daemon, name, "cat /sys/class/net/eth0/address").strip() == MAC
    assert _exec(daemon, name, "grep -c ^processor /proc/cpuinfo").strip() == "2"
    shown = daemon.cli_json("vm", "show", name)
    assert shown["spec"]["cpus"] == 2 and shown["spec"]["image"] == f"{name}-boot"


def test_ova_export_reimports_and_boots_with_its_data(daemon, imported, tmp_path):  # type: ignore[no-untyped-def]
    name, _ = imported
    _exec(daemon, name, "echo from-ova > /root/ova-marker; sync")
    ova = tmp_path / "web.ova"
    daemon.cli("vm", "export", name, str(ova))  # the .ova name picks the format
    with tarfile.open(ova) as archive:
        names = archive.getnames()
        assert names[0].endswith(".ovf") and names[1].endswith(".mf") and names[2].endswith(".vmdk")
        archive.extract(names[2], tmp_path, filter="data")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "vmdk", str(tmp_path / names[2])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"  # other tools read it back
    copy = unique("ova")
    job = daemon.cli_json("vm", "import", str(ova), "--name", copy, "--start")
    try:
        assert job["result"]["format"] == "ova"
        assert _exec(daemon, copy, "cat /root/ova-marker").strip() == "from-ova"
        assert _exec(daemon, copy, "grep -c ^processor /proc/cpuinfo").strip() == "2"
    finally:
        daemon.cli("vm", "delete", copy, "--force", check=False)
    _hostile_ovas(daemon, ova, tmp_path)


def _rewrite(source: Path, target: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the OVA with each member passed through ``change(name, data)``, the manifest recomputed unless
    ``change`` returns it itself."""
    with tarfile.open(source) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(target, "w") as out:
        for name, data in members:
            for new_name, new_data in change(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                out.addfile(info, io.BytesIO(new_data))
    return target


def _manifest(entries: dict[str, bytes]) -> bytes:
    return "".join(f"SHA256({n})= {hashlib.sha256(d).hexdigest()}\n" for n, d in entries.items()).encode()


def _hostile_ovas(daemon, ova: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with tarfile.open(ova) as archive:
        ovf, mf, vmdk = archive.getnames()
        envelope = archive.extractfile(ovf).read()  # type: ignore[union-attr]
    descriptor = (
        b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        b'RW 2048 FLAT "/etc/shadow" 0\n'
    )

    def evil_disk(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name == vmdk:
            return [(name, descriptor)]
        if name == mf:  # a manifest that matches, so only the VMDK check stands between it and /etc/shadow
            return [(name, _manifest({ovf: envelope.replace(b'ovf:size="', b'ovf:x="'), vmdk: descriptor}))]
        return [(name, envelope.replace(b'ovf:size="', b'ovf:x="'))]

    def flip(name: str, data: bytes) -> list[tuple[str, bytes]]:
        return [(name, data[:-1] + bytes([data[-1] ^ 1]) if name == vmdk else data)]

    foreign = re.sub(rb"\s*<corral:Boot.*?</corral:Boot>", b"", envelope, flags=re.S)
    assert foreign != envelope
    with tarfile.open(ova) as archive:
        disk = archive.extractfile(vmdk).read()  # type: ignore[union-attr]

    def foreign_flip(name: str, data: bytes) -> list[tuple[str, bytes]]:
        """Not corral's: the import makes a boot image, and the job's checksum failure must remove it too."""
        if name == ovf:
            return [(name, foreign)]
        if name == mf:
            return [(name, _manifest({ovf: foreign, vmdk: disk}))]
        return flip(name, data)

    cases = [
        (_rewrite(ova, tmp_path / "sum.ova", flip), "does not match its manifest checksum"),
        (_rewrite(ova, tmp_path / "foreign.ova", foreign_flip), "does not match its manifest checksum"),
        (_rewrite(ova, tmp_path / "missing.ova", lambda n, d: [] if n == vmdk else [(n, d)]), "lacks the disk"),
        (
            _rewrite(ova, tmp_path / "dots.ova", lambda n, d: [("../" + n if n == vmdk else n, d)]),
            "not a plain file name",
        ),
        (_rewrite(ova, tmp_path / "shadow.ova", evil_disk), "names other files"),
    ]
    before = _state(daemon)
    for path, words in cases:
        result = daemon.cli("vm", "import", str(path), "--name", "bad-ova", check=False)
        assert result.returncode != 0 and words in result.stderr, (path.name, result.stderr)
        assert _state(daemon) == before, path.name


def test_bad_domains_make_nothing(daemon, domain_files, imported):  # type: ignore[no-untyped-def]
    where = domain_files["dir"]
    cases = [
        (_domain(domain_files, "x", disk_type="network"), "type 'network'"),
        (_domain(domain_files, "x", disk=f"{where}/../{where.name}/web.qcow2"), "without '..'"),
        (_domain(domain_files, "x", disk=f"{where}/nothing.qcow2"), "does not exist"),
        ("<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/shadow'>]>" + _domain(domain_files, "x"), "DOCTYPE"),
    ]
    before = _state(daemon)
    for index, (text, words) in enumerate(cases):
        xml = where / f"bad{index}.xml"
        xml.write_text(text)
        result = daemon.cli("vm", "import", str(xml), "--name", "bad-xml", check=False)
        assert result.returncode != 0 and words in result.stderr, (words, result.stderr)
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert _state(daemon) == before
