"""Network throughput and latency of corral's networks: guest to guest on one NAT bridge, host to guest over
the bridge, and host to guest over user-mode networking (QEMU's slirp) for comparison (HTTP downloads timed by
the guest's clock; busybox has no iperf). Then the cost of
isolation on boot (benchmarks/isolation.py's measurement, run here too so one run gives the whole table).

With --pool: the same pair on one host against a pair across two hosts of a netns pool (corral.localpool, one
PostgreSQL), whose network spans them over VXLAN, and the pings a guest loses while its peer is live-migrated
to the other host (disks copied: the hosts do not share storage).

Run as root: python benchmarks/network.py [--runs 3] [--megabytes 32] [--pool]
"""

from __future__ import annotations

import argparse
import re
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


def _timed_fetch(bench: BenchDaemon, vm: str, url: str, megabytes: int) -> float:
    """MB/s of an HTTP download into the guest (busybox wget to /dev/null), timed by the guest's own clock."""
    # /proc/uptime has centisecond resolution: plenty for transfers of seconds (busybox date has no %N).
    out = _exec(
        bench,
        vm,
        f"read s _ </proc/uptime; wget -q -O /dev/null {url} && read e _ </proc/uptime && "
        "awk -v s=$s -v e=$e 'BEGIN {print e - s}'",
    )
    return megabytes / float(out.strip().splitlines()[-1])


def guest_to_guest(bench: BenchDaemon, server: str, client: str, server_ip: str, megabytes: int) -> float:
    """One guest serves a file from RAM with busybox httpd, the other downloads it across the bridge."""
    _exec(
        bench,
        server,
        f"mkdir -p /tmp/www && [ -s /tmp/www/blob ] || dd if=/dev/zero of=/tmp/www/blob bs=1M "
        f"count={megabytes} 2>/dev/null; pidof httpd >/dev/null || httpd -p 8000 -h /tmp/www",
    )
    return _timed_fetch(bench, client, f"http://{server_ip}:8000/blob", megabytes)


class BlobServer:
    """A host HTTP server answering every GET with ``megabytes`` of zeros."""

    def __init__(self, megabytes: int) -> None:
        import http.server

        blob = bytes(megabytes << 20)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ping_ms(bench: BenchDaemon, vm: str, target: str) -> float:
    out = _exec(bench, vm, f"ping -c 20 -i 0.2 -q {target}")
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    if match is None:
        raise RuntimeError(f"no ping summary: {out}")
    return float(match[1])


