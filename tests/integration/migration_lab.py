"""A bench for live migration at the engine level: tiny-image guests launched from LaunchPlans, a destination
QEMU started with ``-incoming defer`` from the same plan in another run directory, and the guest programs
that tell a healthy move from a broken one. Shared by tests/integration/test_migration.py and
benchmarks/migration.py; every QEMU it starts is killed by ``Lab.close()``.

What a guest reports comes through its serial console, stamped on the host as it arrives: a counter line every
100 ms (its gap across the move is the pause the guest saw) and the memory-dirtying loop's verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from corral.engine.guest_agent import GuestAgent, wait_until_ready
from corral.engine.plan import DiskPlan, KernelBoot, LaunchPlan, NicPlan
from corral.engine.process import QemuProcess
from corral.images.tiny import TinyImage

MiB = 1 << 20
# One line every 100 ms on the serial port; usleep is a busybox applet that does not fork.
COUNTER = "i=0; while true; do i=$((i+1)); echo tick $i > /dev/ttyS0; usleep 100000; done"
# Rewrites a SIZE MiB tmpfs file from an 8 MiB random seed again and again, and checks each copy against the
# checksum computed before the move: a page the migration lost or garbled shows as "busy N BAD".
BUSY = """
mkdir -p /run/busy && mount -t tmpfs -o size={tmpfs}M tmpfs /run/busy || exit 1
dd if=/dev/urandom of=/run/busy/seed bs=1M count=8 2>/dev/null
n=0; set --; while [ $n -lt {copies} ]; do set -- "$@" /run/busy/seed; n=$((n+1)); done
cat "$@" > /run/busy/data
md5sum /run/busy/seed | cut -d' ' -f1 > /run/busy/seed.md5
md5sum /run/busy/data | cut -d' ' -f1 > /run/busy/data.md5
want=$(cat /run/busy/data.md5)
echo busy-started > /dev/ttyS0
i=0
while [ ! -e /run/busy/stop ]; do
    i=$((i+1))
    cat "$@" > /run/busy/data
    got=$(md5sum /run/busy/data | cut -d' ' -f1)
    if [ "$got" = "$want" ]; then echo "busy $i ok" > /dev/ttyS0; else echo "busy $i BAD" > /dev/ttyS0; fi
