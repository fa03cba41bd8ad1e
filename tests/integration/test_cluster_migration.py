"""Moves between hosts through the whole stack: a control plane (`corral serve --no-agent`) and three agents on one
real PostgreSQL, each agent in its own network namespace with its own address on a test bridge and its own
CORRAL_HOME, real QEMU running the tiny image, the migration streams going between the namespaces' addresses.

Storage: h1 and h2 mount one pool (h2's pools directory is h1's, as an NFS mount would make it), h3 has its own,
so h1<->h2 moves send RAM only and moves to or from h3 copy the disks. Images live in one directory all homes
point at (images are per host; a real pool builds or imports them on every host).

The agents run without per-VM isolation (CORRAL_ISOLATION=0): two hosts on one machine would share a VM's cgroup
name, which real hosts never do (docs/migration.md). Every process, namespace and the bridge go at teardown.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.localpool import LocalPool
from corral.store.db import Store
from corral.store.models import VM, Job, Volume
from tests.conftest import alive, new_home, qemu_pids_under, require

KERNEL_TROUBLE = re.compile(r"BUG:|Oops|general protection|Kernel panic|Call Trace")
COUNTER = "i=0; while true; do i=$((i+1)); echo tick $i > /dev/ttyS0; usleep 100000; done"
GAP_SLACK = 1.0  # seconds over the guest's pause: host scheduling on a busy 2-core machine and 20 ms polling


class Cluster(LocalPool):
    """The pool of corral.localpool with what these tests read from the store and the guests."""

    def __init__(self, url: str, root: Path) -> None:
        super().__init__(
            url, prefix="cm", make_home=lambda name: new_home(f"cm-{name}-"), settings={"CORRAL_ACCEL": "tcg"}
        )
        self.root = root
        self.store = Store(url)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.store.close()

    def vm_row(self, name: str) -> VM:
        with self.store.reading() as session:
            vm = session.query(VM).filter(VM.name == name).one()
            vm.volumes  # noqa: B018
            session.expunge_all()
            return vm

    def volumes(self, name: str) -> list[Volume]:
        vm = self.vm_row(name)
        with self.store.reading() as session:
            rows = list(session.query(Volume).filter(Volume.vm_id == vm.id).order_by(Volume.device_index))
            session.expunge_all()
            return rows

    def job_row(self, job_id: str) -> Job:
        with self.store.reading() as session:
            job = session.get(Job, job_id)
            session.expunge_all()
            return job

    def copies(self, name: str) -> dict[str, list[int]]:
        """Live QEMU processes of VM ``name`` under each host's home (its run directory is per home)."""
        vm_id = self.vm_row(name).id
        found: dict[str, list[int]] = {}
        for host in ("h1", "h2", "h3"):
            pids = [pid for pid in qemu_pids_under(self.homes[host] / "run" / vm_id[:12]) if alive(pid)]
            if pids:
                found[host] = pids
        return found

    def serial(self, name: str, host: str) -> Path:
        return self.homes[host] / "run" / self.vm_row(name).id[:12] / "serial.log"

    def run_vm(self, name: str, host: str, *extra: str) -> None:
        self.cli("vm", "run", name, "--host", host, "--memory", "192M", *extra, timeout=400)

    def sh(self, name: str, script: str) -> str:
        return self.cli("vm", "exec", name, "--", "/bin/sh", "-c", script).stdout

    def start_counter(self, name: str) -> None:
        self.sh(name, f"setsid sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 &")


class SerialWatch:
    """Lines of a serial log, each stamped with the host's monotonic time when first seen (a 20 ms poll)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._offset = 0
        self._partial = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.read()
            time.sleep(0.02)

    def read(self) -> None:
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
        *complete, self._partial = (self._partial + data.decode(errors="replace")).split("\n")
        self.lines += [(now, line.strip("\r")) for line in complete]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.read()

    def ticks(self) -> list[tuple[float, int]]:
        return [(at, int(m.group(1))) for at, line in self.lines if (m := re.fullmatch(r".*tick (\d+)", line))]

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def assert_counter_continued(before: SerialWatch, after: SerialWatch, paused_ms: float | None) -> float:
    """The guest's counter goes on from where it was (no reboot, no hole), and its largest gap is the pause."""
    ticks_before, ticks_after = before.ticks(), after.ticks()
    assert ticks_before and ticks_after, "the counter must print on both hosts"
    values = [value for _, value in sorted(ticks_before + ticks_after)]
    assert values == list(range(values[0], values[0] + len(values))), f"the counter jumped: {values[-40:]}"
    assert ticks_after[0][1] == ticks_before[-1][1] + 1, (ticks_before[-1], ticks_after[0])
    merged = sorted(ticks_before + ticks_after)
    gap = max(b[0] - a[0] for a, b in itertools.pairwise(merged))
    assert paused_ms is not None
    assert gap <= 0.1 + paused_ms / 1000 + GAP_SLACK, f"the counter stalled {gap:.3f} s (pause {paused_ms} ms)"
    return gap


