"""Network throughput and latency of corral's networks: guest to guest on one NAT bridge, guest to host over
the bridge, and guest to host over user-mode networking (QEMU's slirp) for comparison. Then the cost of
isolation on boot (benchmarks/isolation.py's measurement, run here too so one run gives the whole table).

Run as root: python benchmarks/network.py [--runs 3] [--megabytes 32]
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchDaemon, median, print_table


def _exec(bench: BenchDaemon, vm: str, script: str) -> str:
    return bench.cli("vm", "exec", vm, "--timeout", "300", "--", "sh", "-c", script).stdout


def _show(bench: BenchDaemon, vm: str) -> dict:
    return bench.client_call("vm", vm)  # type: ignore[return-value]


def _wait_address(bench: BenchDaemon, vm: str, ip: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = bench.cli("vm", "exec", vm, "--", "sh", "-c", f"ip -4 addr | grep -q 'inet {ip}/'", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{vm} never got {ip}")


def guest_to_guest(bench: BenchDaemon, sender: str, receiver: str, receiver_ip: str, megabytes: int) -> float:
    """MB/s of a TCP stream from one guest's busybox nc to another's."""
    _exec(bench, receiver, "(nc -l -p 5001 >/dev/null &) ; sleep 0.3")
    started = time.monotonic()
    _exec(bench, sender, f"dd if=/dev/zero bs=64k count={megabytes * 16} 2>/dev/null | nc -w 10 {receiver_ip} 5001")
    return megabytes / (time.monotonic() - started)


def guest_to_host(bench: BenchDaemon, sender: str, host_ip: str, megabytes: int) -> float:
    """MB/s of a TCP stream from a guest to a socket on the host, counted on the host side."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = [0]
    finished = [0.0]

    def drain() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                received[0] += len(chunk)
        finished[0] = time.monotonic()

    thread = threading.Thread(target=drain)
    thread.start()
    started = time.monotonic()
    _exec(bench, sender, f"dd if=/dev/zero bs=64k count={megabytes * 16} 2>/dev/null | nc -w 10 {host_ip} {port}")
    thread.join(60)
    server.close()
    return received[0] / (1 << 20) / max(finished[0] - started, 1e-6)


def ping_ms(bench: BenchDaemon, vm: str, target: str) -> float:
    out = _exec(bench, vm, f"ping -c 20 -i 0.2 -q {target}")
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    if match is None:
        raise RuntimeError(f"no ping summary: {out}")
    return float(match[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--skip-isolation", action="store_true", help="leave out the boot cost of isolation")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with BenchDaemon(env={"CORRAL_DEFAULT_NETWORK": "1"}) as bench:
        bench.cli("vm", "run", "nb-a", "--nic", "network=default")
        bench.cli("vm", "run", "nb-b", "--nic", "network=default")
        bench.cli("vm", "run", "nb-u")  # user-mode NIC
        ips = {vm: next(n["ip"] for n in _show(bench, vm)["nics"]) for vm in ("nb-a", "nb-b")}
        for vm, ip in ips.items():
            _wait_address(bench, vm, ip)
        gateway = bench.client_call("network", "default")["gateway"]  # type: ignore[index]
        for _ in range(args.runs):
            results.setdefault("guest -> guest, NAT bridge (MB/s)", []).append(
                guest_to_guest(bench, "nb-a", "nb-b", ips["nb-b"], args.megabytes))
            results.setdefault("guest -> host, NAT bridge (MB/s)", []).append(
                guest_to_host(bench, "nb-a", gateway, args.megabytes))
            results.setdefault("guest -> host, user-mode (MB/s)", []).append(
                guest_to_host(bench, "nb-u", "10.0.2.2", args.megabytes))
            results.setdefault("RTT guest -> guest (ms)", []).append(ping_ms(bench, "nb-a", ips["nb-b"]))
            results.setdefault("RTT guest -> host (ms)", []).append(ping_ms(bench, "nb-a", gateway))
    rows = [[name, f"{median(values):.2f}", " ".join(f"{v:.2f}" for v in values)] for name, values in results.items()]
    print_table(f"Network, tiny guests under TCG, {args.megabytes} MiB streams, {args.runs} runs",
                ["measure", "median", "runs"], rows)
    if not args.skip_isolation:
        import isolation

        sys.argv = [sys.argv[0], "--runs", str(max(args.runs, 3))]
        isolation.main()


if __name__ == "__main__":
    main()
