"""Debian guest boot: corral against plain qemu-system-x86_64 on the same disk, to agent-ready and SSH-ready.

What a user of the Debian image waits for is not the tiny image's ready line but two moments: the guest agent
answering (what `vm run` and `vm start --wait` wait for) and an SSH login working (what they want next). Both
are measured on a first boot (cloud-init's per-instance work: host keys, the user, the hostname) and on a
later boot of the same disk (nothing per-instance left to do):

* corral: `corral vm run NAME --image debian --memory 1G --ssh-key K.pub` is timed until the command returns
  (agent-ready), then `ssh -o BatchMode=yes ... true` is retried on the VM's forwarded port (`vm show --json`,
  `ports.ssh`) until it succeeds (SSH-ready, counted from the same start). `vm stop` (through the guest agent)
  and `vm start --wait` give the later boot, timed the same way.
* plain QEMU: a qcow2 overlay on the image's rootfs and a seed made by hand with `make_seed` (a uuid as
  instance id, the name as hostname, the same key), booted with the command line corral renders
  (`corral.engine.argv`), written out here by hand. Timed from process start to the first answer to
  `guest-sync-delimited` on the guest agent socket, and to a working SSH login; then `guest-shutdown` through
  the agent, and a second boot of the same disk and seed.

Runs are interleaved, and their order alternates (corral first, then plain first), so both see the same host
load and page cache. The ratio corral/plain of the medians is the cost of management: goal <= 1.05. corral's
times include what plain QEMU's leave out on purpose: the CLI's start-up, the daemon's job round trips, the
overlay and the seed (made afresh at each start), so the plain preparation is reported too.

The image build is timed as well: `corral image build debian` on a fresh daemon whose image cache already has
the image (links only); the cold build (debootstrap and apt, minutes) is not re-run but quoted from
docs/images.md.

    python benchmarks/guest.py [--runs 3]

Needs root (the daemon and QEMU), ssh and ssh-keygen, and the Debian image in the cache (/var/cache/corral) for
the build to be warm. Starts at most one guest at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BenchDaemon, median, print_table

from corral.config import Settings
from corral.images.cloudinit import make_seed

MEMORY = "1G"
MEMORY_MIB = 1024
CPUS = 1  # `vm run`'s default --cpus, rendered by corral as `-smp 1`
#: TCG's translation cache as corral caps it (QEMU 7.2's own default is 1 GiB).
TB_SIZE_MIB = Settings().tcg_tb_size_mib
#: The seccomp filter corral's isolation adds. Its `-runas UID:GID` is left out: plain QEMU runs as the caller,
#: and which uid runs QEMU costs nothing measurable.
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
BOOT_TIMEOUT = 300.0
SHUTDOWN_TIMEOUT = 60.0
GOAL = 1.05
DOCS = Path(__file__).resolve().parent.parent / "docs" / "images.md"

FIRST_AGENT = "first boot: agent ready"
FIRST_SSH = "first boot: SSH login"
LATER_AGENT = "later boot: agent ready"
LATER_SSH = "later boot: SSH login"
PHASES = (FIRST_AGENT, FIRST_SSH, LATER_AGENT, LATER_SSH)
STOP = "stop (guest-shutdown) until exit"
PREP = "plain prep: overlay + seed"

Times = dict[str, float]


# --- probes shared by both sides ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback now, for plain QEMU's SSH forward (corral picks its own the same way)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_key(directory: Path) -> Path:
    """A fresh passphrase-less ed25519 key pair, so the benchmark never touches the user's own keys."""
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-bench", "-f", str(key)], check=True)
    return key


def _sshd_banner(port: int) -> bool:
    """True once the guest's sshd sends its banner. User-mode networking accepts a connection before the guest
    listens (or even has an address), so a plain connect proves nothing; a short timeout keeps a connection
    stuck in slirp's SYN retries from hiding the moment sshd comes up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.settimeout(1.0)
            return conn.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_ssh(
    port: int, key: Path, started: float, alive: Callable[[], bool] | None = None, timeout: float = BOOT_TIMEOUT
) -> float:
    """Seconds from `started` until `ssh corral@127.0.0.1 true` with `key` succeeds: a real login, because
    sshd can answer before cloud-init has installed the user's key."""
    argv = [
        "ssh", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=5", "corral@127.0.0.1", "true",
    ]  # fmt: skip
    while time.monotonic() - started < timeout:
        if alive is not None and not alive():
            raise RuntimeError("QEMU exited before SSH login worked")
        if _sshd_banner(port):
            try:
                if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
                    return time.monotonic() - started
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.25)
    raise RuntimeError(f"no SSH login on port {port} within {timeout:.0f} s")


