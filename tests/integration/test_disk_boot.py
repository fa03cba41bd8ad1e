"""Users' own disk images, booted through firmware and the disk's own bootloader: SeaBIOS and UEFI (OVMF).

The disk (tests/integration/bootdisk.py) carries syslinux for BIOS and GRUB for UEFI, each adding its own marker
to the kernel command line. corral boots disk images with no -kernel at all, so the marker in the guest's
/proc/cmdline shows which firmware and bootloader the guest really came up through.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.paths import default_cache
from tests.conftest import qemu_pids_under, require, unique
from tests.integration.bootdisk import MARKER_BIOS, MARKER_UEFI, build_boot_disk, missing_tools

pytestmark = pytest.mark.integration

TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT = "600"  # firmware + bootloader + kernel under TCG on a shared 2-core host


@pytest.fixture(scope="module")
def boot_disk(qemu_available) -> Path:  # type: ignore[no-untyped-def]
    missing = missing_tools()
    require(not missing, f"the test disk needs {', '.join(missing)} (run scripts/install-system-deps.sh)")
    return build_boot_disk(Path(os.environ.get("CORRAL_CACHE") or default_cache()))


@pytest.fixture(scope="module")
def ovmf() -> None:
    require(TEMPLATE.is_file(), "OVMF is not installed (apt-get install ovmf)")


@pytest.fixture(scope="module")
def images(daemon, boot_disk):  # type: ignore[no-untyped-def]
    """The same disk imported twice: as a cloud image (SeaBIOS, NoCloud seed) and as a UEFI image."""
    bios, uefi = unique("disk-bios"), unique("disk-uefi")
    shown = daemon.cli("image", "import", bios, str(boot_disk), "--cloud-init").stdout
    assert "disk image" in shown and "uefi" not in shown
    shown = daemon.cli("image", "import", uefi, str(boot_disk), "--firmware", "uefi").stdout
    assert "boots through uefi" in shown
    yield {"bios": bios, "uefi": uefi}
    for name in (bios, uefi):
        daemon.cli("image", "rm", name, check=False)


def _run(daemon, image: str, *extra: str) -> str:  # type: ignore[no-untyped-def]
    name = unique("boot")
    daemon.cli(
        "vm",
        "run",
        name,
        "--image",
        image,
        "--memory",
        "256M",
        "--timeout",
        BOOT_TIMEOUT,
        *extra,
        timeout=int(BOOT_TIMEOUT) + 120,
    )
    return name


def _cmdline(daemon, name: str) -> str:  # type: ignore[no-untyped-def]
    return daemon.cli("vm", "exec", name, "--", "cat", "/proc/cmdline").stdout


def _qemu_argv(daemon, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    pid = daemon.cli_json("vm", "show", name)["pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _run_dir(daemon, name: str) -> Path:  # type: ignore[no-untyped-def]
    return daemon.home / "run" / daemon.cli_json("vm", "show", name)["id"][:12]


def test_a_cloud_disk_boots_through_seabios_and_its_own_bootloader_with_its_seed(daemon, images):
    name = _run(daemon, images["bios"])
    try:
        cmdline = _cmdline(daemon, name)
        assert MARKER_BIOS in cmdline, cmdline
        assert "corral.hostname" not in cmdline  # nothing came from corral's direct kernel boot
        argv = _qemu_argv(daemon, name)
        assert "-kernel" not in argv and not any("pflash" in arg for arg in argv)
        # The NoCloud seed is the second disk: its ISO 9660 volume label sits at byte 32808.
        label = daemon.cli("vm", "exec", name, "--", "dd", "if=/dev/vdb", "bs=1", "skip=32808", "count=6").stdout
        assert label.lower() == "cidata"
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)


def _raw(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True, capture_output=True)
    return out.read_bytes()


def test_an_image_imported_for_uefi_boots_through_ovmf_and_grub_with_its_own_vars(daemon, images, ovmf, tmp_path):
    name = _run(daemon, images["uefi"])
    try:
        cmdline = _cmdline(daemon, name)
        assert MARKER_UEFI in cmdline, cmdline
        argv = _qemu_argv(daemon, name)
        assert "-kernel" not in argv
        assert any("pflash1=uefi-vars" in arg for arg in argv)
        store = _run_dir(daemon, name) / "uefi-vars.qcow2"
        assert any(str(store) in arg for arg in argv)
        info = store.stat()
        assert info.st_mode & 0o777 == 0o600
        runas = argv[argv.index("-runas") + 1] if "-runas" in argv else None
        if runas is not None:  # isolation on: the store belongs to the VM's own uid, like its disks
            assert info.st_uid == int(runas.split(":")[0])
        daemon.cli("vm", "stop", name, "--timeout", "60")
        assert store.exists()  # kept across stops: it is the VM's firmware state
        # OVMF wrote its variables (the boot entries it found) into the VM's copy, never into the package's.
        written = _raw(store, tmp_path / "vars.raw")
        assert written != TEMPLATE.read_bytes()
        run_dir = _run_dir(daemon, name)
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)
    assert not run_dir.exists()


def test_the_vm_firmware_overrides_the_images(daemon, images, ovmf):
    name = _run(daemon, images["bios"], "--firmware", "uefi")
    try:
        assert MARKER_UEFI in _cmdline(daemon, name)
        assert daemon.cli_json("vm", "show", name)["spec"]["firmware"] == "uefi"
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)


def _state(daemon):  # type: ignore[no-untyped-def]
    pool = daemon.home / "pools" / "default"
    return (
        sorted(v["name"] for v in daemon.cli_json("vm", "list")),
        sorted(v["name"] for v in daemon.cli_json("volume", "list")),
        sorted(i["name"] for i in daemon.cli_json("image", "list")),
        sorted(p.name for p in pool.iterdir()),
        sorted(qemu_pids_under(daemon.home)),
    )


def test_an_unknown_firmware_is_one_line_and_changes_nothing(daemon, images, boot_disk):
    before = _state(daemon)
    for args in (
        ["vm", "create", unique("fw"), "--image", images["bios"], "--firmware", "efi"],
        ["vm", "run", unique("fw"), "--image", images["bios"], "--firmware", "efi"],
        ["image", "import", unique("fw"), str(boot_disk), "--firmware", "efi"],
    ):
        result = daemon.cli(*args, check=False)
        assert result.returncode != 0, args
        assert "unknown firmware 'efi'" in result.stderr and "uefi" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _state(daemon) == before


def test_uefi_on_a_host_without_ovmf_is_refused_and_leaves_nothing(fresh_daemon, boot_disk):
    corral = fresh_daemon(CORRAL_OVMF_CODE="/nonexistent/OVMF_CODE_4M.fd")
    corral.start()
    image = unique("disk")
    corral.cli("image", "import", image, str(boot_disk), "--firmware", "uefi")
    before = _state(corral)
    for verb in ("create", "run"):
        result = corral.cli("vm", verb, unique("fw"), "--image", image, check=False)
        assert result.returncode != 0
        # The host refuses it in the create job, so the job's progress lines may come first: one error line.
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert "UEFI firmware is not installed" in errors[0] and "install the ovmf package" in errors[0]
    assert _state(corral) == before
    # The same disk still boots through SeaBIOS there when the VM asks for it.
    name = _run(corral, image, "--firmware", "bios")
    assert MARKER_BIOS in _cmdline(corral, name)
    corral.cli("vm", "delete", name, "--force")


def _sh(daemon, name: str, script: str) -> str:  # type: ignore[no-untyped-def]
    return daemon.cli("vm", "exec", name, "--", "/bin/sh", "-c", script).stdout


def test_memory_snapshots_of_a_uefi_vm_cover_its_firmware_variables(daemon, images, ovmf):
    name = _run(daemon, images["uefi"])
    try:
        store = _run_dir(daemon, name) / "uefi-vars.qcow2"
        _sh(daemon, name, "echo before > /root/marker; sync")
        daemon.cli("snapshot", "create", name, "s1", "--memory")
        listed = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(store)], capture_output=True, text=True)
        assert listed.stdout.count("corral-") == 1, listed.stdout  # the snapshot's internal tag, in the store too
        _sh(daemon, name, "echo after > /root/marker; sync")
        daemon.cli("snapshot", "revert", name, "s1")
        assert _sh(daemon, name, "cat /root/marker") == "before\n"
        # From a stopped VM the revert starts QEMU with -loadvm, which needs every writable node to hold the
        # snapshot: the variable store included.
        _sh(daemon, name, "echo after > /root/marker; sync")
        daemon.cli("vm", "stop", name, "--force")
        daemon.cli("snapshot", "revert", name, "s1")
        assert daemon.cli_json("vm", "show", name)["state"] == "running"
        assert _sh(daemon, name, "cat /root/marker") == "before\n"
        assert MARKER_UEFI in _cmdline(daemon, name)
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)