def kernel_trouble(text: str) -> list[str]:
    return [line for line in text.splitlines() if KERNEL_TROUBLE.search(line)]


MEASURED: list[str] = []


@pytest.fixture(scope="module")
def cluster(postgres, qemu_available) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"mig_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    # Over PostgreSQL's unix socket: it reaches the agents inside their namespaces too.
    url = f"postgresql+psycopg://corral@/{name}?host={postgres.root}&port={postgres.port}"
    images = Path(new_home("cm-img-"))
    cluster = Cluster(url, images)
    try:
        cluster.store.migrate()
        cluster.network()
        cluster.start_control()
        cluster.add_host("h1", images=images)
        cluster.add_host("h2", pools_of="h1", images=images)
        cluster.add_host("h3", images=images)

        def online() -> bool:
            listed = cluster.cli("host", "list", "--json", check=False).stdout or "[]"
            hosts = {h["name"]: h for h in json.loads(listed)}
            return len(hosts) == 3 and all(h["state"] == "online" for h in hosts.values())

        until(online, 90, "three hosts online")
        cluster.cli("image", "build", "tiny", timeout=1800)
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(images, ignore_errors=True)
        if MEASURED:
            print("\nmeasured moves:\n" + "\n".join(MEASURED))


def _migrate(cluster: Cluster, name: str, *args: str) -> dict[str, Any]:
    out = json.loads(cluster.cli("vm", "migrate", name, *args, "--json", timeout=600).stdout)
    return out["job"]["result"]


def test_live_move_on_shared_storage_keeps_the_guest_counting(cluster: Cluster) -> None:
    cluster.run_vm("mv1", "h1")
    try:
        cluster.sh("mv1", "echo before-move > /root/marker && sync")
        uptime = float(cluster.sh("mv1", "cut -d' ' -f1 /proc/uptime"))
        cluster.start_counter("mv1")
        before = SerialWatch(cluster.serial("mv1", "h1"))
        after = SerialWatch(cluster.serial("mv1", "h2"))
        until(lambda: len(before.ticks()) > 10, 30, "the counter")
        result = _migrate(cluster, "mv1", "--to", "h2")
        time.sleep(1.5)
        before.stop()
        after.stop()
        assert result["from"] == "h1" and result["to"] == "h2" and result["with_storage"] is False
        assert result["downtime_ms"] is not None and result["total_s"] > 0
        gap = assert_counter_continued(before, after, result["paused_ms"])
        MEASURED.append(
            f"shared  h1->h2: total {result['total_s']:.2f} s, downtime {result['downtime_ms']} ms, "
            f"paused {result['paused_ms']} ms, counter gap {gap * 1000:.0f} ms"
        )
        vm = cluster.vm_row("mv1")
        assert vm.host == "h2" and vm.observed_state == "running"
        assert {v.host for v in cluster.volumes("mv1")} == {"h2"}
        assert cluster.copies("mv1").keys() == {"h2"}, cluster.copies("mv1")
        assert not (cluster.homes["h1"] / "run" / vm.id[:12]).exists(), "the source's run directory went"
        assert (cluster.homes["h1"] / "pools" / "default" / cluster.volumes("mv1")[0].path).exists(), (
            "shared storage: the disk stays where both hosts see it"
        )
        assert float(cluster.sh("mv1", "cut -d' ' -f1 /proc/uptime")) > uptime, "no reboot"
        assert cluster.sh("mv1", "cat /root/marker") == "before-move\n"
        assert not kernel_trouble(after.text()), kernel_trouble(after.text())
        # And back again: the same VM moves as often as asked.
        back = _migrate(cluster, "mv1", "--to", "h1")
        assert back["to"] == "h1" and cluster.vm_row("mv1").host == "h1"
        assert cluster.copies("mv1").keys() == {"h1"}
    finally:
        cluster.cli("vm", "delete", "mv1", "--force", check=False)


