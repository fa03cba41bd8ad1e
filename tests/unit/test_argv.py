"""Golden-file tests of the QEMU command line: any change to what QEMU gets shows up as a diff here.

Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/test_argv.py
"""

import os
from pathlib import Path

import pytest

from corral.engine.argv import build_argv
from corral.engine.plan import DiskPlan, KernelBoot, LaunchPlan, NicPlan, UefiFirmware

GOLDEN = Path(__file__).parent / "golden"

PLANS = {
    "tiny_kernel_boot": LaunchPlan(
        name="demo",
        uuid="12345678-1234-1234-1234-123456789abc",
        run_dir=Path("/var/lib/corral/run/0123456789ab"),
        accel="tcg",
        cpus=1,
        memory_mib=256,
        tb_size_mib=64,
        kernel_boot=KernelBoot(
            kernel=Path("/var/lib/corral/images/i1/vmlinuz"),
            initrd=Path("/var/lib/corral/images/i1/initrd.img"),
            cmdline="console=ttyS0 root=/dev/vda rw corral.hostname=demo",
        ),
        disks=(
            DiskPlan(node="disk0", path=Path("/var/lib/corral/pools/default/demo-root.qcow2")),
            DiskPlan(node="disk1", path=Path("/var/lib/corral/pools/default/demo-disk1.qcow2")),
        ),
        nics=(NicPlan(id="net0", mac="52:54:00:12:34:56"),),
    ),
    "disk_boot_kvm_two_nics": LaunchPlan(
        name="web,1",  # a comma must be escaped for QEMU's option parser
        uuid="12345678-1234-1234-1234-123456789abc",
        run_dir=Path("/srv/corral/run/abcdef012345"),
        accel="kvm",
        machine="pc",
        cpus=4,
        memory_mib=2048,
        disks=(DiskPlan(node="disk0", path=Path("/srv/pool/web-root.qcow2")),),
        nics=(NicPlan(id="net0", mac="52:54:00:00:00:01"), NicPlan(id="net1", mac="52:54:00:00:00:02")),
        guest_agent=False,
        extra_args=("-sandbox", "on,obsolete=deny", "-runas", "1879048192:995"),
    ),
    "uefi_disk_boot_with_seed": LaunchPlan(
        name="cloud",
        uuid="12345678-1234-1234-1234-123456789abc",
        run_dir=Path("/var/lib/corral/run/0123456789ab"),
        accel="tcg",
        memory_mib=1024,
        tb_size_mib=256,
        uefi=UefiFirmware(
            code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            vars=Path("/var/lib/corral/run/0123456789ab/uefi-vars.qcow2"),
        ),
        disks=(
            DiskPlan(node="disk0", path=Path("/var/lib/corral/pools/default/cloud-root.qcow2")),
            DiskPlan(node="seed", path=Path("/var/lib/corral/run/0123456789ab/seed.iso"), format="raw", read_only=True),
        ),
        nics=(NicPlan(id="net0", mac="52:54:00:12:34:56", forwards=("tcp:127.0.0.1:40022-:22",)),),
    ),
    "bridged_nics_on_hotplug_ports": LaunchPlan(
        name="web",
        uuid="12345678-1234-1234-1234-123456789abc",
        run_dir=Path("/srv/corral/run/abcdef012345"),
        accel="tcg",
        disks=(DiskPlan(node="disk0", path=Path("/srv/pool/web-root.qcow2")),),
        nics=(
            NicPlan(
                id="net0",
                mac="52:54:00:00:00:01",
                mode="tap",
                ifname="crt0123456789",
                bridge="crl01234567",
                bus="nicport0",
            ),
            NicPlan(id="net2", mac="52:54:00:00:00:02", forwards=("tcp:0.0.0.0:8080-:80",), bus="nicport2"),
        ),
        hotplug_ports=("nicport0", "nicport1", "nicport2"),
    ),
    "resizable_balloon_cpu_slots_disk_ports": LaunchPlan(
        name="grow",
        uuid="12345678-1234-1234-1234-123456789abc",
        run_dir=Path("/srv/corral/run/abcdef012345"),
        accel="tcg",
        cpus=1,
        max_cpus=4,
        memory_mib=512,
        balloon=True,
        disks=(
            DiskPlan(node="disk0", path=Path("/srv/pool/grow-root.qcow2")),
            DiskPlan(node="disk2", path=Path("/srv/pool/grow-disk2.qcow2"), bus="diskport1"),
        ),
        nics=(NicPlan(id="net0", mac="52:54:00:00:00:01", bus="nicport0"),),
        hotplug_ports=("nicport0",),
        disk_ports=tuple(f"diskport{i}" for i in range(10)),
    ),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_argv_matches_golden_file(name):
    argv = build_argv(PLANS[name])
    rendered = "\n".join(argv) + "\n"
    golden = GOLDEN / f"argv_{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def test_boot_disk_gets_bootindex_only_without_a_kernel():
    kernel = build_argv(PLANS["tiny_kernel_boot"])
    disk = build_argv(PLANS["disk_boot_kvm_two_nics"])
    assert not any("bootindex" in arg for arg in kernel)
    assert any("bootindex=0" in arg for arg in disk)


def test_kvm_uses_host_cpu_and_tcg_uses_max():
    assert (
        build_argv(PLANS["disk_boot_kvm_two_nics"])[build_argv(PLANS["disk_boot_kvm_two_nics"]).index("-cpu") + 1]
        == "host"
    )
    argv = build_argv(PLANS["tiny_kernel_boot"])
    assert argv[argv.index("-cpu") + 1] == "max"


def test_uefi_maps_shared_code_read_only_and_the_vms_own_vars_writable():
    argv = build_argv(PLANS["uefi_disk_boot_with_seed"])
    machine = argv[argv.index("-machine") + 1]
    assert "pflash0=uefi-code" in machine and "pflash1=uefi-vars" in machine
    blockdevs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-blockdev"]
    code = [b for b in blockdevs if "OVMF_CODE_4M.fd" in b]
    vars_ = [b for b in blockdevs if "uefi-vars" in b]
    assert code and all("read-only=on" in b for b in code)
    assert vars_ and not any("read-only" in b for b in vars_)
    assert any("bootindex=0" in arg for arg in argv)  # the disk still boots first; no -kernel
    assert "-kernel" not in argv


def test_bios_adds_no_firmware_options():
    argv = build_argv(PLANS["disk_boot_kvm_two_nics"])
    assert not any("pflash" in arg or "OVMF" in arg for arg in argv)