def argv_shape(argv: list[str]) -> list[str]:
    """A command line with its values reduced to option keys, so corral's and the plain one can be compared
    although paths, names, MACs and ports differ."""
    shape = []
    for word in argv[1:]:
        if word.startswith("-"):
            shape.append(word)
        elif "=" in word and " " not in word:
            shape.append(",".join(part.split("=", 1)[0] if "=" in part else "<value>" for part in word.split(",")))
        else:
            shape.append("<value>")
    return shape


def shape_difference(corral: list[str], plain: list[str]) -> tuple[list[str], list[str]]:
    """Options (with their value's keys) in one command line and not in the other."""

    def options(argv: list[str]) -> list[str]:
        shape = argv_shape(argv)
        return [
            f"{word} {shape[i + 1]}" if i + 1 < len(shape) else word for i, word in enumerate(shape) if word[0] == "-"
        ]

    ours, theirs = options(corral), options(plain)
    return [o for o in ours if o not in theirs], [o for o in theirs if o not in ours]


# --- corral ---------------------------------------------------------------------------------------------------


def corral_run(daemon: BenchDaemon, key: Path) -> tuple[Times, list[str]]:
    """One VM through the CLI: first boot, a stop through the agent, a later boot; and its QEMU argv."""
    name = f"g-{uuid.uuid4().hex[:6]}"
    times: Times = {}
    try:
        started = time.monotonic()
        daemon.cli("vm", "run", name, "--image", "debian", "--memory", MEMORY, "--ssh-key", f"{key}.pub")
        times[FIRST_AGENT] = time.monotonic() - started
        vm = json.loads(daemon.cli("vm", "show", name, "--json").stdout)
        argv = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
        times[FIRST_SSH] = wait_ssh(vm["ports"]["ssh"], key, started)

        stopping = time.monotonic()
        daemon.cli("vm", "stop", name)
        times[STOP] = time.monotonic() - stopping

        started = time.monotonic()
        daemon.cli("vm", "start", name, "--wait")
        times[LATER_AGENT] = time.monotonic() - started
        vm = json.loads(daemon.cli("vm", "show", name, "--json").stdout)  # a new SSH port at each start
        times[LATER_SSH] = wait_ssh(vm["ports"]["ssh"], key, started)
    finally:
        daemon.cli("vm", "delete", name, "--force", check=False)
    return times, argv


# --- plain QEMU -------------------------------------------------------------------------------------------------


def plain_argv(files: dict[str, Path], work: Path, name: str, vm_id: str, mac: str, port: int) -> list[str]:
    """The command line corral.engine.argv renders for a 1-vCPU, 1 GiB Debian VM, written out by hand.

    main() compares its shape with the command line of corral's own QEMU (from /proc), so a change in the
    renderer shows up as a warning instead of a silently unfair comparison."""
    uuid_text = str(uuid.UUID(vm_id))
    cmdline = f"{files['cmdline']} corral.hostname={name} corral.machine_id={vm_id}"
    return [
        "qemu-system-x86_64",
        "-name", f"guest={name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-machine", "type=q35,hpet=off", "-accel", f"tcg,tb-size={TB_SIZE_MIB}",
        "-cpu", "max", "-smp", str(CPUS), "-m", f"{MEMORY_MIB}M",
        "-uuid", uuid_text,
        "-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]), "-append", cmdline,
        "-blockdev", f"driver=file,filename={work / 'root.qcow2'},node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "driver=virtio-blk-pci,drive=disk0,id=disk0-dev",
        "-blockdev", f"driver=file,filename={work / 'seed.iso'},node-name=seed-file,read-only=on",
        "-blockdev", "driver=raw,file=seed-file,node-name=seed,read-only=on",
        "-device", "driver=virtio-blk-pci,drive=seed,id=seed-dev",
        "-netdev", f"type=user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"driver=virtio-net-pci,netdev=net0,mac={mac},id=net0-dev",
        "-chardev", f"backend=socket,id=serial0,path={work / 'console.sock'},server=on,wait=off,"
                    f"logfile={work / 'serial.log'},logappend=on",
        "-serial", "chardev:serial0",
        "-chardev", f"backend=socket,id=qga0,path={work / 'qga.sock'},server=on,wait=off",
        "-device", "driver=virtio-serial-pci,id=vser0",
        "-device", "driver=virtserialport,chardev=qga0,name=org.qemu.guest_agent.0,id=qga0-port",
        "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off",
        "-sandbox", SANDBOX,
    ]  # fmt: skip


