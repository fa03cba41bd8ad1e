"""Machine types under TCG: q35 (hpet=off, corral's default), q35 with its HPET, pc and microvm.

Boots the tiny image with plain qemu-system-x86_64 (no corral daemon, so only the machine type differs)
and measures, from process start, two moments of the same boot:

* **ready**: the guest's `corral-guest-ready` line on the serial console (what `plain_qemu_boot` measures);
* **agent**: the first answer of the guest agent to `guest-sync-delimited` on the qga socket, which is when
  corral can manage the guest (it is started just before the ready line, so it should follow closely).

Runs are interleaved (q35, q35-hpet, pc, microvm, q35, ...) so every machine type sees the same host load.
The x86 PC types use corral's PCI device set (virtio-blk-pci, virtio-net-pci, virtio-serial-pci, as rendered
by `corral.engine.argv`); microvm has no PCI bus, so it gets the same devices on virtio-mmio and the kernel
arguments qemu-notes.md found necessary (`pci=off tsc_early_khz=<host TSC kHz>`).

    python benchmarks/machines.py [--runs 7] [--machines q35,microvm] [--tsc-khz 2596132] [--image DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import READY_LINE, median, print_table

#: Give up on a boot after this long (a healthy TCG boot takes ~3 s; a hung one never prints the line).
BOOT_TIMEOUT = 60.0

#: Resend guest-sync-delimited this often: requests sent before qemu-ga opened its port may be lost.
AGENT_RETRY = 0.5

#: `-machine` value per benchmarked machine type; the keys are the names used on the command line.
MACHINES = {
    "q35": "q35,accel=tcg,hpet=off",
    "q35-hpet": "q35,accel=tcg",
    "pc": "pc,accel=tcg,hpet=off",
    "microvm": "microvm,accel=tcg,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on",
}


@dataclass
class Boot:
    """What one boot measured: seconds from process start, or None when it did not get there."""

    ready: float | None
    agent: float | None
    error: str = ""
    console_tail: str = ""


def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz, which is also the guest's under TCG (rdtsc reads the host's counter).

    microvm has no PIT to calibrate the TSC against, so the kernel must be told (`tsc_early_khz`). The
    kernel's own "tsc: Detected" figure is preferred; /proc/cpuinfo's "cpu MHz" is the fallback.
    """
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False, timeout=5).stdout
        if m := re.search(r"tsc: Detected ([0-9.]+) MHz", dmesg):
            return round(float(m.group(1)) * 1000)
    with contextlib.suppress(OSError):
        if m := re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE):
            return round(float(m.group(1)) * 1000)
    return 2_100_000


def qemu_argv(machine: str, files: dict[str, Path], work: Path, tsc_khz: int) -> list[str]:
    """The plain QEMU command line for `machine`, with corral's devices on the bus that machine has."""
    append = f"{files['cmdline']} corral.hostname=plain"
    if machine == "microvm":
        # pci=off: there is no PCI bus to probe. tsc_early_khz: without it the kernel hangs with "Unable to
        # calibrate against PIT" (qemu-notes.md). The virtio-mmio devices are found through ACPI (microvm's
        # default acpi=on): the cloud kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
        append += f" pci=off tsc_early_khz={tsc_khz}"
        blk, net, vser = "virtio-blk-device", "virtio-net-device", "virtio-serial-device"
    else:
        blk, net, vser = "virtio-blk-pci", "virtio-net-pci", "virtio-serial-pci"
    return [
        "qemu-system-x86_64", "-machine", MACHINES[machine], "-cpu", "max", "-smp", "1", "-m", "256M",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]), "-append", append,
        "-blockdev", f"driver=file,filename={work}/root.qcow2,node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", f"{blk},drive=disk0",
        "-netdev", "user,id=net0", "-device", f"{net},netdev=net0",
        "-device", vser, "-chardev", f"socket,id=qga0,path={work}/qga.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-serial", "stdio",
    ]  # fmt: skip


def _connect(path: Path, deadline: float) -> socket.socket | None:
    """Connect to QEMU's qga socket, which appears a few ms after the process starts."""
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            time.sleep(0.01)
            continue
        sock.setblocking(False)
        return sock
    return None


