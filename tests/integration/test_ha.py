"""HA through the whole stack (docs/ha.md): a control plane and agents h1..h3 in network namespaces on a PostgreSQL
server of this module's own (corral.localpool), real QEMU running the tiny image, the default lease timings
(10 s lease, fence at 8 s, takeover 5 s after expiry).

h1 and h2 share one storage pool (h2's pools directory is h1's), h3 has its own. h2 reaches PostgreSQL over TCP
through the pool's bridge (the others over its unix socket), so a firewall rule inside h2's namespace cuts it off
the store while everything else there keeps running: the partition. A sampler looks at every QEMU process of the
machine every 100 ms for the whole module and records any moment when one VM had two.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.localpool import LocalPool, namespace_pids
from corral.store.db import Store
from tests.conftest import alive, new_home, require

VICTIM = "h2"  # the host reached over TCP, so a firewall rule can cut it off the store


class Pool(LocalPool):
    tcp_url = ""

    def env(self, home: Path) -> dict[str, str]:
        env = super().env(home)
        if self.homes.get(VICTIM) == home:
            env["CORRAL_DB"] = self.tcp_url
        return env

    def json(self, *argv: str, timeout: float = 300) -> Any:
        return json.loads(self.cli(*argv, "--json", timeout=timeout).stdout)

    def vm(self, name: str) -> dict[str, Any]:
        return self.json("vm", "show", name)

    def host(self, name: str) -> dict[str, Any]:
        return self.json("host", "show", name)

    def sh(self, name: str, script: str, timeout: float = 60) -> str:
        return self.cli("vm", "exec", name, "--", "/bin/sh", "-c", script, timeout=timeout).stdout


class Sampler:
    """Every 100 ms: the QEMU processes of every VM of the pool, by host (each host's run directory is under its
    own home). ``doubles`` keeps every sample where a VM had more than one."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.samples = 0
        self.doubles: list[tuple[float, str, dict[str, int]]] = []
        self.latest: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def scan(self) -> dict[str, dict[str, int]]:
        """{vm id prefix (12): {host: QEMU processes}}"""
        homes = {host: str(self.pool.homes[host] / "run") + "/" for host in ("h1", "h2", "h3")}
        found: dict[str, dict[str, int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" not in cmdline or not alive(int(entry.name)):
                continue
            for host, run in homes.items():
                at = cmdline.find(run)
                if at >= 0:
                    vm = cmdline[at + len(run) : at + len(run) + 12]
                    found.setdefault(vm, {}).setdefault(host, 0)
                    found[vm][host] += 1
                    break
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            found = self.scan()
            self.latest = found
            self.samples += 1
            for vm, hosts in found.items():
                if sum(hosts.values()) > 1:
                    self.doubles.append((time.monotonic(), vm, hosts))

    def copies(self, vm_id: str) -> dict[str, int]:
        return self.scan().get(vm_id[:12], {})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def until(check: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def pool(qemu_available: None) -> Iterator[Pool]:
    from corral.store.pgserver import PgServer, find_bin_dir

    require(find_bin_dir() is not None, "PostgreSQL is not installed (make setup installs it)")
    require(shutil.which("ip") is not None and shutil.which("nft") is not None, "iproute2 or nftables is missing")
    require(os.geteuid() == 0, "network namespaces need root")
    images = new_home("ch-img-")
    pool = Pool("", prefix="ch", make_home=lambda host: new_home(f"ch-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    server: PgServer | None = None
    try:
        pool.network()
        # Listening on the bridge's address too: the victim's agent reaches it over TCP from its namespace.
        server = PgServer(listen=f"{pool.subnet}.1")
        server.start()
        name = f"ha_{uuid.uuid4().hex[:10]}"
        server.create_database(name)
        pool.url = f"postgresql+psycopg://corral@/{name}?host={server.root}&port={server.port}"
        # A dead TCP peer is noticed in seconds (libpq's own settings; docs/ha.md recommends them).
        pool.tcp_url = (
            f"postgresql+psycopg://corral@{pool.subnet}.1:{server.port}/{name}?connect_timeout=3&tcp_user_timeout=4000"
        )
        store = Store(pool.url)
        try:
            store.migrate()
        finally:
            store.close()
        pool.pg = server  # type: ignore[attr-defined]
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", pools_of="h1", images=images)
        pool.add_host("h3", images=images)
        pool.wait_online(["h1", "h2", "h3"])
        pool.cli("image", "build", "tiny", timeout=1800)
        yield pool
    finally:
        pool.close()
        if server is not None:
            server.stop()
        shutil.rmtree(images, ignore_errors=True)


@pytest.fixture(scope="module")
def sampler(pool: Pool) -> Iterator[Sampler]:
    watch = Sampler(pool)
    try:
        yield watch
    finally:
        watch.stop()


def _refused(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_ha_is_refused_on_a_single_host(daemon: Any) -> None:
    line = _refused(daemon.cli("vm", "create", "hax", "--ha", check=False))
    assert "HA needs a pool of hosts on PostgreSQL" in line and "hint:" in line, line
    line = _refused(daemon.cli("vm", "create", "hax", "--ha-priority", "5", check=False))
    assert "--ha-priority needs --ha" in line
    assert "hax" not in daemon.cli("vm", "list").stdout


def test_a_crashed_hosts_ha_vm_runs_again_on_a_survivor(pool: Pool, sampler: Sampler) -> None:
    pool.cli("vm", "run", "hv", "--host", "h1", "--ha", "--ha-priority", "5", "--memory", "192M", timeout=400)
    pool.cli("vm", "run", "nv", "--host", "h1", "--memory", "192M", timeout=400)
    assert pool.vm("hv")["spec"]["ha"] is True
    # HA is a setting like any other: on and off with `vm set`, the last word is "not HA".
    pool.cli("vm", "set", "nv", "--ha", "--ha-priority", "3")
    assert pool.vm("nv")["spec"]["ha"] is True and pool.vm("nv")["spec"]["ha_priority"] == 3
    pool.cli("vm", "set", "nv", "--no-ha")
    assert pool.vm("nv")["spec"]["ha"] is False
    pool.sh("hv", "echo before-crash > /root/marker && sync")
    assert pool.host("h1")["lease_expires_at"]
    hv_id = pool.vm("hv")["id"]
    assert sampler.copies(hv_id) == {"h1": 1}
    # The crash: every process of h1's namespace, its agent and QEMUs included, at once.
    pids = namespace_pids(pool.netns("h1"))
    crashed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    with pool.client(60) as corral:
        until(lambda: corral.host("h1")["state"] == "dead", 40, "the takeover of h1")
        taken = time.monotonic() - crashed
        until(lambda: sampler.copies(hv_id).get("h2") == 1, 30, "QEMU of the HA VM on h2")
        launched = time.monotonic() - crashed
        until(lambda: corral.vm("hv")["state"] == "running", 30, "the HA VM's row to say running")
        # The exec job waits for the guest agent's first answer: the moment the VM serves again.
        assert corral.exec_vm("hv", ["cat", "/root/marker"])["stdout"] == "before-crash\n"
        recovered = time.monotonic() - crashed
    vm = pool.vm("hv")
    print(
        f"\ncrash: taken over after {taken:.1f} s, QEMU on h2 after {launched:.1f} s, guest answering after "
        f"{recovered:.1f} s"
    )
    assert vm["host"] == "h2", "the only survivor that reaches h1's storage pool"
    # The pool's part (lease expiry, margin, takeover, start job) is ~15 s with the default timings; the guest's
    # TCG boot after it takes 5 s on a quiet machine and up to ~20 s on a loaded 2-core one (docs/ha.md).
    assert launched < 30, f"the HA VM ran again {launched:.1f} s after the crash"
    assert recovered < 45, f"the HA VM's guest answered {recovered:.1f} s after the crash"
    assert sampler.copies(hv_id) == {"h2": 1}
    lost = pool.vm("nv")
    assert lost["state"] == "lost" and lost["host"] == "h1", lost
    assert "host h1 died" in lost["status"] and "not HA" in lost["status"], lost["status"]
    h1 = pool.host("h1")
    assert h1["state"] == "dead" and h1["epoch"] == 1, h1
    print(f"\nHA VM answered on {vm['host']} {recovered:.1f} s after its host's crash")

    # h1 comes back: it rejoins under the new epoch and starts nothing that moved.
    pool.agents["h1"].start()
    until(lambda: pool.host("h1")["state"] == "online", 60, "h1 to rejoin")
    time.sleep(3)
    assert sampler.copies(hv_id) == {"h2": 1}
    assert pool.vm("hv")["host"] == "h2"
    pool.cli("vm", "delete", "nv", "--force")
    assert not sampler.doubles, sampler.doubles


def _partition(pool: Pool, on: bool) -> None:
    netns = pool.netns(VICTIM)
    if on:
        rules = (
            f"table inet corralpart {{\n chain out {{ type filter hook output priority 0; "
            f"ip daddr {pool.subnet}.1 drop; }}\n chain in {{ type filter hook input priority 0; "
            f"ip saddr {pool.subnet}.1 drop; }}\n}}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True
        )
    else:
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "corralpart"],
            check=False,
            capture_output=True,
        )


def test_a_partitioned_host_fences_itself_before_the_takeover(pool: Pool, sampler: Sampler) -> None:
    pool.cli("vm", "run", "pv", "--host", VICTIM, "--ha", "--memory", "192M", timeout=400)
    pool.cli("vm", "run", "np", "--host", VICTIM, "--memory", "192M", timeout=400)
    pool.sh("pv", "echo before-partition > /root/marker && sync")
    pv_id, np_id = pool.vm("pv")["id"], pool.vm("np")["id"]
    epoch = pool.host(VICTIM)["epoch"]
    np_pid = pool.vm("np")["pid"]
    # What `host list` shows for the victim over the partition: "fenced" between its lease's expiry and the
    # takeover ("dead"), then "online" once it rejoined.
    shown: list[str] = []
    listing = threading.Event()

    def watch_host_list() -> None:
        while not listing.is_set():
            with contextlib.suppress(Exception):
                states = {h["name"]: h["state"] for h in pool.json("host", "list", timeout=30)}
                if not shown or shown[-1] != states[VICTIM]:
                    shown.append(states[VICTIM])

    watcher = threading.Thread(target=watch_host_list, daemon=True)
    watcher.start()
    _partition(pool, True)
    try:
        cut = time.monotonic()
        until(lambda: not sampler.copies(pv_id), 20, "the victim to fence its HA VM")
        fenced = time.monotonic() - cut
        # While it is fenced, nothing runs the HA VM, until the control plane restarts it on h1.
        until(lambda: sampler.copies(pv_id).get("h1") == 1, 60, "the takeover to start the VM on h1")
        restarted = time.monotonic() - cut
        until(
            lambda: (
                pool.cli("vm", "exec", "pv", "--", "cat", "/root/marker", check=False, timeout=30).stdout
                == "before-partition\n"
            ),
            60,
            "the guest on h1",
            every=0.5,
        )
        assert pool.host(VICTIM)["state"] == "dead"
        # The non-HA VM was not fenced: it still runs, cut off, recorded lost meanwhile.
        assert sampler.copies(np_id) == {VICTIM: 1}
        assert pool.vm("np")["state"] == "lost"
    finally:
        _partition(pool, False)
    healed = time.monotonic()
    until(lambda: pool.host(VICTIM)["state"] == "online", 90, "the victim to rejoin", every=0.5)
    rejoined = time.monotonic() - healed
    listing.set()
    watcher.join(60)
    assert "fenced" in shown and shown.index("fenced") < shown.index("dead"), shown
    assert pool.host(VICTIM)["epoch"] == epoch + 1
    until(lambda: pool.vm("np")["state"] == "running", 30, "the non-HA VM to be seen running again")
    assert pool.vm("np")["pid"] == np_pid, "never restarted"
    time.sleep(3)
    assert sampler.copies(pv_id) == {"h1": 1} and pool.vm("pv")["host"] == "h1"
    assert fenced < restarted
    listed = pool.cli(
        "events", "--all-projects", "--limit", "500", "--type", "host.", "--type", "vm.ha_restart", "--json"
    ).stdout
    events = {json.loads(line)["type"] for line in listed.splitlines() if line.strip()}
    assert {"host.takeover", "vm.ha_restart", "host.fenced"} <= events, events
    print(
        f"\npartition: fenced after {fenced:.1f} s, restarted on h1 after {restarted:.1f} s; rejoined "
        f"{rejoined:.1f} s after the heal; {sampler.samples} samples, {len(sampler.doubles)} doubles"
    )
    assert not sampler.doubles, sampler.doubles
    pool.cli("vm", "delete", "np", "--force")


def test_a_short_store_outage_fences_nothing_and_restarts_nothing(pool: Pool, sampler: Sampler) -> None:
    before = {name: pool.vm(name)["pid"] for name in ("hv", "pv")}
    epochs = {name: pool.host(name)["epoch"] for name in ("h1", "h2", "h3")}
    pool.pg.restart(down_for=3.0)  # type: ignore[attr-defined]
    time.sleep(16)  # past a whole lease and the takeover margin
    assert {name: pool.host(name)["epoch"] for name in ("h1", "h2", "h3")} == epochs
    assert {name: pool.vm(name)["pid"] for name in ("hv", "pv")} == before
    assert all(pool.host(name)["state"] == "online" for name in ("h1", "h2", "h3"))
    for name in ("hv", "pv"):
        assert sum(sampler.copies(pool.vm(name)["id"]).values()) == 1
    assert not sampler.doubles, sampler.doubles


def test_an_agent_killed_alone_is_fenced_by_its_fencer_before_the_takeover(pool: Pool, sampler: Sampler) -> None:
    """Only the agent dies (SIGKILL; an OOM kill): its QEMUs live on in their own sessions, and so does its fencer,
    which kills the HA VM's QEMU before the lease's expiry, so the takeover never makes a second copy."""
    from corral.host import fencer

    pv_id = pool.vm("pv")["id"]
    assert pool.vm("pv")["host"] == "h1" and sampler.copies(pv_id) == {"h1": 1}
    home = pool.homes["h1"]
    fencer_pid = fencer.running_fencer(home)
    assert fencer_pid is not None, "h1's agent runs a fencer on a PostgreSQL pool"
    on_h1 = {vm_id: hosts for vm_id, hosts in sampler.scan().items() if "h1" in hosts}
    vms = {vm["name"]: (vm["id"][:12], vm["host"], vm["state"]) for vm in pool.json("vm", "list")}
    print(f"\nQEMUs on h1 before the kill (every HA VM, hv came back there with the partition): {on_h1}; {vms}")
    killed = time.monotonic()
    pool.agents["h1"].stop(signal.SIGKILL)
    assert alive(fencer_pid), "the fencer outlives its agent"
    until(lambda: not sampler.copies(pv_id), 20, "the fencer to kill the HA VM's QEMU on h1")
    fenced = time.monotonic() - killed
    until(lambda: sampler.copies(pv_id).get("h2") == 1, 40, "the takeover to start the VM on h2")
    restarted = time.monotonic() - killed
    assert pool.host("h1")["state"] == "dead"
    until(
        lambda: (
            pool.cli("vm", "exec", "pv", "--", "cat", "/root/marker", check=False, timeout=30).stdout
            == "before-partition\n"
        ),
        60,
        "the guest on h2 with its data",
        every=0.5,
    )
    log = (home / "logs" / "fencer.log").read_text()
    assert "fenced: killed QEMU" in log and "dead" in log, log
    # The killed agent, restarted, rejoins and starts nothing that moved. (Its old fencer ended once nothing was
    # left to guard, agent dead and no QEMU here; the new agent starts another.)
    pool.agents["h1"].start()
    until(lambda: pool.host("h1")["state"] == "online", 60, "h1 to rejoin", every=0.5)
    assert fencer.running_fencer(home) is not None
    listed = pool.cli("events", "--all-projects", "--limit", "500", "--type", "host.fenced", "--json").stdout
    reported = [json.loads(line)["data"] for line in listed.splitlines() if line.strip()]
    kills = [line for line in log.splitlines() if "fenced: killed" in line]
    assert any(
        data.get("by") == "fencer" and data["killed"] == len(on_h1) and data["epoch"] == pool.host("h1")["epoch"]
        for data in reported
    ), (reported, kills)
    time.sleep(3)
    assert sampler.copies(pv_id) == {"h2": 1} and pool.vm("pv")["host"] == "h2"
    print(
        f"\nagent killed alone: its fencer killed the HA VM's QEMU after {fenced:.1f} s, the VM ran on h2 after "
        f"{restarted:.1f} s; {sampler.samples} samples, {len(sampler.doubles)} doubles; events {reported}; "
        f"fencer: {kills}"
    )
    assert fenced < restarted
    assert not sampler.doubles, sampler.doubles
