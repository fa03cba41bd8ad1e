"""API latency with and without authentication: `GET /vms` with 1,000 VMs in the store, and create/delete of
stopped VMs, on one real daemon.

- **baseline**: the unix socket, trusted as local root: no token, no role check, no TLS.
- **authenticated**: the HTTPS listener with a bearer token of a project admin: token lookup (SHA-256 and one
  indexed query), role and project resolution, TLS on a kept-alive connection.

Requests alternate between the two so both see the same store and the same machine load. The audit log is written
on both paths (every change is audited, local root's too), so the ratio is the cost of auth, RBAC and TLS.
Goal: authenticated / baseline <= 1.2 at p50.

    python benchmarks/api.py [--vms 1000] [--lists 60] [--creates 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seed(home: Path, count: int) -> None:
    """``count`` stopped VMs with a root volume each, written straight into the store as the API would leave them
    (no files: listing never touches them)."""
    from corral.store.db import Store
    from corral.store.models import VM, Volume

    store = Store(f"sqlite:///{home / 'corral.db'}")
    store.migrate()
    with store.session() as session:
        for index in range(count):
            name = f"seed-{index:04d}"
            vm = VM(
                name=name, spec={"name": name, "image": "tiny", "memory": 64 << 20}, host=None, status_message="stopped"
            )
            session.add(vm)
            session.flush()
            session.add(
                Volume(
                    name=f"{name}-root",
                    path=f"{name}-root.qcow2",
                    size=64 << 20,
                    state="ready",
                    role="root",
                    vm_id=vm.id,
                )
            )
    store.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def timed(call: Callable[[], httpx.Response], expect: int) -> float:
    started = time.perf_counter()
    response = call()
    elapsed = time.perf_counter() - started
    if response.status_code != expect:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return elapsed


def wait_idle(client: httpx.Client, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/jobs", params={"active": True}).json():
        if time.monotonic() > deadline:
            raise RuntimeError("jobs did not finish")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=1000, help="VMs in the store while listing")
    parser.add_argument("--lists", type=int, default=60, help="GET /vms requests per path")
    parser.add_argument("--creates", type=int, default=60, help="VMs created and deleted per path")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="corral-b-", dir="/tmp"))
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_HOME": str(home),
        "CORRAL_ACCEL": "tcg",
        "CORRAL_DEFAULT_NETWORK": "0",
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    for variable in ("CORRAL_URL", "CORRAL_TOKEN", "CORRAL_PROJECT"):
        env.pop(variable, None)

    def cli(*words: str) -> str:
        result = subprocess.run([sys.executable, "-m", "corral", *words], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"corral {' '.join(words)}: {result.stderr}")
        return result.stdout

    seed(home, args.vms)
    log = (home / "daemon.log").open("ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (home / "corral.sock").exists() or not (home / "tls" / "server.crt").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"the daemon did not start: {(home / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(1)
        cli("image", "build", "tiny")
        cli("user", "create", "bench")
        token = cli("token", "create", "--user", "bench", "--project", "default", "--role", "admin").strip()

        from corral.client.remotes import pinned_context

        local = httpx.Client(
            base_url="http://corral", transport=httpx.HTTPTransport(uds=str(home / "corral.sock")), timeout=120
        )
        remote = httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            timeout=120,
            verify=pinned_context((home / "tls" / "server.crt").read_text()),
            headers={"Authorization": f"Bearer {token}"},
        )
        paths = {"baseline (unix socket)": local, "authenticated (HTTPS + token)": remote}
        for client in paths.values():  # warm up: connections, TLS session, caches
            for _ in range(3):
                timed(lambda c=client: c.get("/vms"), 200)
        listed = len(local.get("/vms").json())

        lists: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.lists):
            for name, client in paths.items():
                lists[name].append(timed(lambda c=client: c.get("/vms"), 200))

        creates: dict[str, list[float]] = {name: [] for name in paths}
        deletes: dict[str, list[float]] = {name: [] for name in paths}
        for index in range(args.creates):
            for tag, (name, client) in zip("ab", paths.items(), strict=True):
                body = {"spec": {"name": f"bench-{tag}-{index}", "image": "tiny", "memory": "64M"}}
                creates[name].append(timed(lambda c=client, b=body: c.post("/vms", json=b), 202))
        wait_idle(local)
        for index in range(args.creates):
            for tag, (name, client) in zip("ab", paths.items(), strict=True):
                vm = f"bench-{tag}-{index}"
                deletes[name].append(timed(lambda c=client, v=vm: c.delete(f"/vms/{v}"), 202))
        wait_idle(local)

        rows = []
        for label, samples in (
            (f"GET /vms ({listed} VMs)", lists),
            ("POST /vms (stopped)", creates),
            ("DELETE /vms/NAME (stopped)", deletes),
        ):
            base, auth = (samples[name] for name in paths)
            rows.append([
                label,
                f"{percentile(base, 0.5) * 1000:.1f}", f"{percentile(base, 0.99) * 1000:.1f}",
                f"{percentile(auth, 0.5) * 1000:.1f}", f"{percentile(auth, 0.99) * 1000:.1f}",
                f"{percentile(auth, 0.5) / percentile(base, 0.5):.2f}x",
                len(base),
            ])  # fmt: skip
        print_table(
            "API latency, ms: unix socket (no auth) vs HTTPS with a token (goal: p50 ratio <= 1.2x)",
            ["REQUEST", "BASE P50", "BASE P99", "AUTH P50", "AUTH P99", "P50 RATIO", "N"],
            rows,
        )
        local.close()
        remote.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