class AgentChannel:
    """A minimal qemu-ga client on a plain socket, written here so the plain side owes nothing to corral's.

    It syncs the way corral's readiness check does (one connection, a `guest-sync-delimited` every 0.5 s;
    requests sent before the agent runs wait in the channel and are answered when it starts), so both sides
    see the agent at the same moment.
    """

    def __init__(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.proc = proc
        self.conn: socket.socket | None = None

    def _connect(self, deadline: float) -> socket.socket:
        while time.monotonic() < deadline:
            self._check_alive()
            conn = socket.socket(socket.AF_UNIX)
            try:
                conn.connect(str(self.path))
                return conn
            except OSError:
                conn.close()
                time.sleep(0.05)
        raise RuntimeError("the guest agent socket never appeared")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"plain QEMU exited with {self.proc.returncode}")

    def sync(self, timeout: float) -> None:
        """Return once the agent answers one of our syncs."""
        deadline = time.monotonic() + timeout
        tokens: set[int] = set()
        buffer = b""
        next_send = 0.0
        while time.monotonic() < deadline:
            if self.conn is None:
                self.conn = self._connect(deadline)
            self._check_alive()
            if time.monotonic() >= next_send:
                token = random.randint(1, 2**31 - 1)
                tokens.add(token)
                message = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
                self.conn.sendall(json.dumps(message).encode() + b"\n")
                next_send = time.monotonic() + 0.5
            self.conn.settimeout(max(0.01, next_send - time.monotonic()))
            try:
                chunk = self.conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                self.conn.close()
                self.conn, buffer = None, b""
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line.strip(b"\xff \r\n") or b"null")
                except json.JSONDecodeError:
                    continue
                if isinstance(reply, dict) and reply.get("return") in tokens:
                    return
        raise RuntimeError(f"the guest agent did not answer within {timeout:.0f} s")

    def shutdown(self) -> None:
        """Ask for a clean power-off (qemu-ga sends no reply when it works)."""
        self.sync(30)
        assert self.conn is not None
        self.conn.sendall(b'{"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}\n')

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def plain_boot(
    argv: list[str], work: Path, key: Path, port: int, times: Times, agent_phase: str, ssh_phase: str
) -> None:
    """One boot of the plain VM: agent-ready and SSH-ready from process start, then a clean power-off."""
    log = (work / "qemu.log").open("ab")
    (work / "qga.sock").unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    agent = AgentChannel(work / "qga.sock", proc)
    try:
        agent.sync(BOOT_TIMEOUT)
        times[agent_phase] = time.monotonic() - started
        times[ssh_phase] = wait_ssh(port, key, started, alive=lambda: proc.poll() is None)
        stopping = time.monotonic()
        agent.shutdown()
        proc.wait(SHUTDOWN_TIMEOUT)
        times.setdefault(STOP, time.monotonic() - stopping)
    finally:
        agent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def plain_run(files: dict[str, Path], key: Path) -> tuple[Times, list[str]]:
    """A first and a later boot of one overlay and seed made by hand, as a user without corral would."""
    work = Path(tempfile.mkdtemp(prefix="corral-g-", dir="/tmp"))
    name, vm_id, port = f"p-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex, free_port()
    mac = "52:54:00:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))
    times: Times = {}
    try:
        preparing = time.monotonic()
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(files["rootfs"]),
                "-F",
                "qcow2",
                str(work / "root.qcow2"),
            ],
            check=True,
        )
        make_seed(work / "seed.iso", instance_id=vm_id, hostname=name, ssh_keys=[Path(f"{key}.pub").read_text()],
                  user_data=None)  # fmt: skip
        times[PREP] = time.monotonic() - preparing
        argv = plain_argv(files, work, name, vm_id, mac, port)
        plain_boot(argv, work, key, port, times, FIRST_AGENT, FIRST_SSH)
        plain_boot(argv, work, key, port, times, LATER_AGENT, LATER_SSH)
        return times, argv
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- image build ------------------------------------------------------------------------------------------------


