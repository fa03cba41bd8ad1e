"""Golden-file tests of the QEMU command line: any change to what QEMU gets shows up as a diff here.

Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/test_argv.py
"""

import os
from pathlib import Path

import pytest

from corral.engine.argv import build_argv
from corral.engine.plan import DiskPlan, KernelBoot, LaunchPlan, NicPlan

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
