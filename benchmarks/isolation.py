"""Cost of isolation: boot-to-ready of the tiny guest with plain QEMU against QEMU in a cgroup, under its own uid
with seccomp. Runs are interleaved (plain, isolated, plain...) so both see the same machine load; the isolated
time includes creating the cgroup and chowning the VM's files. Goal: ratio <= 1.02. Needs root.

    python benchmarks/isolation.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import READY_LINE, median, print_table

from corral.host.cgroups import Limits, MiB, VMCgroup, detect
from corral.host.sandbox import ensure_qemu_user, prepare_paths, sandbox_args, uid_for_vm
from corral.images.tiny import TinyImage, build_tiny_image

BENCH_SLOT = 4010


def argv_for(image: TinyImage, work: Path) -> list[str]:
    """The same guest either way: 1 vCPU, 256 MiB, the tiny image on a linked clone, serial to a file."""
    return [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg,hpet=off", "-cpu", "max", "-smp", "1", "-m", "256M",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} corral.hostname=bench",
        "-blockdev", f"driver=file,filename={work}/root.qcow2,node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0",
        "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
        "-chardev", f"socket,id=serial0,path={work}/console.sock,server=on,wait=off,logfile={work}/serial.log",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{work}/qmp.sock,server=on,wait=off",
    ]  # fmt: skip


def wait_ready(proc: subprocess.Popen[bytes], serial: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serial.exists() and READY_LINE in serial.read_bytes():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited ({proc.returncode}) before the guest was ready")
        time.sleep(0.005)
    raise RuntimeError("the guest never got ready")


def one_boot(image: TinyImage, isolated: bool) -> float:
    """Seconds from the first setup step to the ready line; everything is torn down afterwards."""
    work = Path(tempfile.mkdtemp(prefix="corral-i-", dir="/tmp"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.rootfs), "-F", "qcow2",
                    str(work / "root.qcow2")], check=True)  # fmt: skip
    cg: VMCgroup | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        argv = argv_for(image, work)
        preexec: Callable[[], None] | None = None
        started = time.monotonic()
        if isolated:
            _, gid = ensure_qemu_user()
            uid = uid_for_vm(BENCH_SLOT)
            cg = VMCgroup.create(detect(), f"bench-{uuid.uuid4().hex[:8]}", Limits.for_vm(1, 256 * MiB))
            prepare_paths([work, work / "root.qcow2"], [], uid, gid)
            argv += sandbox_args(uid, gid)
            preexec = cg.preexec()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=preexec)  # fmt: skip
        wait_ready(proc, work / "serial.log")
        return time.monotonic() - started
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if cg is not None:
            cg.destroy(kill=True)
        shutil.rmtree(work, ignore_errors=True)


def _row(label: str, times: list[float]) -> list[object]:
    return [label, f"{median(times):.2f}", " ".join(f"{t:.2f}" for t in times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("isolation.py needs root (cgroups, chown, -runas)")
    base = Path(tempfile.mkdtemp(prefix="corral-ib-", dir="/tmp"))
    try:
        cached = build_tiny_image(base / "tiny", Path(os.environ.get("CORRAL_CACHE", "/var/cache/corral")))
        rootfs = base / "rootfs.qcow2"
        shutil.copyfile(cached.rootfs, rootfs)  # a private base: the cache's files are hard links
        base.chmod(0o711)
        _, gid = ensure_qemu_user()
        prepare_paths([], [rootfs], uid_for_vm(BENCH_SLOT), gid)
        image = TinyImage(kernel=cached.kernel, initrd=cached.initrd, rootfs=rootfs, cmdline=cached.cmdline,
                          recipe_hash=cached.recipe_hash)  # fmt: skip
        plain: list[float] = []
        isolated: list[float] = []
        for _ in range(args.runs):
            plain.append(one_boot(image, isolated=False))
            isolated.append(one_boot(image, isolated=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [_row("plain QEMU", plain), _row("cgroup + seccomp + runas", isolated)]
    print_table(f"Boot to ready, tiny guest, {args.runs} interleaved runs", ["setup", "median s", "runs"], rows)
    print(f"\nratio isolated/plain: {median(isolated) / median(plain):.3f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