done
echo busy-stopped > /dev/ttyS0
"""
KERNEL_TROUBLE = re.compile(r"BUG:|Oops|general protection|Kernel panic|segfault|Call Trace|busy \d+ BAD")


@dataclass
class SerialWatch:
    """Lines of a serial log with the host's monotonic time at which each was first seen (10 ms polling)."""

    path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    _offset: int = 0
    _partial: str = ""
    _task: asyncio.Task[None] | None = None

    def start(self) -> SerialWatch:
        self._task = asyncio.get_running_loop().create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            self.read_new()
            await asyncio.sleep(0.01)

    def read_new(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        now = time.monotonic()
        text = self._partial + data.decode(errors="replace")
        *complete, self._partial = text.split("\n")
        self.lines += [(now, line.strip("\r")) for line in complete]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.read_new()

    def ticks(self) -> list[tuple[float, int]]:
        out = []
        for stamp, line in self.lines:
            match = re.fullmatch(r".*tick (\d+)", line)
            if match:
                out.append((stamp, int(match.group(1))))
        return out

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    async def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_new()
            if any(needle in line for _, line in self.lines):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{needle!r} did not appear on {self.path} within {timeout:.0f} s")


@dataclass
class Guest:
    """One VM under test: its plan, and the QEMU currently running it (the source, later the destination)."""

    plan: LaunchPlan
    proc: QemuProcess

    async def sh(self, script: str, timeout: float = 60.0) -> str:
        # A sync first, with a long deadline: a busy TCG guest on a loaded host may take seconds to answer.
        await wait_until_ready(self.plan.guest_agent_socket, 60.0, is_alive=lambda: not self.proc.exited)
        async with GuestAgent(self.plan.guest_agent_socket) as agent:
            result = await agent.exec(["/bin/sh", "-c", script], timeout=timeout)
        if result.exit_code != 0:
            raise AssertionError(f"guest command failed ({result.exit_code}): {script}\n{result.stderr}")
        return result.stdout

    async def background(self, script: str) -> None:
        quoted = script.replace("'", "'\"'\"'")
        await self.sh(f"setsid sh -c '{quoted}' </dev/null >/dev/null 2>&1 &")


class Lab:
    """Guests and destinations in short directories under /tmp (unix socket paths are limited to 108 bytes)."""

    def __init__(self, image: TinyImage) -> None:
        self.image = image
        self.root = Path(tempfile.mkdtemp(prefix="corral-mig-", dir="/tmp"))
        self.procs: list[QemuProcess] = []

    def disk_for(self, name: str) -> Path:
        disk = self.root / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.rootfs), "-F", "qcow2",
                        str(disk)], check=True)  # fmt: skip
        return disk

    def plan(
        self, name: str, disk: Path, memory_mib: int = 256, run_dir: Path | None = None, incoming: bool = False
    ) -> LaunchPlan:
        return LaunchPlan(
            name=name,
            uuid=str(uuid.uuid4()),
            run_dir=run_dir or self.root / name,
            accel="tcg",
            memory_mib=memory_mib,
            kernel_boot=KernelBoot(
                kernel=self.image.kernel,
                initrd=self.image.initrd,
                cmdline=f"{self.image.cmdline} corral.hostname={name}",
            ),
            disks=(DiskPlan(node="disk0", path=disk),),
            nics=(NicPlan(id="net0", mac="52:54:00:12:34:56"),),
            incoming=incoming,
            tb_size_mib=64,
        )

    async def launch(self, plan: LaunchPlan) -> QemuProcess:
        proc = await QemuProcess.launch(plan)
        self.procs.append(proc)
        return proc

    async def boot(self, name: str, memory_mib: int = 256) -> Guest:
        plan = self.plan(name, self.disk_for(name), memory_mib)
        proc = await self.launch(plan)
        await wait_until_ready(plan.guest_agent_socket, 120.0, is_alive=lambda: not proc.exited)
        return Guest(plan, proc)

    async def destination(
        self, guest: Guest, disk: Path | None = None, suffix: str = "dst"
    ) -> tuple[LaunchPlan, QemuProcess]:
        """A QEMU waiting for ``guest``'s state: the same plan with its own run directory, and either the same
        disk (shared storage) or ``disk`` (a blank image to mirror into)."""
        plan = guest.plan.model_copy(update={"run_dir": self.root / f"{guest.plan.name}-{suffix}", "incoming": True})
        if disk is not None:
            plan = plan.model_copy(update={"disks": (DiskPlan(node="disk0", path=disk),)})
        return plan, await self.launch(plan)

    def blank_like(self, source: Path, name: str) -> Path:
        """An empty qcow2 of the same virtual size, what a destination host makes without shared storage."""
        import json

        size = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(source)], check=True, capture_output=True, text=True
            ).stdout
        )["virtual-size"]
        target = self.root / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)], check=True)
        return target

    def moved(self, guest: Guest, plan: LaunchPlan, proc: QemuProcess) -> None:
        """The guest now lives in ``proc`` (the destination)."""
        guest.plan, guest.proc = plan, proc

    async def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if not proc.exited:
                    await proc.kill()
                else:
                    await proc.close()
        shutil.rmtree(self.root, ignore_errors=True)


def max_tick_gap(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> tuple[float, int, int]:
    """(largest gap in seconds between consecutive ticks across the move, last value before, first after)."""
    merged = sorted(before + after)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(merged)]
    return (max(gaps) if gaps else 0.0, before[-1][1] if before else -1, after[0][1] if after else -1)


def kernel_trouble(text: str) -> list[str]:
    return [line for line in text.splitlines() if KERNEL_TROUBLE.search(line)]


async def start_busy(guest: Guest, watch: SerialWatch, size_mib: int = 64) -> None:
    """Start the memory-dirtying loop (SIZE MiB in a tmpfs, rewritten and checked continuously)."""
    script = BUSY.format(tmpfs=size_mib + 16, copies=size_mib // 8)
    path = "/run/busy.sh"
    await guest.sh(f"cat > {path} <<'EOF'\n{script}\nEOF")
    await guest.background(f"sh {path}")
    await watch.wait_for("busy-started", 120)
    await watch.wait_for("busy 1 ", 120)


async def stop_busy_and_verify(guest: Guest, watch: SerialWatch) -> None:
    """Stop the loop, let it finish its last copy, and check that what it wrote is what it meant to write."""
    await guest.sh("touch /run/busy/stop")
    await watch.wait_for("busy-stopped", 120)
    check = await guest.sh(
        "md5sum /run/busy/seed /run/busy/data | cut -d' ' -f1; cat /run/busy/seed.md5 /run/busy/data.md5", timeout=120
    )
    seed, data, seed_want, data_want = check.split()
    busy = [line for _, line in watch.lines if "busy" in line]
    assert seed == seed_want, f"the seed the guest wrote before the move changed; loop said {busy[-5:]}"
    assert data == data_want, f"the guest's last copy does not match; loop said {busy[-5:]}"