def test_storage_move_copies_the_disks_to_a_host_without_the_pool(cluster: Cluster) -> None:
    cluster.run_vm("mv2", "h1", "--disk", "64M")
    try:
        blob = cluster.sh(
            "mv2", "dd if=/dev/urandom of=/root/blob bs=1M count=4 2>/dev/null; sync; md5sum /root/blob | cut -d' ' -f1"
        ).strip()
        cluster.start_counter("mv2")
        before = SerialWatch(cluster.serial("mv2", "h1"))
        after = SerialWatch(cluster.serial("mv2", "h3"))
        until(lambda: len(before.ticks()) > 10, 30, "the counter")
        source_files = [cluster.homes["h1"] / "pools" / "default" / v.path for v in cluster.volumes("mv2")]
        assert all(path.exists() for path in source_files) and len(source_files) == 2
        result = _migrate(cluster, "mv2", "--to", "h3")
        time.sleep(1.5)
        before.stop()
        after.stop()
        assert result["with_storage"] is True and result["disk_s"] > 0
        gap = assert_counter_continued(before, after, result["paused_ms"])
        MEASURED.append(
            f"storage h1->h3: total {result['total_s']:.2f} s (disks {result['disk_s']:.2f} s), "
            f"downtime {result['downtime_ms']} ms, paused {result['paused_ms']} ms, "
            f"counter gap {gap * 1000:.0f} ms"
        )
        volumes = cluster.volumes("mv2")
        assert {v.host for v in volumes} == {"h3"}
        assert all(v.backing_image is None and v.backing_path is None for v in volumes), "copied disks stand alone"
        assert not any(path.exists() for path in source_files), "the source's disks were removed"
        assert all((cluster.homes["h3"] / "pools" / "default" / v.path).exists() for v in volumes)
        assert cluster.copies("mv2").keys() == {"h3"}
        assert cluster.sh("mv2", "md5sum /root/blob | cut -d' ' -f1").strip() == blob
        assert cluster.sh("mv2", "echo 3 > /proc/sys/vm/drop_caches; md5sum /root/blob | cut -d' ' -f1").strip() == blob
        assert not kernel_trouble(after.text()), kernel_trouble(after.text())
        # The VM restarts from its copied disk on h3: nothing there depends on h1 any more.
        cluster.cli("vm", "restart", "mv2", "--force", "--wait", timeout=400)
        assert cluster.sh("mv2", "md5sum /root/blob | cut -d' ' -f1").strip() == blob
    finally:
        cluster.cli("vm", "delete", "mv2", "--force", check=False)


def test_a_forks_child_moves_like_any_vm(cluster: Cluster) -> None:
    """A child of a forkable parent runs on a private mapping of its parent's RAM file; its move must give the
    destination the same RAM block, and the child keeps its memory and answers from there."""
    cluster.run_vm("fkp", "h1", "--forkable")
    try:
        cluster.sh("fkp", "echo from-parent > /tmp/mark")
        cluster.cli("vm", "fork", "fkp", "fkc", timeout=400)
        result = _migrate(cluster, "fkc", "--to", "h2")
        assert result["to"] == "h2" and cluster.vm_row("fkc").host == "h2", result
        assert cluster.copies("fkc").keys() == {"h2"} and cluster.copies("fkp").keys() == {"h1"}
        assert cluster.sh("fkc", "cat /tmp/mark").strip() == "from-parent"
    finally:
        cluster.cli("vm", "delete", "fkc", "--force", check=False)
        cluster.cli("vm", "delete", "fkp", "--force", check=False)