def debian_files(daemon: BenchDaemon) -> dict[str, Path]:
    """The Debian image's files in the daemon's store (hard links to the cache entry)."""
    images = daemon.client_call("images")
    debian = next(i for i in images if i["name"] == "debian")  # type: ignore[union-attr]
    directory = daemon.home / "images" / debian["id"]
    return {
        "kernel": directory / "vmlinuz",
        "initrd": directory / "initrd.img",
        "rootfs": directory / "rootfs.qcow2",
        "cmdline": debian["cmdline"],
    }  # type: ignore[dict-item]


def warm_builds(daemon: BenchDaemon, runs: int) -> list[float]:
    """Seconds for `corral image build debian` with the recipe cached: the CLI, the job and the file links.
    Between runs the image is deleted from the daemon (its cache entry stays), so each build does the work."""
    times = []
    for index in range(runs):
        if index:
            daemon.cli("image", "rm", "debian")
        started = time.monotonic()
        daemon.cli("image", "build", "debian")
        times.append(time.monotonic() - started)
    return times


def documented(row: str) -> str:
    """The time column of a row of docs/images.md's "Measured" table (the cold build is not re-run here)."""
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith(row):
            return cells[1]
    return "see docs/images.md"


# --- report -----------------------------------------------------------------------------------------------------


def stats(values: list[float]) -> list[str]:
    return [f"{median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}"] if values else ["-", "-", "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")

    load_before = os.getloadavg()
    keys = Path(tempfile.mkdtemp(prefix="corral-k-", dir="/tmp"))
    corral: dict[str, list[float]] = {}
    plain: dict[str, list[float]] = {}
    shapes: dict[str, list[str]] = {}
    try:
        key = make_key(keys)
        with BenchDaemon() as daemon:
            builds = warm_builds(daemon, args.runs)
            print(f"warm builds: {builds}", file=sys.stderr, flush=True)
            files = debian_files(daemon)
            for path in (files["kernel"], files["initrd"], files["rootfs"]):
                path.read_bytes()  # page cache warm for whichever side boots first
            for run in range(args.runs):
                order = ("corral", "plain") if run % 2 == 0 else ("plain", "corral")
                for side in order:
                    if side == "corral":
                        times, shapes["corral"] = corral_run(daemon, key)
                        target = corral
                    else:
                        times, shapes["plain"] = plain_run(files, key)
                        target = plain
                    for phase, value in times.items():
                        target.setdefault(phase, []).append(value)
                    summary = ", ".join(f"{phase} {value:.1f}" for phase, value in times.items())
                    print(f"run {run + 1}/{args.runs} {side}: {summary}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(keys, ignore_errors=True)
    load_after = os.getloadavg()

    rows = [
        ["image build, warm cache", *stats(builds), "", "", "", ""],
        ["image build, cold (docs/images.md)", documented("cold build"), "", "", "", "", "", ""],
    ]
    ratios = {phase: median(corral[phase]) / median(plain[phase]) for phase in PHASES}
    for phase in PHASES:
        rows.append([phase, *stats(corral[phase]), *stats(plain[phase]), f"{ratios[phase]:.3f}"])
    rows.append([STOP, *stats(corral[STOP]), *stats(plain[STOP]), ""])
    rows.append([PREP, "", "", "", *stats(plain[PREP]), ""])
    print_table(
        f"Debian guest, {CPUS} vCPU, {MEMORY_MIB} MiB, TCG, {args.runs} interleaved runs (seconds)",
        ["what", "corral median", "min", "max", "plain median", "min", "max", "corral/plain"],
        rows,
    )
    met = [phase for phase, ratio in ratios.items() if ratio <= GOAL]
    print(f"\ngoal corral/plain <= {GOAL}: met for {len(met)} of {len(ratios)} phases ({', '.join(met) or 'none'})")
    if shapes.get("corral") and shapes.get("plain"):
        only_corral, only_plain = shape_difference(shapes["corral"], shapes["plain"])
        if not only_corral and not only_plain:
            print("QEMU command line: the same shape as corral's")
        else:
            print(f"QEMU command line differs from corral's: only corral {only_corral}, only plain {only_plain}")
    print(f"host load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
