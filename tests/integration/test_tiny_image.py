"""Boot the tiny image with the host's exact QEMU command line and check the guest contract end to end.

These tests are the contract other Corral code relies on: the serial "corral-guest-ready" line, the guest
agent over virtio-serial, guest-exec, DHCP on eth0, persistence across reboot and power-off, and QEMU
exiting by itself on ACPI power-down and guest-shutdown. Every QEMU started here is killed in a finalizer,
and all state lives in temporary directories.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.images.tiny import TinyImage, build_tiny_image

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
]

READY = b"corral-guest-ready"
READY_LINE = re.compile(rb"(?:^|\n)corral-guest-ready\r?\n")
BOOT_TIMEOUT = 60.0


# --- tiny clients -----------------------------------------------------------------------------------------


class QgaError(Exception):
    """The guest agent answered with an error object."""


class LineSocket:
    """A unix stream socket read as JSON lines, with per-call deadlines."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = _connect_unix(path, timeout)
        self.buf = b""

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def read(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON object, or None when `deadline` passes first."""
        while True:
            line, sep, rest = self.buf.partition(b"\n")
            if sep:
                self.buf = rest
                # 0xFF is guest-sync-delimited's "reset your parser" marker; it never occurs in JSON text.
                line = line.replace(b"\xff", b"").strip()
                if line:
                    return json.loads(line)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("socket closed")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class Qga:
    """Minimal QEMU guest agent client (JSON lines over the host end of the virtio-serial port).

    The agent may also see requests the host sent before it started (they wait in the chardev), so every
    conversation starts with guest-sync-delimited and skips answers until the one carrying our id.
    """

    _ids = itertools.count(int(time.time()) % 100000 * 1000)

    def __init__(self, path: Path) -> None:
        self.conn = LineSocket(path)

    def sync(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sync_id = next(self._ids)
            self.conn.send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
            attempt_deadline = min(deadline, time.monotonic() + 2.0)
            while (msg := self.conn.read(attempt_deadline)) is not None:
                if msg.get("return") == sync_id:
                    return
        raise TimeoutError("guest agent did not answer guest-sync-delimited")

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.conn.send(request)
        msg = self.conn.read(time.monotonic() + timeout)
        if msg is None:
            raise TimeoutError(f"guest agent did not answer {command}")
        if "error" in msg:
            raise QgaError(f"{command}: {msg['error']}")
        return msg["return"]

    def send_no_reply(self, command: str, arguments: dict[str, Any]) -> None:
        """For guest-shutdown, which by design never answers on success."""
        self.conn.send({"execute": command, "arguments": arguments})

    def run(self, path: str, args: list[str], timeout: float = 30.0) -> tuple[int, str, str]:
        """guest-exec and wait: (exit code, stdout, stderr)."""
        started = self.execute("guest-exec", {"path": path, "arg": args, "capture-output": True})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.execute("guest-exec-status", {"pid": started["pid"]})
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode()
                err = base64.b64decode(status.get("err-data", "")).decode()
                return status.get("exitcode", -1), out, err
            time.sleep(0.05)
        raise TimeoutError(f"guest-exec {path} {args} did not finish")

    def close(self) -> None:
        self.conn.close()


class Qmp:
    """Minimal QMP client: greeting, capabilities negotiation, then commands matched by id."""

    def __init__(self, path: Path) -> None:
        self.conn = LineSocket(path)
        self.conn.read(time.monotonic() + 10)  # greeting
        self._ids = itertools.count(1)
        self.command("qmp_capabilities")

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        cmd_id = next(self._ids)
        request: dict[str, Any] = {"execute": name, "id": cmd_id}
        if arguments:
            request["arguments"] = arguments
        self.conn.send(request)
        deadline = time.monotonic() + 10
        while (msg := self.conn.read(deadline)) is not None:
            if msg.get("id") == cmd_id:
                if "error" in msg:
                    raise RuntimeError(f"QMP {name}: {msg['error']}")
                return msg["return"]
        raise TimeoutError(f"QMP {name} got no answer")

    def close(self) -> None:
        self.conn.close()


def _connect_unix(path: Path, timeout: float) -> socket.socket:
    """Connect once QEMU has created the listening socket."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# --- VMs ----------------------------------------------------------------------------------------------------


def qemu_argv(name: str, image: TinyImage, vmdir: Path, extra_append: str = "") -> list[str]:
    """The host's QEMU command line for a tiny-image VM, exactly as specified for Corral."""
    append = f"{image.cmdline} corral.hostname={name}" + (f" {extra_append}" if extra_append else "")
    return [
        "qemu-system-x86_64", "-name", f"guest={name}", "-machine", "q35,accel=tcg", "-cpu", "max",
        "-smp", "1", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-blockdev", f"driver=file,filename={vmdir}/root.qcow2,node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev",
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=net0-dev",
        "-chardev", f"socket,id=serial0,path={vmdir}/console.sock,server=on,wait=off,logfile={vmdir}/serial.log",
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qga0,path={vmdir}/qga.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-qmp", f"unix:{vmdir}/qmp.sock,server=on,wait=off",
    ]  # fmt: skip


class Vm:
    """One QEMU process booting the tiny image from a linked-clone disk in its own directory."""

    def __init__(self, name: str, image: TinyImage, vmdir: Path, extra_append: str = "") -> None:
        self.name, self.image, self.vmdir, self.extra_append = name, image, vmdir, extra_append
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._qga: Qga | None = None
        self._qmp: Qmp | None = None
        disk = vmdir / "root.qcow2"
        if not disk.exists():
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.rootfs), "-F", "qcow2", str(disk)],
                check=True,
            )

    def start(self) -> Vm:
        self.serial_log.unlink(missing_ok=True)
        with open(self.vmdir / "qemu.log", "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                qemu_argv(self.name, self.image, self.vmdir, self.extra_append),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def serial_log(self) -> Path:
        return self.vmdir / "serial.log"

    def serial(self) -> bytes:
        try:
            return self.serial_log.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_ready(self, count: int = 1, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until "corral-guest-ready" has appeared `count` times; seconds since process start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(READY_LINE.findall(self.serial())) >= count:
                return time.monotonic() - self.started_at
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before ready:\n{self.diagnostics()}")
            time.sleep(0.01)
        pytest.fail(f"no {READY.decode()} x{count} within {timeout}s:\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        qemu_log = (self.vmdir / "qemu.log").read_text(errors="replace") if self.proc else ""
        return f"--- serial ---\n{self.serial().decode(errors='replace')}\n--- qemu ---\n{qemu_log}"

    @property
    def qga(self) -> Qga:
        if self._qga is None:
            self._qga = Qga(self.vmdir / "qga.sock")
        return self._qga

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            self._qmp = Qmp(self.vmdir / "qmp.sock")
        return self._qmp

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Stop QEMU for good and drop the client connections (safe to call twice)."""
        for client in (self._qga, self._qmp):
            if client is not None:
                with contextlib.suppress(OSError):
                    client.close()
        self._qga = self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


VmFactory = Callable[..., Vm]


@pytest.fixture(scope="session")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> TinyImage:
    cache = Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral"))
    return build_tiny_image(tmp_path_factory.mktemp("tiny-image"), cache)


@contextlib.contextmanager
def _vm_factory(image: TinyImage) -> Iterator[VmFactory]:
    """Make VMs in short temp directories (unix socket paths are limited to 108 bytes); kill them all after."""
    vms: list[Vm] = []
    dirs: list[Path] = []

    def make(name: str = "tiny-test", vmdir: Path | None = None, extra_append: str = "") -> Vm:
        if vmdir is None:
            vmdir = Path(tempfile.mkdtemp(prefix="corral-vm-", dir="/tmp"))
            dirs.append(vmdir)
        vm = Vm(name, image, vmdir, extra_append)
        vms.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in vms:
            vm.kill()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vm_factory(tiny_image: TinyImage) -> Iterator[VmFactory]:
    with _vm_factory(tiny_image) as make:
        yield make


@pytest.fixture
def vm(vm_factory: VmFactory) -> Vm:
    """A freshly booted VM of its own, for tests that reboot or stop it."""
    booted = vm_factory().start()
    booted.wait_ready()
    return booted


@pytest.fixture(scope="module")
def shared_vm(tiny_image: TinyImage) -> Iterator[Vm]:
    """One booted VM for the read-only checks, to save boots (~3 s each under TCG)."""
    with _vm_factory(tiny_image) as make:
        booted = make("tiny-shared").start()
        booted.wait_ready()
        yield booted


# --- tests ----------------------------------------------------------------------------------------------------


def test_image_files_and_manifest(tiny_image: TinyImage) -> None:
    manifest = json.loads((tiny_image.kernel.parent / "image.json").read_text())
    assert manifest["kind"] == "kernel"
    assert manifest["cmdline"] == tiny_image.cmdline
    assert manifest["recipe_hash"] == tiny_image.recipe_hash
    for path in (tiny_image.kernel, tiny_image.initrd, tiny_image.rootfs):
        assert path.stat().st_size > 0
    assert tiny_image.cmdline.startswith("console=ttyS0 root=/dev/vda rw quiet panic=-1")


def test_warm_cache_build_is_fast(tiny_image: TinyImage, tmp_path: Path) -> None:
    cache = Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral"))
    started = time.monotonic()
    again = build_tiny_image(tmp_path / "again", cache)
    assert time.monotonic() - started < 1.0
    assert again.recipe_hash == tiny_image.recipe_hash
    assert again.rootfs.read_bytes() == tiny_image.rootfs.read_bytes()


def test_ready_line_and_guest_ping(shared_vm: Vm) -> None:
    assert len(READY_LINE.findall(shared_vm.serial())) == 1
    shared_vm.qga.sync()
    assert shared_vm.qga.execute("guest-ping") == {}


def test_guest_exec_shell_output_and_exit_code(shared_vm: Vm) -> None:
    shared_vm.qga.sync()
    code, out, _ = shared_vm.qga.run("/bin/sh", ["-c", "echo hi; exit 3"])
    assert (code, out) == (3, "hi\n")


def test_guest_exec_command_on_path_and_hostname(shared_vm: Vm) -> None:
    shared_vm.qga.sync()
    code, out, _ = shared_vm.qga.run("hostname", [])
    assert (code, out.strip()) == (0, "tiny-shared")
    assert shared_vm.qga.execute("guest-get-host-name")["host-name"] == "tiny-shared"


def test_network_interfaces_show_dhcp_address(shared_vm: Vm) -> None:
    shared_vm.qga.sync()
    deadline = time.monotonic() + 15
    addresses: list[str] = []
    while time.monotonic() < deadline:
        interfaces = shared_vm.qga.execute("guest-network-get-interfaces")
        eth0 = next((i for i in interfaces if i["name"] == "eth0"), None)
        assert eth0 is not None, interfaces
        assert eth0["hardware-address"] == "52:54:00:12:34:56"
        addresses = [a["ip-address"] for a in eth0.get("ip-addresses", []) if a["ip-address-type"] == "ipv4"]
        if "10.0.2.15" in addresses:
            return
        time.sleep(0.2)
    pytest.fail(f"eth0 never got 10.0.2.15 (has {addresses})")


def test_machine_id_from_cmdline(vm_factory: VmFactory) -> None:
    machine_id = "0123456789abcdef0123456789abcdef"
    booted = vm_factory("tiny-mid", extra_append=f"corral.machine_id={machine_id}").start()
    booted.wait_ready()
    booted.qga.sync()
    code, out, _ = booted.qga.run("cat", ["/etc/machine-id"])
    assert (code, out.strip()) == (0, machine_id)


def test_file_survives_reboot(vm: Vm) -> None:
    vm.qga.sync()
    code, _, err = vm.qga.run("/bin/sh", ["-c", "echo still-here > /root/marker && sync"])
    assert code == 0, err
    vm.qga.send_no_reply("guest-shutdown", {"mode": "reboot"})
    vm.wait_ready(count=2)
    assert vm.proc is not None and vm.proc.poll() is None, "a guest reboot must reset QEMU in place"
    vm.qga.sync()
    code, out, _ = vm.qga.run("cat", ["/root/marker"])
    assert (code, out) == (0, "still-here\n")


def test_system_powerdown_exits_qemu(vm: Vm) -> None:
    vm.qmp.command("system_powerdown")
    assert vm.wait_exit(10) == 0


def test_guest_shutdown_exits_qemu_and_writes_survive(vm_factory: VmFactory) -> None:
    first = vm_factory("tiny-off").start()
    first.wait_ready()
    first.qga.sync()
    code, _, err = first.qga.run("/bin/sh", ["-c", "echo after-poweroff > /root/marker"])
    assert code == 0, err
    first.qga.send_no_reply("guest-shutdown", {"mode": "powerdown"})
    assert first.wait_exit(30) == 0
    first.kill()

    second = vm_factory("tiny-off", vmdir=first.vmdir).start()
    second.wait_ready()
    second.qga.sync()
    code, out, _ = second.qga.run("cat", ["/root/marker"])
    assert (code, out) == (0, "after-poweroff\n")
