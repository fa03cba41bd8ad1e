"""Boot the Debian image with a NoCloud seed under plain QEMU and check what a user of a real guest relies on.

One VM is booted for the whole module (a cloud-init first boot takes ~1 min under TCG): the guest agent
answers, SSH with an injected ed25519 key logs in to the default user, the hostname is the VM name, the user's
`runcmd` ran, no unit failed, and a `guest-shutdown` through the agent powers QEMU off cleanly, after which the
same disk boots healthy again with the same SSH host keys (a hard kill right after a first boot can lose them).
Boot timings are printed (run with `-s` to see them). Every QEMU is killed in a finalizer, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import InvalidInput
from corral.images import debian
from corral.images.cloudinit import make_seed
from corral.images.debian import DebianImage, build_debian_image, host_mirror
from corral.images.tiny import ImageBuildError
from tests.integration.test_tiny_image import Qga

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="openssh-client not installed"),
]

VM_NAME = "deb-guest"
FIRST_BOOT_TIMEOUT = 240.0  # measured ~75 s to the agent on a cloud-init first boot (2 vCPUs under TCG)
BOOT_TIMEOUT = 150.0
USER_DATA = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo from-runcmd > /var/tmp/runcmd-marker']\n"

#: Measured boot phases, printed at the end of the module.
TIMINGS: dict[str, float] = {}


# --- the VM -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def qemu_argv(name: str, image: DebianImage, vmdir: Path, ssh_port: int) -> list[str]:
    """The tiny-image command line plus the seed as a read-only virtio disk and an SSH port forward."""
    return [
        "qemu-system-x86_64", "-name", f"guest={name}", "-machine", "q35,accel=tcg", "-cpu", "max",
        "-smp", "2", "-m", "1024M", "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", image.cmdline,
        "-blockdev", f"driver=file,filename={vmdir}/root.qcow2,node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev",
        "-blockdev", f"driver=file,filename={vmdir}/seed.iso,node-name=seed-file,read-only=on",
        "-blockdev", "driver=raw,file=seed-file,node-name=seed,read-only=on",
        "-device", "virtio-blk-pci,drive=seed",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:57,id=net0-dev",
        "-chardev", f"socket,id=serial0,path={vmdir}/console.sock,server=on,wait=off,logfile={vmdir}/serial.log",
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qga0,path={vmdir}/qga.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-qmp", f"unix:{vmdir}/qmp.sock,server=on,wait=off",
    ]  # fmt: skip


class DebianVm:
    """One QEMU process booting a linked clone of the image, with its own seed and SSH port."""

    def __init__(self, name: str, image: DebianImage, vmdir: Path, key: Path) -> None:
        self.name, self.image, self.vmdir, self.key = name, image, vmdir, key
        self.ssh_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._qga: Qga | None = None
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(image.rootfs),
                "-F",
                "qcow2",
                str(vmdir / "root.qcow2"),
            ],
            check=True,
        )
        make_seed(
            vmdir / "seed.iso",
            instance_id=f"{name}-{os.getpid()}-{time.time_ns()}",
            hostname=name,
            ssh_keys=[Path(f"{key}.pub").read_text()],
            user_data=USER_DATA,
        )

    def start(self) -> DebianVm:
        self.close_clients()
        with open(self.vmdir / "qemu.log", "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                qemu_argv(self.name, self.image, self.vmdir, self.ssh_port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_agent(self, timeout: float) -> float:
        """Seconds from process start until the guest agent answers guest-sync-delimited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("the guest agent answered")
            with contextlib.suppress(TimeoutError):
                self.qga.sync(timeout=min(10.0, deadline - time.monotonic()))
                return time.monotonic() - self.started_at
        pytest.fail(f"the guest agent did not answer within {timeout:.0f} s:\n{self.diagnostics()}")

    def wait_ssh(self, timeout: float) -> float:
        """Seconds from process start until an SSH login as the default user succeeds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("SSH answered")
            if self.ssh("true", timeout=20).returncode == 0:
                return time.monotonic() - self.started_at
            time.sleep(1)
        pytest.fail(f"no SSH login within {timeout:.0f} s:\n{self.diagnostics()}")

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        argv = [
            "ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-i", str(self.key), "-p", str(self.ssh_port),
            "corral@127.0.0.1", command,
        ]  # fmt: skip
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 255, "", "ssh timed out")

    def guest(self, *argv: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run a command in the guest through the agent (guest-exec): (exit code, stdout, stderr)."""
        self.qga.sync(timeout=30)
        return self.qga.run(argv[0], list(argv[1:]), timeout=timeout)

    def _check_alive(self, waiting_for: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"QEMU exited ({self.proc.returncode}) before {waiting_for}:\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        def tail(name: str) -> str:
            with contextlib.suppress(OSError):
                return "\n".join((self.vmdir / name).read_text(errors="replace").splitlines()[-60:])
            return ""

        return f"--- serial (tail) ---\n{tail('serial.log')}\n--- qemu ---\n{tail('qemu.log')}"

    @property
    def qga(self) -> Qga:
        if self._qga is None:
            self._qga = Qga(self.vmdir / "qga.sock")
        return self._qga

    def close_clients(self) -> None:
        if self._qga is not None:
            with contextlib.suppress(OSError):
                self._qga.close()
        self._qga = None

    def kill(self) -> None:
        """Stop QEMU for good (safe to call twice, and after it exited by itself)."""
        self.close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> DebianImage:
    cache = Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral"))
    started = time.monotonic()
    image = build_debian_image(tmp_path_factory.mktemp("debian-image"), cache)
    TIMINGS["image build (cached or cold)"] = time.monotonic() - started
    return image


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-test", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def booted(debian_image: DebianImage, ssh_key: Path) -> Iterator[DebianVm]:
    """The module's VM after its first (cloud-init) boot, with SSH up; killed at the end whatever happens."""
    vmdir = Path(tempfile.mkdtemp(prefix="corral-deb-", dir="/tmp"))  # short: unix socket paths max 108 bytes
    vm = DebianVm(VM_NAME, debian_image, vmdir, ssh_key)
    try:
        vm.start()
        TIMINGS["first boot: guest agent"] = vm.wait_agent(FIRST_BOOT_TIMEOUT)
        TIMINGS["first boot: ssh"] = vm.wait_ssh(FIRST_BOOT_TIMEOUT)
        # sshd answers before the first boot is over, and cloud-init's last stages may restart it (a login then
        # meets "connection closed"): the tests start from a finished boot, as a user's first session would.
        _wait_boot_finished(vm)
        yield vm
    finally:
        vm.kill()
        shutil.rmtree(vmdir, ignore_errors=True)
        print("\nDebian image timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


def _wait_boot_finished(vm: DebianVm) -> str:
    """`systemctl is-system-running --wait`: 'running' or 'degraded' once every start-up job is done."""
    _code, out, err = vm.guest("systemctl", "is-system-running", "--wait", timeout=BOOT_TIMEOUT)
    return out.strip() or err.strip()


def _failed_units(vm: DebianVm) -> str:
    code, out, err = vm.guest("systemctl", "--failed", "--no-legend", "--plain")
    assert code == 0, err
    return out.strip()


# --- tests --------------------------------------------------------------------------------------------------


def test_image_manifest_and_warm_build(debian_image: DebianImage, tmp_path: Path) -> None:
    manifest = json.loads((debian_image.kernel.parent / "image.json").read_text())
    assert manifest["kind"] == "kernel"
    assert manifest["cmdline"] == debian_image.cmdline
    assert manifest["recipe_hash"] == debian_image.recipe_hash
    for package in ("systemd", "udev", "openssh-server", "qemu-guest-agent", "cloud-init", "sudo"):
        assert package in manifest["packages"], package
    started = time.monotonic()
    again = build_debian_image(tmp_path / "again", Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral")))
    TIMINGS["warm build"] = time.monotonic() - started
    assert TIMINGS["warm build"] < 2.0
    assert again.recipe_hash == debian_image.recipe_hash
    assert os.path.samefile(again.rootfs, debian_image.rootfs) or again.rootfs.stat().st_size > 0


def test_guest_agent_answers(booted: DebianVm) -> None:
    booted.qga.sync(timeout=30)
    assert booted.qga.execute("guest-ping") == {}
    assert booted.qga.execute("guest-get-host-name")["host-name"] == VM_NAME


def test_ssh_login_with_injected_key_prints_vm_name(booted: DebianVm) -> None:
    result = booted.ssh("hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == VM_NAME
    sudo = booted.ssh("sudo -n id -u")
    assert (sudo.returncode, sudo.stdout.strip()) == (0, "0"), sudo.stderr


def test_cloud_init_finished_and_user_data_runcmd_ran(booted: DebianVm) -> None:
    code, out, err = booted.guest("cloud-init", "status", "--wait", timeout=BOOT_TIMEOUT)
    assert code == 0 and "done" in out, out + err
    code, out, _ = booted.guest("cat", "/var/tmp/runcmd-marker")
    assert (code, out) == (0, "from-runcmd\n")
    code, out, _ = booted.guest("cat", "/etc/default/locale")
    assert "C.UTF-8" in out


def test_no_failed_units(booted: DebianVm) -> None:
    state = _wait_boot_finished(booted)
    assert _failed_units(booted) == ""
    assert state == "running"


def test_guest_shutdown_exits_qemu_and_second_boot_is_healthy(booted: DebianVm) -> None:
    code, host_key, _ = booted.guest("cat", "/etc/ssh/ssh_host_ed25519_key.pub")
    assert code == 0 and host_key.startswith("ssh-ed25519 ")
    stopping = time.monotonic()
    booted.qga.send_no_reply("guest-shutdown", {"mode": "powerdown"})
    assert booted.proc is not None
    assert booted.proc.wait(90) == 0
    TIMINGS["guest-shutdown to QEMU exit"] = time.monotonic() - stopping

    booted.start()
    TIMINGS["second boot: guest agent"] = booted.wait_agent(BOOT_TIMEOUT)
    TIMINGS["second boot: ssh"] = booted.wait_ssh(BOOT_TIMEOUT)
    assert booted.ssh("hostname").stdout.strip() == VM_NAME
    code, again, _ = booted.guest("cat", "/etc/ssh/ssh_host_ed25519_key.pub")
    assert (code, again) == (0, host_key), "the SSH host keys must survive a clean shutdown"
    assert _wait_boot_finished(booted) == "running"
    assert _failed_units(booted) == ""


# --- input checks (no VM; here because they exercise the same builder) --------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"release": "Bookworm!"}, "invalid Debian release"),
        ({"release": "notarelease"}, "does not know the release"),
        ({"packages": ["vim", "Bad_Name"]}, "invalid package name"),
        ({"packages": ["-rf"]}, "invalid package name"),
        ({"size": 1 << 20}, "out of range"),
        ({"size": (4 << 30) + 1}, "whole number of MiB"),
    ],
)
def test_bad_arguments_are_rejected_before_building(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        build_debian_image(tmp_path / "img", tmp_path / "cache", **kwargs)
    assert not (tmp_path / "cache").exists()


def test_unreachable_mirror_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(debian, "host_mirror", lambda archive="debian": f"http://127.0.0.1:{port}/{archive}")
    with pytest.raises(ImageBuildError, match=r"cannot reach the Debian mirror http://127\.0\.0\.1:\d+/debian"):
        build_debian_image(tmp_path / "img", tmp_path / "cache", packages=["vim"])


def test_mirror_is_read_from_the_host_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# deb http://commented.example/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "a.list").write_text("deb [arch=amd64] https://other.example/repo stable main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    assert host_mirror(tmp_path) == "http://mirror.example/debian"
    assert host_mirror(tmp_path, archive="debian-security") == "http://mirror.example/debian-security"
    assert host_mirror(tmp_path / "missing") == "http://deb.debian.org/debian"
