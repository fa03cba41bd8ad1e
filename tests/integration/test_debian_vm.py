"""A real distribution through corral: the Debian image with cloud-init, SSH and the guest agent."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def debian(daemon):  # type: ignore[no-untyped-def]
    daemon.cli("image", "build", "debian", timeout=1800)
    return "debian"


@pytest.fixture(scope="module")
def key(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def web(daemon, debian, key, tmp_path_factory):  # type: ignore[no-untyped-def]
    user_data = tmp_path_factory.mktemp("ud") / "cloud.yaml"
    user_data.write_text("#cloud-config\nruncmd:\n  - echo made-by-user-data > /root/user-data-ran\n")
    name = unique("web")
    daemon.cli(
        "vm",
        "run",
        name,
        "--image",
        debian,
        "--memory",
        "1G",
        "--ssh-key",
        f"{key}.pub",
        "--user-data",
        str(user_data),
        timeout=600,
    )
    yield name
    daemon.cli("vm", "delete", name, "--force", check=False)


def _ssh(daemon, name: str, key, *command: str) -> str:  # type: ignore[no-untyped-def]
    return daemon.cli("vm", "ssh", name, "-i", str(key), "--", *command, timeout=300).stdout


def test_ssh_login_with_the_injected_key_shows_the_vm_name(daemon, web, key):
    assert _ssh(daemon, web, key, "hostname").strip() == web
    assert _ssh(daemon, web, key, "id", "-un").strip() == "corral"


def test_user_data_ran_and_the_agent_works(daemon, web):
    daemon.cli("vm", "exec", web, "--", "cloud-init", "status", "--wait", timeout=300)
    assert daemon.cli("vm", "exec", web, "--", "cat", "/root/user-data-ran").stdout == "made-by-user-data\n"
    shown = daemon.cli_json("vm", "show", web)
    assert any("10.0.2.15/24" in iface["addresses"] for iface in shown["interfaces"])


def test_stop_goes_through_the_agent_and_the_next_boot_is_healthy(daemon, web, key):
    host_key = daemon.cli("vm", "exec", web, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout
    stopped = daemon.cli_json("vm", "stop", web, "--timeout", "120")
    assert stopped["vm"]["state"] == "stopped" and stopped["job"]["result"]["forced"] is False
    assert stopped["vm"]["last_exit"]["shutdown_reason"] == "guest-shutdown"
    daemon.cli("vm", "start", web, "--wait", timeout=600)
    daemon.cli("vm", "exec", web, "--", "systemctl", "is-system-running", "--wait", check=False, timeout=300)
    failed = daemon.cli("vm", "exec", web, "--", "systemctl", "--failed", "--no-legend").stdout
    assert failed.strip() == ""
    assert daemon.cli("vm", "exec", web, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout == host_key
    assert _ssh(daemon, web, key, "hostname").strip() == web


def test_a_linked_clone_gets_its_own_hostname_and_host_keys(daemon, web, key):
    host_key = daemon.cli("vm", "exec", web, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout
    daemon.cli("vm", "stop", web, "--timeout", "120")
    clone = unique("clone")
    try:
        daemon.cli("vm", "clone", web, clone, "--linked", "--start", "--wait", timeout=600)
        assert _ssh(daemon, clone, key, "hostname").strip() == clone
        daemon.cli("vm", "exec", clone, "--", "cloud-init", "status", "--wait", timeout=300)
        clone_key = daemon.cli("vm", "exec", clone, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout
        assert clone_key and clone_key != host_key
    finally:
        daemon.cli("vm", "delete", clone, "--force", check=False)
        daemon.cli("vm", "start", web, "--wait", timeout=600)


def test_first_boot_bad_input_is_refused_before_anything_is_made(daemon, debian, tmp_path):
    before = [v["name"] for v in daemon.cli_json("vm", "list")]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("#cloud-config\nruncmd: [unclosed\n")
    private = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True)
    cases = [
        (["--ssh-key", str(tmp_path / "missing.pub")], "cannot read SSH key file"),
        (["--ssh-key", str(private)], "private key"),
        (["--user-data", str(bad_yaml)], "YAML"),
    ]
    for extra, words in cases:
        result = daemon.cli("vm", "create", unique("bad"), "--image", debian, *extra, check=False)
        assert result.returncode != 0 and words in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert [v["name"] for v in daemon.cli_json("vm", "list")] == before
