"""Helpers shared by the benchmarks: a private daemon, plain-QEMU baselines, and a results table."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY_LINE = b"corral-guest-ready"


class BenchDaemon:
    """`corral serve` on a throw-away CORRAL_HOME (the image cache is shared, so builds are instant)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="corral-b-", dir="/tmp"))
        self.env = {
            **os.environ,
            "CORRAL_HOME": str(self.home),
            "CORRAL_ACCEL": "tcg",
            "CORRAL_DEFAULT_NETWORK": "0",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchDaemon:
        log = (self.home / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve"], env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while self.cli("host", "list", check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.1)
        self.cli("image", "build", "tiny")
        return self

    def __exit__(self, *exc: object) -> None:
        for vm in self.client_call("vms"):
            self.cli("vm", "delete", vm["name"], "--force", check=False)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        from corral.host.networks import remove_everything

        remove_everything(self.home)
        shutil.rmtree(self.home, ignore_errors=True)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "corral", *args], env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"corral {' '.join(args)}: {result.stderr}")
        return result

    def client_call(self, method: str, *args: object) -> object:
        from corral.client import Client

        with Client(home=self.home) as corral:
            return getattr(corral, method)(*args)

    def image_files(self) -> dict[str, Path]:
        images = self.client_call("images")
        tiny = next(i for i in images if i["name"] == "tiny")  # type: ignore[union-attr]
        directory = self.home / "images" / tiny["id"]
        return {
            "kernel": directory / "vmlinuz",
            "initrd": directory / "initrd.img",
            "rootfs": directory / "rootfs.qcow2",
            "cmdline": tiny["cmdline"],
        }  # type: ignore[dict-item]


def plain_qemu_boot(files: dict[str, Path], machine: str = "q35", extra_append: str = "") -> float:
    """Seconds from starting QEMU by hand to the guest's ready line on the serial console."""
    work = Path(tempfile.mkdtemp(prefix="corral-p-", dir="/tmp"))
    disk = work / "root.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(files["rootfs"]), "-F", "qcow2", str(disk)], check=True
    )
    machine_opt = {"q35": "q35,accel=tcg,hpet=off", "pc": "pc,accel=tcg,hpet=off", "q35-hpet": "q35,accel=tcg"}[machine]
    argv = [
        "qemu-system-x86_64", "-machine", machine_opt, "-cpu", "max", "-smp", "1", "-m", "256M",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]),
        "-append", f"{files['cmdline']} corral.hostname=plain {extra_append}".strip(),
        "-blockdev", f"driver=file,filename={disk},node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0",
        "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-serial-pci", "-chardev", f"socket,id=qga0,path={work}/qga.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-serial", "stdio",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buffer = b""
    try:
        assert proc.stdout is not None
        while READY_LINE not in buffer:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("plain QEMU exited before the guest was ready")
            buffer += chunk
        return time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