def test_bad_moves_are_refused_with_one_line_and_change_nothing(cluster: Cluster) -> None:
    cluster.run_vm("mv3", "h1")
    cluster.cli("vm", "create", "mv4", "--host", "h1", "--memory", "192M")
    try:

        def refused(*argv: str) -> str:
            result = cluster.cli("vm", "migrate", *argv, check=False)
            assert result.returncode != 0, result.stdout
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            return lines[0]

        assert "already runs on host h1" in refused("mv3", "--to", "h1")
        assert "host 'nope' is not registered" in refused("mv3", "--to", "nope")
        assert "not running: it cannot move live" in refused("mv4", "--live", "--to", "h2")
        assert "share their storage pool" in refused("mv3", "--to", "h2", "--with-storage")
        assert "do not share their storage pool" in refused("mv3", "--to", "h3", "--shared-storage")
        assert "not found" in refused("ghost", "--to", "h2")
        cluster.cli("host", "drain", "h2", "--keep-vms")
        try:
            assert "host h2 cannot take VM mv3: host is drained" in refused("mv3", "--to", "h2")
        finally:
            cluster.cli("host", "undrain", "h2")
        with cluster.store.reading() as session:
            kinds = {job.kind for job in session.query(Job).filter(Job.target_name.in_(["mv3", "mv4"]))}
        assert not kinds & {"vm.migrate", "vm.migrate-in"}, "a refused move writes no job"
        assert cluster.vm_row("mv3").host == "h1" and cluster.copies("mv3").keys() == {"h1"}
        # A stopped VM on shared storage moves by its rows alone; to a host without the pool it is refused.
        assert "cannot move while stopped" in refused("mv4", "--offline", "--to", "h3")
        cluster.cli("vm", "migrate", "mv4", "--to", "h2")
        assert cluster.vm_row("mv4").host == "h2" and {v.host for v in cluster.volumes("mv4")} == {"h2"}
    finally:
        cluster.cli("vm", "delete", "mv3", "--force", check=False)
        cluster.cli("vm", "delete", "mv4", "--force", check=False)


def test_drain_moves_every_vm_off_the_host(cluster: Cluster) -> None:
    cluster.run_vm("dr1", "h2")
    cluster.run_vm("dr2", "h2")
    try:
        cluster.start_counter("dr1")
        out = json.loads(cluster.cli("host", "drain", "h2", "--json", timeout=900).stdout)
        assert out["job"]["state"] == "succeeded", out
        assert {move["vm"] for move in out["plan"]["vms"]} == {"dr1", "dr2"}
        for name in ("dr1", "dr2"):
            vm = cluster.vm_row(name)
            assert vm.host in ("h1", "h3") and vm.observed_state == "running", (name, vm.host, vm.observed_state)
            assert cluster.copies(name).keys() == {vm.host}
            assert cluster.sh(name, "echo alive").strip() == "alive"
        assert not qemu_pids_under(cluster.homes["h2"] / "run"), "nothing runs on the drained host"
        host = json.loads(cluster.cli("host", "show", "h2", "--json").stdout)
        assert host["drained"] and not host["vm_names"]
        ticks = SerialWatch(cluster.serial("dr1", cluster.vm_row("dr1").host))
        time.sleep(0.5)
        ticks.stop()
        assert not kernel_trouble(ticks.text())
    finally:
        cluster.cli("host", "undrain", "h2", check=False)
        cluster.cli("vm", "delete", "dr1", "--force", check=False)
        cluster.cli("vm", "delete", "dr2", "--force", check=False)


def test_killed_source_agent_leaves_exactly_one_running_copy(cluster: Cluster) -> None:
    cluster.run_vm("mv5", "h1")
    try:
        cluster.start_counter("mv5")
        with cluster.client() as corral:
            job = corral.migrate_vm("mv5", to="h2")["job"]

        def sending() -> bool:
            row = cluster.job_row(job["id"])
            return row.state != "queued" and (
                "ram" in row.message or "disks" in row.message or row.progress > 0.04 or row.state != "running"
            )

        until(sending, 60, "the source to start sending")
        cluster.agents["h1"].stop(signal.SIGKILL)
        dest_job = cluster.job_row(job["id"]).params["dest_job"]
        until(
            lambda: cluster.job_row(dest_job).state in ("succeeded", "failed", "cancelled"),
            120,
            "the destination's job to end",
        )
        cluster.agents["h1"].start()  # a restarted agent sweeps what the move left on its host

        def settled() -> dict[str, list[int]] | None:
            copies = cluster.copies("mv5")
            return copies if len(copies) == 1 and len(next(iter(copies.values()))) == 1 else None

        copies = until(settled, 60, "exactly one QEMU of the VM")
        vm = cluster.vm_row("mv5")
        assert copies.keys() == {vm.host}, (copies, vm.host)
        until(lambda: cluster.vm_row("mv5").observed_state == "running", 30, "the VM to be running")
        watch = SerialWatch(cluster.serial("mv5", vm.host))
        time.sleep(1.0)
        watch.stop()
        assert len(watch.ticks()) >= 3, "the guest keeps counting where the store says it runs"
        assert cluster.sh("mv5", "echo alive").strip() == "alive"
        outcome = "moved to h2" if vm.host == "h2" else "stayed on h1"
        MEASURED.append(
            f"source agent killed mid-move: the VM {outcome}, destination job {cluster.job_row(dest_job).state}"
        )
    finally:
        cluster.cli("vm", "delete", "mv5", "--force", check=False)
