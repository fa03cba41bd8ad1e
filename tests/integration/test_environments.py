"""corral.yaml environments and the pytest plugin, on a real daemon with real guests.

One daemon (root: the example file's isolated network needs a bridge and dnsmasq) is shared by the module; each
test removes what it made, and the daemon's cleanup removes anything a failure left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, new_home, require

pytestmark = [pytest.mark.integration]
pytest_plugins = ["pytester"]
EXAMPLE_PROJECT = Path(__file__).resolve().parents[2] / "examples" / "pytest"

EXAMPLE = """\
networks:
  lan: {mode: isolated, subnet: 10.80.0.0/24}
vms:
  web: {image: tiny, memory: 256M, networks: [lan], provision: ["echo ready > /root/provisioned"]}
  db:  {image: tiny, memory: 256M, networks: [lan]}
"""


@pytest.fixture(scope="module")
def env_daemon(qemu_available):  # type: ignore[no-untyped-def]
    require(os.geteuid() == 0, "environment networks need root (bridges, TAPs, nftables)")
    require(shutil.which("dnsmasq") is not None, "dnsmasq is not installed (make setup installs dnsmasq-base)")
    home = new_home()
    corral = Daemon(home, {"CORRAL_ENV_STATE": str(home / "envstate")})
    try:
        corral.start()
        corral.cli("image", "build", "tiny", timeout=1800)
        yield corral
    finally:
        corral.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def corral_in(daemon: Daemon, project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI run from a project directory, as a developer runs `corral up` in a checkout."""
    result = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=daemon.env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"corral {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def steps(daemon: Daemon, project: Path, *args: str) -> list[dict[str, Any]]:
    """The steps a command did (or, for `diff`, which exits 1 when there is something to do, would do)."""
    result = corral_in(daemon, project, *args, "--json", check=args[0] != "diff")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)["steps"]


def guest(daemon: Daemon, vm: str, script: str) -> subprocess.CompletedProcess[str]:
    return daemon.cli("vm", "exec", vm, "--", "sh", "-c", script, check=False, timeout=120)


