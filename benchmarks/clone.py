"""Snapshots, clones and forks, measured side by side in one run.

- fork of a running 256 MiB VM until the child runs, against a cold boot of the same image (goal <= 0.1)
- memory (PSS) of N forks against N cold-booted VMs (goal <= 0.25)
- linked clone of a VM with a 10 GiB disk: time and bytes written (goal < 100 ms, < 1 MiB)
- snapshot with memory and revert, 256 MiB and 1 GiB guests
- full clone of a 512 MiB disk against `cp` of the same file

    python benchmarks/clone.py [--runs 5] [--vms 10]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import BenchDaemon, median, print_table


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _job(corral: Any, accepted: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    job = corral.wait_job(accepted["job"]["id"], timeout=600)
    return time.monotonic() - started, job


def _job_seconds(job: dict[str, Any]) -> float:
    from datetime import datetime

    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"])
    return (end - start).total_seconds()


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def bench_fork(corral: Any, runs: int) -> list[list[object]]:
    parent = _name("fp")
    corral.wait_job(
        corral.create_vm({"name": parent, "image": "tiny", "forkable": True}, start=True, wait=True)["job"]["id"]
    )
    fork_ready, pauses, cold = [], [], []
    for _ in range(runs):
        child = _name("fc")
        _, job = _job(corral, corral.fork_vm(parent, child))
        fork_ready.append(job["result"]["child_ready_ms"] / 1000)
        pauses.append(job["result"]["parent_pause_ms"] / 1000)
        corral.wait_job(corral.delete_vm(child, force=True)["job"]["id"])
        boot = _name("cb")
        seconds, _ = _job(corral, corral.create_vm({"name": boot, "image": "tiny"}, start=True, wait=True))
        cold.append(seconds)
        corral.wait_job(corral.delete_vm(boot, force=True)["job"]["id"])
    corral.wait_job(corral.delete_vm(parent, force=True)["job"]["id"])
    return [
        ["fork: child running after its process starts", f"{median(fork_ready):.3f}", ""],
        ["fork: parent paused", f"{median(pauses):.3f}", ""],
        ["cold boot to guest agent (create+start)", f"{median(cold):.3f}", ""],
        ["ratio fork / cold boot (goal <= 0.1)", f"{median(fork_ready) / median(cold):.3f}", ""],
    ]


def bench_memory(corral: Any, count: int) -> list[list[object]]:
    parent = _name("mp")
    corral.wait_job(
        corral.create_vm({"name": parent, "image": "tiny", "forkable": True}, start=True, wait=True)["job"]["id"]
    )
    base = _name("mk")
    _, job = _job(corral, corral.fork_vm(parent, base, count))
    children = job["result"]["children"]
    cold = [_name("mc") for _ in range(count)]
    for name in cold:
        corral.wait_job(corral.create_vm({"name": name, "image": "tiny"}, start=True, wait=True)["job"]["id"])
    time.sleep(2)
    fork_pss = sum(pss_kib(corral.vm(name)["pid"]) for name in children)
    cold_pss = sum(pss_kib(corral.vm(name)["pid"]) for name in cold)
    for name in [*children, *cold, parent]:
        corral.wait_job(corral.delete_vm(name, force=True)["job"]["id"])
    return [
        [f"PSS of {count} forks (MiB)", f"{fork_pss / 1024:.0f}", ""],
        [f"PSS of {count} cold-booted VMs (MiB)", f"{cold_pss / 1024:.0f}", ""],
        ["ratio forks / cold (goal <= 0.25)", f"{fork_pss / cold_pss:.3f}", ""],
    ]


def bench_linked(corral: Any, home: Path, runs: int) -> list[list[object]]:
    source = _name("ls")
    corral.wait_job(corral.create_vm({"name": source, "image": "tiny", "disks": [{"size": "10G"}]})["job"]["id"])
    pool = home / "pools" / "default"
    times, written = [], []
    for _ in range(runs):
        clone = _name("lc")
        before = sum(p.stat().st_blocks * 512 for p in pool.rglob("*.qcow2"))
        _, job = _job(corral, corral.clone_vm(source, clone, linked=True))
        times.append(_job_seconds(job))
        written.append(sum(p.stat().st_blocks * 512 for p in pool.rglob("*.qcow2")) - before)
        corral.wait_job(corral.delete_vm(clone, force=True)["job"]["id"])
    corral.wait_job(corral.delete_vm(source, force=True)["job"]["id"])
    return [
        ["linked clone of a VM with a 10 GiB disk: job time (s)", f"{median(times):.3f}", "goal < 0.1"],
        ["linked clone: bytes added to the pool (KiB)", f"{median(written) / 1024:.0f}", "goal < 1024"],
    ]


def bench_snapshots(corral: Any, runs: int) -> list[list[object]]:
    rows = []
    for memory in ("256M", "1G"):
        vm = _name("sn")
        corral.wait_job(
            corral.create_vm({"name": vm, "image": "tiny", "memory": memory}, start=True, wait=True)["job"]["id"]
        )
        corral.exec_vm(vm, ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=1M count=1; true"])
        saves, reverts = [], []
        for index in range(runs):
            _, job = _job(corral, corral.create_snapshot(vm, f"s{index}", memory=True))
            saves.append(_job_seconds(job))
            _, job = _job(corral, corral.revert_snapshot(vm, f"s{index}"))
            reverts.append(_job_seconds(job))
        corral.wait_job(corral.delete_vm(vm, force=True)["job"]["id"])
        rows += [
            [f"snapshot with memory, {memory} guest (s)", f"{median(saves):.3f}", ""],
            [f"revert to it, {memory} guest (s)", f"{median(reverts):.3f}", ""],
        ]
    return rows


def bench_full_clone(corral: Any, home: Path) -> list[list[object]]:
    volume = _name("fv")
    corral.wait_job(corral.create_volume(volume, "512M")["job"]["id"])
    path = home / "pools" / "default" / f"{volume}.qcow2"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 512M", str(path)], check=True, capture_output=True)
    source = _name("fs")
    corral.wait_job(corral.create_vm({"name": source, "image": "tiny"}, volumes=[volume])["job"]["id"])
    clone = _name("fd")
    _, job = _job(corral, corral.clone_vm(source, clone))
    clone_seconds = _job_seconds(job)
    copy = path.with_suffix(".cp")
    started = time.monotonic()
    shutil.copyfile(path, copy)
    subprocess.run(["sync", str(copy)], check=False)
    cp_seconds = time.monotonic() - started
    copy.unlink()
    size_mib = path.stat().st_size / (1 << 20)
    for name in (clone, source):
        corral.wait_job(corral.delete_vm(name, force=True)["job"]["id"])
    return [
        ["full clone (root + 512 MiB data disk), MiB/s", f"{size_mib / clone_seconds:.0f}", ""],
        ["cp of the 512 MiB disk file, MiB/s", f"{size_mib / cp_seconds:.0f}", ""],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=10)
    args = parser.parse_args()
    from corral.client import Client

    with BenchDaemon() as daemon, Client(home=daemon.home, timeout=120) as corral:
        print_table("Fork against cold boot (seconds, medians)", ["what", "value", ""], bench_fork(corral, args.runs))
        print_table("Memory", ["what", "value", ""], bench_memory(corral, args.vms))
        print_table("Linked clones", ["what", "value", "goal"], bench_linked(corral, daemon.home, args.runs))
        print_table(
            "Snapshots with memory (job time, medians)", ["what", "value", ""], bench_snapshots(corral, args.runs)
        )
        print_table("Full clone throughput", ["what", "value", ""], bench_full_clone(corral, daemon.home))


if __name__ == "__main__":
    main()