def cross_host(runs: int, megabytes: int) -> list[list[str]]:
    """Rows of the overlay: throughput and RTT on one host against across hosts, and pings lost in a move."""
    import json
    import tempfile
    import uuid

    from corral.localpool import LocalPool
    from corral.store.db import Store
    from corral.store.pgserver import PgServer

    images = Path(tempfile.mkdtemp(prefix="bn-img-", dir="/tmp"))
    pool = LocalPool("", prefix="bn", settings={"CORRAL_ACCEL": "tcg"})
    results: dict[str, list[float]] = {}
    with PgServer() as server:
        try:
            name = f"net_{uuid.uuid4().hex[:8]}"
            server.create_database(name)
            pool.url = f"postgresql+psycopg://corral@/{name}?host={server.root}&port={server.port}"
            store = Store(pool.url)
            store.migrate()
            store.close()
            pool.network()
            pool.start_control()
            pool.add_host("h1", images=images)
            pool.add_host("h2", images=images)
            pool.wait_online(["h1", "h2"])
            pool.cli("image", "build", "tiny", timeout=1800)
            pool.cli("network", "create", "bench", "--mode", "nat")
            for vm, host in (("pa", "h1"), ("pb", "h1"), ("pc", "h2")):
                pool.cli("vm", "run", vm, "--host", host, "--memory", "160M", "--nic", "network=bench", timeout=400)

            def sh(vm: str, script: str) -> str:
                return pool.cli("vm", "exec", vm, "--timeout", "300", "--", "sh", "-c", script).stdout

            ips = {
                vm: json.loads(pool.cli("vm", "show", vm, "--json").stdout)["nics"][0]["ip"]
                for vm in ("pa", "pb", "pc")
            }
            for vm, ip in ips.items():
                deadline = time.monotonic() + 60
                while "ok" not in sh(vm, f"ip -4 addr | grep -q 'inet {ip}/' && echo ok || true"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{vm} never got {ip}")
                    time.sleep(0.5)
            for vm in ("pb", "pc"):
                sh(
                    vm,
                    f"mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/blob bs=1M count={megabytes} 2>/dev/null"
                    " && httpd -p 8000 -h /tmp/www",
                )

            def fetch(server_vm: str) -> float:
                out = sh(
                    "pa",
                    f"read s _ </proc/uptime; wget -q -O /dev/null http://{ips[server_vm]}:8000/blob && "
                    "read e _ </proc/uptime && awk -v s=$s -v e=$e 'BEGIN {print e - s}'",
                )
                return megabytes / float(out.strip().splitlines()[-1])

            def rtt(target: str) -> float:
                out = sh("pa", f"ping -c 20 -i 0.2 -q {target}")
                match = re.search(r"= [\d.]+/([\d.]+)/", out)
                if match is None:
                    raise RuntimeError(f"no ping summary: {out}")
                return float(match[1])

            for _ in range(runs):
                results.setdefault("pool: guest -> guest, one host (MB/s)", []).append(fetch("pb"))
                results.setdefault("pool: guest -> guest, across hosts (MB/s)", []).append(fetch("pc"))
                results.setdefault("pool: RTT one host (ms)", []).append(rtt(ips["pb"]))
                results.setdefault("pool: RTT across hosts (ms)", []).append(rtt(ips["pc"]))
            for index in range(runs):
                sh(
                    "pa",
                    f"rm -f /tmp/ping.log; setsid sh -c 'ping -i 0.1 -c 1200 -W 1 {ips['pc']} > /tmp/ping.log'"
                    " </dev/null >/dev/null 2>&1 &",
                )
                pool.cli("vm", "migrate", "pc", "--to", "h1" if index % 2 == 0 else "h2", timeout=900)
                sh("pa", "kill -INT $(pidof ping) 2>/dev/null; sleep 1")
                summary = sh("pa", "cat /tmp/ping.log")
                match = re.search(r"(\d+) packets transmitted, (\d+) packets received", summary)
                if match is None:
                    raise RuntimeError(f"no ping summary: {summary[-300:]}")
                results.setdefault("pool: pings lost in a live move (0.1 s apart)", []).append(
                    float(int(match[1]) - int(match[2]))
                )
        finally:
            pool.close()
            import shutil

            shutil.rmtree(images, ignore_errors=True)
    return [[name, f"{median(values):.2f}", " ".join(f"{v:.2f}" for v in values)] for name, values in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--skip-isolation", action="store_true", help="leave out the boot cost of isolation")
    parser.add_argument("--pool", action="store_true", help="only the cross-host rows, on a netns pool of two hosts")
    args = parser.parse_args()
    if args.pool:
        rows = cross_host(args.runs, args.megabytes)
        same = {r[0]: float(r[1]) for r in rows}
        one, across = same["pool: guest -> guest, one host (MB/s)"], same["pool: guest -> guest, across hosts (MB/s)"]
        rows.append(["pool: throughput across / one host (ratio)", f"{across / one:.2f}", ""])
        print_table(
            f"Networks across hosts (VXLAN), tiny guests under TCG, {args.megabytes} MiB, {args.runs} runs",
            ["measure", "median", "runs"],
            rows,
        )
        return
    results: dict[str, list[float]] = {}
    with BenchDaemon(env={"CORRAL_DEFAULT_NETWORK": "1"}) as bench:
        bench.cli("vm", "run", "nb-a", "--nic", "network=default")
        bench.cli("vm", "run", "nb-b", "--nic", "network=default")
        bench.cli("vm", "run", "nb-u")  # user-mode NIC
        ips = {vm: next(n["ip"] for n in _show(bench, vm)["nics"]) for vm in ("nb-a", "nb-b")}
        for vm, ip in ips.items():
            _wait_address(bench, vm, ip)
        gateway = bench.client_call("network", "default")["gateway"]  # type: ignore[index]
        host = BlobServer(args.megabytes)
        for _ in range(args.runs):
            results.setdefault("guest -> guest, NAT bridge (MB/s)", []).append(
                guest_to_guest(bench, "nb-b", "nb-a", ips["nb-b"], args.megabytes)
            )
            results.setdefault("host -> guest, NAT bridge (MB/s)", []).append(
                _timed_fetch(bench, "nb-a", f"http://{gateway}:{host.port}/", args.megabytes)
            )
            results.setdefault("host -> guest, user-mode (MB/s)", []).append(
                _timed_fetch(bench, "nb-u", f"http://10.0.2.2:{host.port}/", args.megabytes)
            )
            results.setdefault("RTT guest -> guest (ms)", []).append(ping_ms(bench, "nb-a", ips["nb-b"]))
            results.setdefault("RTT guest -> host (ms)", []).append(ping_ms(bench, "nb-a", gateway))
        host.close()
    rows = [[name, f"{median(values):.2f}", " ".join(f"{v:.2f}" for v in values)] for name, values in results.items()]
    print_table(
        f"Network, tiny guests under TCG, {args.megabytes} MiB streams, {args.runs} runs",
        ["measure", "median", "runs"],
        rows,
    )
    if not args.skip_isolation:
        import isolation

        sys.argv = [sys.argv[0], "--runs", str(max(args.runs, 3))]
        isolation.main()


if __name__ == "__main__":
    main()