def boot(machine: str, files: dict[str, Path], tsc_khz: int, timeout: float = BOOT_TIMEOUT) -> Boot:
    """Boot once and time the ready line and the first guest-agent answer; QEMU is always killed."""
    work = Path(tempfile.mkdtemp(prefix="corral-m-", dir="/tmp"))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(files["rootfs"]), "-F", "qcow2", f"{work}/root.qcow2"],
        check=True,
    )
    argv = qemu_argv(machine, files, work, tsc_khz)
    started = time.monotonic()
    deadline = started + timeout
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    console, agent_buf = b"", b""
    result = Boot(None, None)
    sel = selectors.DefaultSelector()
    sock: socket.socket | None = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "serial")
        sock = _connect(work / "qga.sock", min(deadline, time.monotonic() + 5))
        if sock is None:
            result.error = "no qga socket"
            return result
        sel.register(sock, selectors.EVENT_READ, "agent")
        sync_ids: set[int] = set()
        next_sync = time.monotonic()
        while (result.ready is None or result.agent is None) and time.monotonic() < deadline:
            now = time.monotonic()
            if result.agent is None and now >= next_sync:
                sync_id = int(now * 1000) % 10**9
                sync_ids.add(sync_id)
                with contextlib.suppress(OSError):
                    request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
                    sock.sendall(json.dumps(request).encode() + b"\n")
                next_sync = now + AGENT_RETRY
            for key, _ in sel.select(timeout=max(0.0, min(next_sync, deadline) - time.monotonic())):
                if key.data == "serial":
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        status, stderr = proc.wait(), proc.stderr.read().decode().strip()
                        result.error = f"QEMU exited (status {status}) before the ready line {stderr}".strip()[:300]
                        return result
                    console += chunk
                    if result.ready is None and READY_LINE in console:
                        result.ready = time.monotonic() - started
                else:
                    try:
                        chunk = sock.recv(65536)
                    except OSError:  # QEMU went away; the serial side reports why
                        chunk = b""
                    agent_buf += chunk
                    # Answers are JSON lines, prefixed by 0xFF (guest-sync-delimited's parser-reset marker).
                    for line in agent_buf.replace(b"\xff", b"\n").splitlines():
                        with contextlib.suppress(ValueError):
                            if result.agent is None and json.loads(line).get("return") in sync_ids:
                                result.agent = time.monotonic() - started
                    if not chunk:
                        sel.unregister(sock)
        if result.ready is None:
            result.error = f"no ready line within {timeout:.0f} s"
        elif result.agent is None:
            result.error = f"no guest-agent answer within {timeout:.0f} s"
        return result
    finally:
        result.console_tail = console.decode(errors="replace")[-2000:]
        if sock is not None:
            sock.close()
        sel.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def image_files(image_dir: Path | None, build_dir: Path) -> dict[str, Path]:
    """The tiny image's files: `image_dir` as is, or a fresh build (from the shared cache) into `build_dir`."""
    if image_dir is None:
        from corral.images.tiny import build_tiny_image

        image_dir = build_dir
        build_tiny_image(image_dir, cache=Path("/var/cache/corral"))
    manifest = json.loads((image_dir / "image.json").read_text())
    return {
        "kernel": image_dir / manifest["kernel"],
        "initrd": image_dir / manifest["initrd"],
        "rootfs": image_dir / manifest["rootfs"],
        "cmdline": manifest["cmdline"],
    }  # type: ignore[dict-item]


def _stats(values: list[float], baseline: float | None) -> list[str]:
    if not values:
        return ["-", "-", "-", "-"]
    ratio = f"{median(values) / baseline:.3f}" if baseline else "-"
    return [f"{median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}", ratio]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="boots per machine type (default 7)")
    parser.add_argument(
        "--machines", default=",".join(MACHINES), help="comma-separated subset of " + ",".join(MACHINES)
    )
    parser.add_argument("--tsc-khz", type=int, default=None, help="microvm's tsc_early_khz (default: the host's)")
    parser.add_argument("--image", type=Path, default=None, help="a built tiny image directory (default: build)")
    parser.add_argument("--verbose", action="store_true", help="print every boot as it finishes")
    args = parser.parse_args()
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    if unknown := [m for m in machines if m not in MACHINES]:
        parser.error(f"unknown machine type(s): {', '.join(unknown)}")
    tsc_khz = args.tsc_khz or host_tsc_khz()

    with tempfile.TemporaryDirectory(prefix="corral-mimg-", dir="/tmp") as tmp:
        files = image_files(args.image, Path(tmp))
        ready: dict[str, list[float]] = {m: [] for m in machines}
        agent: dict[str, list[float]] = {m: [] for m in machines}
        failures: dict[str, list[str]] = {m: [] for m in machines}
        for run in range(args.runs):
            for machine in machines:
                result = boot(machine, files, tsc_khz)
                if result.ready is not None:
                    ready[machine].append(result.ready)
                if result.agent is not None:
                    agent[machine].append(result.agent)
                if result.error:
                    failures[machine].append(result.error)
                    if len(failures[machine]) == 1:
                        print(f"{machine}: {result.error}; console ends with:\n{result.console_tail}", file=sys.stderr)
                if args.verbose:
                    print(f"run {run + 1} {machine}: ready {result.ready} agent {result.agent} {result.error}")

    base_ready = median(ready["q35"]) if ready.get("q35") else None
    base_agent = median(agent["q35"]) if agent.get("q35") else None
    print_table(
        f"Plain QEMU {os.path.basename(shutil.which('qemu-system-x86_64') or 'qemu')} under TCG, tiny image, "
        f"{args.runs} interleaved runs: seconds from process start to the serial ready line",
        ["machine", "median", "min", "max", "ratio to q35", "ok"],
        [[m, *_stats(ready[m], base_ready), f"{len(ready[m])}/{args.runs}"] for m in machines],
    )
    print_table(
        "Seconds from process start to the first guest-agent answer (guest-sync-delimited)",
        ["machine", "median", "min", "max", "ratio to q35", "ok"],
        [[m, *_stats(agent[m], base_agent), f"{len(agent[m])}/{args.runs}"] for m in machines],
    )
    if "microvm" in machines:
        print(f"\nmicrovm kernel arguments: pci=off tsc_early_khz={tsc_khz}")
    for machine, errors in failures.items():
        for error in sorted(set(errors)):
            print(f"{machine}: {errors.count(error)}x {error}")


if __name__ == "__main__":
    main()