def test_up_status_diff_down_with_the_example_file(env_daemon: Daemon, tmp_path: Path) -> None:
    project = tmp_path / "shop"
    project.mkdir()
    (project / "corral.yaml").write_text(EXAMPLE)

    planned = corral_in(env_daemon, project, "diff", check=False)
    assert planned.returncode == 1, planned.stdout  # something to do
    made = steps(env_daemon, project, "up")
    assert [(s["action"], s["target"]) for s in made] == [
        ("create-network", "shop-lan"),
        ("create-vm", "shop-web"),
        ("provision", "shop-web"),
        ("create-vm", "shop-db"),
    ]
    assert all(step["done"] for step in made)
    assert guest(env_daemon, "shop-web", "cat /root/provisioned").stdout.strip() == "ready"
    # Both on the file's network, with its addresses, and reaching each other.
    status = {
        row["name"]: row for row in json.loads(corral_in(env_daemon, project, "status", "--json").stdout)["resources"]
    }
    assert status["shop-web"]["state"] == "running" and status["shop-web"]["provisioned"]
    db_ip = env_daemon.cli_json("vm", "show", "shop-db")["nics"][0]["ip"]  # type: ignore[index]
    assert db_ip.startswith("10.80.0.")
    assert guest(env_daemon, "shop-web", f"ping -c 1 -W 5 {db_ip}").returncode == 0

    # env fork --isolated: a copy of the running environment on duplicated networks: same addresses, no route to
    # the original. Bad input first: one line, non-zero, nothing made.
    for bad, why in ((("nosuch", "qa"), "is unknown"), (("shop", "shop"), "already exists")):
        refused = corral_in(env_daemon, project, "env", "fork", *bad, "--isolated", check=False)
        assert refused.returncode != 0 and why in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert sorted(vm["name"] for vm in env_daemon.cli_json("vm", "list")) == ["shop-db", "shop-web"]  # type: ignore[union-attr]
    web_ip = env_daemon.cli_json("vm", "show", "shop-web")["nics"][0]["ip"]  # type: ignore[index]
    forked = steps(env_daemon, project, "env", "fork", "shop", "qa", "--isolated")
    assert [(s["action"], s["target"]) for s in forked] == [
        ("create-network", "qa-lan"),
        ("fork-vm", "qa-db"),
        ("fork-vm", "qa-web"),
    ]
    assert guest(env_daemon, "qa-web", "hostname").stdout.strip() == "qa-web"
    assert f"inet {web_ip}/" in guest(env_daemon, "qa-web", "ip -4 addr show eth0").stdout, "the same address"
    assert guest(env_daemon, "qa-web", "cat /root/provisioned").stdout.strip() == "ready"
    assert guest(env_daemon, "qa-web", f"ping -c 1 -W 5 {db_ip}").returncode == 0  # its own copy of db answers
    env_daemon.cli("vm", "stop", "qa-db", "--force")
    assert guest(env_daemon, "qa-web", f"ping -c 1 -W 2 {db_ip}").returncode != 0, "the original db is out of reach"
    assert guest(env_daemon, "shop-web", f"ping -c 1 -W 5 {db_ip}").returncode == 0, "the original is untouched"
    assert guest(env_daemon, "shop-web", "hostname").stdout.strip() == "shop-web"
    listed = json.loads(corral_in(env_daemon, project, "env", "list", "--json").stdout)
    assert sorted(row["env"] for row in listed) == ["qa", "shop"]
    again = corral_in(env_daemon, project, "env", "fork", "shop", "qa", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    steps(env_daemon, project, "down", "--env", "qa", "--destroy")
    states = {vm["name"]: vm["state"] for vm in env_daemon.cli_json("vm", "list")}  # type: ignore[union-attr]
    assert states == {"shop-web": "running", "shop-db": "running"}
    assert not [n for n in env_daemon.cli_json("network", "list") if n["name"].startswith("qa-")]  # type: ignore[union-attr]
    assert guest(env_daemon, "shop-web", f"ping -c 1 -W 5 {db_ip}").returncode == 0

    # Idempotent: a second up changes nothing, and provisioning is not run again.
    guest(env_daemon, "shop-web", "echo touched > /root/provisioned")
    assert steps(env_daemon, project, "up") == []
    assert guest(env_daemon, "shop-web", "cat /root/provisioned").stdout.strip() == "touched"
    assert corral_in(env_daemon, project, "diff").returncode == 0

    # A changed file: new provisioning runs, a live change is made live, a new group appears.
    changed = EXAMPLE.replace("echo ready", "echo again").replace(
        "db:  {image: tiny, memory: 256M, networks: [lan]}",
        "db:  {image: tiny, memory: 256M, cpus: 2, networks: [lan]}\n  app: {image: tiny, memory: 128M, count: 1}",
    )
    (project / "corral.yaml").write_text(changed)
    actions = [(s["action"], s["target"]) for s in steps(env_daemon, project, "diff")]
    assert actions == [("provision", "shop-web"), ("resize", "shop-db"), ("create-vm", "shop-app-1")]
    steps(env_daemon, project, "up")
    assert guest(env_daemon, "shop-web", "cat /root/provisioned").stdout.strip() == "again"
    assert env_daemon.cli_json("vm", "show", "shop-db")["cpus"] == 2  # type: ignore[index]

    # Scale: a new member is a fork of the running one; removal takes the newest first.
    guest(env_daemon, "shop-app-1", "echo from-parent > /root/mark")
    grown = steps(env_daemon, project, "scale", "app", "3")
    assert [(s["action"], s["target"]) for s in grown] == [("fork-vm", "shop-app-2"), ("fork-vm", "shop-app-3")]
    assert guest(env_daemon, "shop-app-3", "cat /root/mark").stdout.strip() == "from-parent"
    assert steps(env_daemon, project, "up") == []  # the scaled count holds until the file's count changes
    shrunk = steps(env_daemon, project, "scale", "app", "1")
    assert [(s["action"], s["target"]) for s in shrunk] == [("delete-vm", "shop-app-3"), ("delete-vm", "shop-app-2")]

    # down keeps disks (VMs stopped); up starts them again; down --destroy leaves nothing.
    steps(env_daemon, project, "down")
    states = {vm["name"]: vm["state"] for vm in env_daemon.cli_json("vm", "list")}  # type: ignore[union-attr]
    assert states == {"shop-web": "stopped", "shop-db": "stopped", "shop-app-1": "stopped"}
    listed = json.loads(corral_in(env_daemon, project, "env", "list", "--json").stdout)
    assert [(row["env"], len(row["vms"])) for row in listed] == [("shop", 3)]
    # An entry dropped from the file is reported, not deleted behind the user's back; down --destroy removes it.
    (project / "corral.yaml").write_text(
        changed.replace("  db:  {image: tiny, memory: 256M, cpus: 2, networks: [lan]}\n", "")
    )
    assert ("orphan", "shop-db") in [(s["action"], s["target"]) for s in steps(env_daemon, project, "diff")]
    steps(env_daemon, project, "down", "--destroy")
    assert env_daemon.cli_json("vm", "list") == []
    assert not [n for n in env_daemon.cli_json("network", "list") if n["name"].startswith("shop-")]  # type: ignore[union-attr]
    assert json.loads(corral_in(env_daemon, project, "env", "list", "--json").stdout) == []


def test_env_names_keep_two_checkouts_apart_and_bad_files_change_nothing(env_daemon: Daemon, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for project in (one, two):
        project.mkdir()
        (project / "corral.yaml").write_text("vms:\n  box: {image: tiny, memory: 128M}\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corral.yaml").write_text("vms:\n  box: {image: nosuch, memory: 128M}\n  box: {image: tiny}\n")
    refused = corral_in(env_daemon, bad, "up", check=False)
    assert refused.returncode == 2 and "corral.yaml:3: duplicate name 'box'" in refused.stderr
    (bad / "corral.yaml").write_text(
        "networks:\n  lan: {}\nvms:\n  box: {image: nosuch, memory: 128M, networks: [lan]}\n"
    )
    unknown = corral_in(env_daemon, bad, "up", check=False)
    assert unknown.returncode != 0 and "image 'nosuch' does not exist" in unknown.stderr
    assert env_daemon.cli_json("network", "list") == []  # refused before the first step: nothing made
    assert env_daemon.cli_json("vm", "list") == []
    try:
        corral_in(env_daemon, one, "up")
        corral_in(env_daemon, two, "up")
        names = sorted(vm["name"] for vm in env_daemon.cli_json("vm", "list"))  # type: ignore[union-attr]
        assert names == ["one-box", "two-box"]
    finally:
        corral_in(env_daemon, one, "down", "--destroy", check=False)
        corral_in(env_daemon, two, "down", "--destroy", check=False)
        corral_in(env_daemon, bad, "down", "--destroy", check=False)
    assert env_daemon.cli_json("vm", "list") == []


PLUGIN_TESTS = """
import pytest

def _leak_check(vm):
    result = vm.exec(["sh", "-c", "test -e /root/leak && echo leaked; echo x > /root/leak; hostname"])
    assert result.exit_code == 0
    assert "leaked" not in result.stdout, "state leaked from another test's VM"
    return result

def test_one(corral_vm):
    result = _leak_check(corral_vm)
    assert result.stdout.split()[-1] == corral_vm.name  # its own identity, not the template's

def test_two(corral_vm):
    _leak_check(corral_vm)
    assert corral_vm.exec(["cat", "/nonexistent"]).exit_code != 0

def test_fails_and_is_torn_down(corral_vm):
    _leak_check(corral_vm)
    assert False, "this test fails on purpose"
"""


def test_pytest_plugin_gives_each_test_its_own_vm(
    env_daemon: Daemon, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One session: our leak and failure checks, and the example project (corral_vm, a marker, corral_env)."""
    for variable in ("CORRAL_URL", "CORRAL_TOKEN", "CORRAL_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    for key in ("CORRAL_HOME", "XDG_CONFIG_HOME", "CORRAL_ENV_STATE"):
        monkeypatch.setenv(key, env_daemon.env[key])
    pytester.makepyfile(test_in_vms=PLUGIN_TESTS)
    shutil.copytree(EXAMPLE_PROJECT, pytester.path, dirs_exist_ok=True)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--corral-memory", "128M", timeout=600)
    result.assert_outcomes(passed=8, failed=1)
    assert "this test fails on purpose" in result.stdout.str()
    # Every fork, the warm templates and the environment are gone, the failed test's VM included.
    assert env_daemon.cli_json("vm", "list") == []
    assert env_daemon.cli_json("network", "list") == []


XDIST_TESTS = """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_each_gets_its_own(corral_vm, n):
    result = corral_vm.exec(["sh", "-c", "test -e /root/leak && echo leaked; echo x > /root/leak; hostname"])
    assert result.exit_code == 0 and "leaked" not in result.stdout
    assert result.stdout.split()[-1] == corral_vm.name
    print("VM-NAME", corral_vm.name)
"""


def test_pytest_plugin_under_xdist_gives_each_worker_its_own_template_and_names(
    env_daemon: Daemon, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pytest -n 2`: each worker forks from a template of its own, names carry the worker id, nothing clashes and
    nothing is left when the session ends."""
    pytest.importorskip("xdist", reason="pytest-xdist is a dev dependency (make setup installs it)")
    for variable in ("CORRAL_URL", "CORRAL_TOKEN", "CORRAL_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    for key in ("CORRAL_HOME", "XDG_CONFIG_HOME", "CORRAL_ENV_STATE"):
        monkeypatch.setenv(key, env_daemon.env[key])
    pytester.makepyfile(test_xdist_vms=XDIST_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "-rP", "--corral-memory", "128M", "--corral-no-spare", timeout=600
    )
    result.assert_outcomes(passed=4)
    names = [line.split()[-1] for line in result.stdout.lines if line.startswith("VM-NAME ")]
    assert len(names) == 4 and len(set(names)) == 4, result.stdout.str()
    workers = {name.split("-")[1] for name in names}
    assert workers <= {"gw0", "gw1"} and workers, names  # the worker id in every name
    assert env_daemon.cli_json("vm", "list") == []
