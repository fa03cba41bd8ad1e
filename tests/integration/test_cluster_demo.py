"""`make cluster-demo` and `make cluster-down` as a person trying a pool runs them: the demo comes up under
CORRAL_HOME, the printed export lines alone point the CLI at it, a VM runs and moves between two of its hosts,
and `make cluster-down` leaves no process, namespace, link or file behind (and is safe to run again)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.localpool import alive, demo_tag, namespace_pids, pids_mentioning
from tests.conftest import ROOT, new_home, require


def _make(target: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_HOME": str(home), "CORRAL_ACCEL": "tcg"}
    return subprocess.run(["make", "-s", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _user_env(exports: str, config: Path) -> dict[str, str]:
    """A shell's environment after `eval` of the printed lines (and nothing else of corral's)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CORRAL_")}
    env["XDG_CONFIG_HOME"] = str(config)  # no remote the machine's user may have switched to
    for line in exports.splitlines():
        assert line.startswith("export CORRAL_"), f"only export lines on stdout: {line!r}"
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout


@pytest.fixture
def demo_home(postgres, qemu_available):  # type: ignore[no-untyped-def]
    require(shutil.which("ip") is not None and shutil.which("make") is not None, "iproute2 and make are needed")
    require(os.geteuid() == 0, "network namespaces need root")
    home = new_home("cdemo-")
    home.chmod(0o755)  # PostgreSQL runs as the postgres user and must reach its data directory under the home
    try:
        yield home
    finally:
        _make("cluster-down", home, timeout=180)
        shutil.rmtree(home, ignore_errors=True)


def test_demo_pool_comes_up_moves_a_vm_and_goes_away_completely(demo_home: Path) -> None:
    up = _make("cluster-demo", demo_home)
    assert up.returncode == 0, up.stderr
    root = demo_home / "cluster-demo"
    env = _user_env(up.stdout.strip(), demo_home / "config")

    def corral(*argv: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *argv], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"corral {' '.join(argv)}: {result.stderr}"
        return result.stdout

    hosts = {h["name"]: h for h in json.loads(corral("host", "list", "--json"))}
    assert sorted(hosts) == ["h1", "h2", "h3"] and all(h["state"] == "online" for h in hosts.values())
    assert len({h["address"] for h in hosts.values()}) == 3, "each host has an address of its own"
    assert [i["state"] for i in json.loads(corral("image", "list", "--json")) if i["name"] == "tiny"] == ["ready"]

    corral("vm", "create", "d1", "--host", "h1", "--memory", "192M")
    corral("vm", "start", "d1", "--wait", timeout=400)
    corral("vm", "exec", "d1", "--", "/bin/sh", "-c", "echo moved-with-me > /root/marker && sync")
    moved = json.loads(corral("vm", "migrate", "d1", "--to", "h3", "--json", timeout=600))
    assert moved["job"]["state"] == "succeeded" and moved["job"]["result"]["to"] == "h3", moved
    shown = json.loads(corral("vm", "show", "d1", "--json"))
    assert shown["host"] == "h3" and shown["state"] == "running", shown
    assert corral("vm", "exec", "d1", "--", "cat", "/root/marker") == "moved-with-me\n"

    # What the demo made on the machine, to check that cluster-down takes all of it.
    tag = demo_tag(root)
    namespaces = [
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.startswith(f"cd{tag}")
    ]
    assert len(namespaces) == 3, namespaces
    assert sum(f"cd{tag}" in line or f"cdb{tag}" in line for line in _links().splitlines()) >= 4  # bridge, veths
    assert pids_mentioning(root), "the demo's processes run"
    agents = [pid for netns in namespaces for pid in namespace_pids(netns)]
    assert agents, "agents and QEMU run inside the namespaces"

    # As the README says, in the same shell: CORRAL_HOME now names the control plane's home inside the demo.
    assert env["CORRAL_HOME"] != str(demo_home)
    down = subprocess.run(
        ["make", "-s", "cluster-down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert down.returncode == 0 and "is gone" in down.stderr, down.stderr
    assert not pids_mentioning(root), [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids_mentioning(root)]
    assert not any(alive(pid) for pid in agents), "every process in the namespaces ended"
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"cd{tag}" not in left, left
    assert f"cd{tag}" not in _links() and f"cdb{tag}" not in _links()
    assert not root.exists(), list(root.rglob("*"))[:10]
    again = _make("cluster-down", demo_home, timeout=60)
    assert again.returncode == 0 and "no demo pool" in again.stderr, again.stderr
