"""HA: how long a crashed host's HA VM is down, how fast a partitioned host fences itself, and how many times a VM
ever ran twice (goal: <= 20 s median and <= 30 s worst from crash to guest answering elsewhere; 0 double runs).

A pool of corral.localpool on a PostgreSQL server of its own: a control plane and hosts h1, h2 sharing one storage
pool, plus h3 (its own pool, so 1 of 3 hosts fails at a time, never "most"). Default lease timings (10 s).

- **crash** (``--crashes N``, default 10): an HA VM runs on h1 or h2; every process of that host's namespace is
  SIGKILLed at once (agent and QEMU); measured: the takeover (host ``dead``), QEMU running on the other host, and
  its guest agent answering ``vm exec``. The crashed agent is started again before the next round (it rejoins),
  and the next crash hits the host the VM now runs on.
- **partition** (``--partitions N``, default 3): the VM's host cannot reach PostgreSQL (the hosts reach it over TCP
  here, an nftables drop inside the namespace cuts it); measured: the fence (its QEMU gone) and the restart on
  the other host; then the partition heals and the host rejoins.
- a sampler reads every QEMU process of the machine every 100 ms over the whole run: a VM seen with two is a
  double run.

    sudo python benchmarks/ha.py [--crashes 10] [--partitions 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table

from corral.localpool import LocalPool, alive, namespace_pids
from corral.store.db import Store
from corral.store.pgserver import PgServer

PAIR = ("h1", "h2")


class Pool(LocalPool):
    """h1 and h2 reach PostgreSQL over TCP (so a firewall rule can cut them off), h3 over its unix socket."""

    tcp_url = ""

    def env(self, home: Path) -> dict[str, str]:
        env = super().env(home)
        if home in (self.homes.get("h1"), self.homes.get("h2")):
            env["CORRAL_DB"] = self.tcp_url
        return env


class Sampler(threading.Thread):
    def __init__(self, pool: Pool) -> None:
        super().__init__(daemon=True)
        self.pool, self.samples, self.doubles = pool, 0, 0
        self.stopped = threading.Event()

    def scan(self) -> dict[str, dict[str, int]]:
        runs = {host: str(self.pool.homes[host] / "run") + "/" for host in ("h1", "h2", "h3")}
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
            for host, run in runs.items():
                at = cmdline.find(run)
                if at >= 0:
                    vm = cmdline[at + len(run) : at + len(run) + 12]
                    found.setdefault(vm, {}).setdefault(host, 0)
                    found[vm][host] += 1
        return found

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            self.samples += 1
            self.doubles += sum(1 for hosts in self.scan().values() if sum(hosts.values()) > 1)


def until(check: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def partition(pool: Pool, host: str, on: bool) -> None:
    netns = pool.netns(host)
    if on:
        rules = (
            f"table inet corralpart {{\n chain out {{ type filter hook output priority 0; "
            f"ip daddr {pool.subnet}.1 drop; }}\n chain in {{ type filter hook input priority 0; "
            f"ip saddr {pool.subnet}.1 drop; }}\n}}\n"
        )
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)
    else:
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "corralpart"],
            check=False,
            capture_output=True,
        )


def round_trip(pool: Pool, sampler: Sampler, vm_id: str, kind: str) -> dict[str, float]:
    """One crash or partition of the host the VM runs on; returns the phases' times in seconds."""
    with pool.client(120) as corral:
        source = corral.vm("ha1")["host"]
        target = PAIR[1 - PAIR.index(source)]
        started = time.monotonic()
        phases: dict[str, float] = {}
        if kind == "crash":
            for pid in namespace_pids(pool.netns(source)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        else:
            partition(pool, source, True)
            until(lambda: source not in sampler.scan().get(vm_id[:12], {}), 30, "the fence")
            phases["fence"] = time.monotonic() - started
        try:
            until(lambda: corral.host(source)["state"] == "dead", 60, "the takeover", every=0.2)
            phases["takeover"] = time.monotonic() - started
            until(lambda: sampler.scan().get(vm_id[:12], {}).get(target) == 1, 60, "QEMU on the survivor")
            phases["qemu"] = time.monotonic() - started
            until(lambda: corral.vm("ha1")["state"] == "running", 30, "the VM's row", every=0.1)
            assert corral.exec_vm("ha1", ["echo", "up"])["stdout"] == "up\n"
            phases["answering"] = time.monotonic() - started
        finally:
            if kind == "crash":
                pool.agents[source].start()
            else:
                partition(pool, source, False)
        until(lambda: corral.host(source)["state"] == "online", 120, f"{source} to rejoin", every=0.5)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crashes", type=int, default=10)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: the pool's hosts are network namespaces (hint: run it as root)")
    images = Path(tempfile.mkdtemp(prefix="bh-img-", dir="/tmp"))
    pool = Pool("", prefix="bh", settings={"CORRAL_ACCEL": "tcg"})
    server: PgServer | None = None
    sampler: Sampler | None = None
    results: dict[str, list[dict[str, float]]] = {"crash": [], "partition": []}
    try:
        pool.network()
        server = PgServer(listen=f"{pool.subnet}.1")
        server.start()
        name = f"ha_{uuid.uuid4().hex[:8]}"
        server.create_database(name)
        pool.url = f"postgresql+psycopg://corral@/{name}?host={server.root}&port={server.port}"
        pool.tcp_url = (
            f"postgresql+psycopg://corral@{pool.subnet}.1:{server.port}/{name}?connect_timeout=3&tcp_user_timeout=4000"
        )
        store = Store(pool.url)
        store.migrate()
        store.close()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", pools_of="h1", images=images)
        pool.add_host("h3", images=images)
        pool.wait_online(["h1", "h2", "h3"])
        pool.cli("image", "build", "tiny", timeout=1800)
        pool.cli("vm", "run", "ha1", "--host", "h1", "--ha", "--memory", "192M", timeout=400)
        with pool.client() as corral:
            vm_id = corral.vm("ha1")["id"]
        sampler = Sampler(pool)
        sampler.start()
        for kind, count in (("crash", args.crashes), ("partition", args.partitions)):
            for index in range(count):
                phases = round_trip(pool, sampler, vm_id, kind)
                results[kind].append(phases)
                print(
                    f"{kind} {index + 1}/{count}: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if sampler is not None:
            sampler.stopped.set()
        for host in PAIR:
            with contextlib.suppress(Exception):
                partition(pool, host, False)
        pool.close()
        if server is not None:
            server.stop()
        shutil.rmtree(images, ignore_errors=True)
    rows = []
    for kind, runs in results.items():
        for phase in ("fence", "takeover", "qemu", "answering"):
            values = [run[phase] for run in runs if phase in run]
            if values:
                rows.append([kind, phase, len(values), f"{statistics.median(values):.1f}", f"{max(values):.1f}"])
    print_table(
        "HA (seconds from the crash or the partition; default 10 s lease)",
        ["EVENT", "PHASE", "N", "MEDIAN", "WORST"],
        rows,
    )
    print(
        f"\ndouble runs: {sampler.doubles if sampler else '-'} in {sampler.samples if sampler else 0} samples "
        "(every 100 ms)"
    )


if __name__ == "__main__":
    main()
