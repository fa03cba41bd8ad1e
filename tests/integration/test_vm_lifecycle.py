"""The whole life of one VM through the CLI, on real QEMU under TCG. One VM is shared by the module: each
test picks up where the previous one left it, as a user's session would."""

from __future__ import annotations

import time

import pytest

from tests.conftest import alive, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vm(daemon, tiny):  # type: ignore[no-untyped-def]
    name = unique("life")
    yield name
    daemon.cli("vm", "delete", name, "--force", check=False)


def _show(daemon, name):  # type: ignore[no-untyped-def]
    return daemon.cli_json("vm", "show", name)


def test_run_returns_once_the_guest_agent_answers(daemon, vm):
    shown = daemon.cli_json("vm", "run", vm, "--image", "tiny", "--cpus", "1", "--memory", "256M", "--disk", "64M")
    assert shown["state"] == "running"
    assert shown["ready"] is True
    # The addresses come with readiness: what `run` prints already says how to reach the guest.
    assert any("10.0.2.15/24" in iface["addresses"] for iface in shown["interfaces"])
    # Ready means the agent answers: exec works at once, without retries.
    result = daemon.cli("vm", "exec", vm, "--", "hostname")
    assert result.stdout.strip() == vm


def test_show_and_list_describe_the_vm(daemon, vm):
    shown = _show(daemon, vm)
    assert shown["cpus"] == 1 and shown["memory"] == 256 << 20
    assert [d["role"] for d in shown["disks"]] == ["root", "data"]
    assert shown["pid"] and alive(shown["pid"])
    assert any("10.0.2.15/24" in iface["addresses"] for iface in shown["interfaces"])
    listed = {v["name"]: v for v in daemon.cli_json("vm", "list")}
    assert listed[vm]["state"] == "running"
    table = daemon.cli("vm", "list").stdout
    assert vm in table and "running" in table


def test_exec_returns_output_and_exit_code(daemon, vm):
    result = daemon.cli("vm", "exec", vm, "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    as_json = daemon.cli_json("vm", "exec", vm, "--", "cat", "/proc/cpuinfo")
    assert as_json["exit_code"] == 0 and "processor" in as_json["stdout"]


def test_extra_disk_is_visible_to_the_guest(daemon, vm):
    size = daemon.cli("vm", "exec", vm, "--", "cat", "/sys/block/vdb/size").stdout
    assert int(size) * 512 == 64 << 20


def test_serial_log_holds_the_boot(daemon, vm):
    logs = daemon.cli("vm", "logs", vm, "--lines", "1000").stdout
    assert "corral-guest-ready" in logs
    assert "Linux version" in logs or "Run /init" in logs or "corral" in logs


def test_console_is_interactive(daemon, vm):
    # Piped input: the console sends it to the guest's shell on ttyS0 and prints what comes back.
    proc = daemon.cli("vm", "console", vm, input="\necho CONSOLE-$((40+2))\n", check=False, timeout=30)
    # With piped input the console keeps reading until the socket closes; the CLI was ended by timeout or EOF.
    assert "CONSOLE-42" in proc.stdout, proc.stdout + proc.stderr


def test_pause_and_resume(daemon, vm):
    assert daemon.cli_json("vm", "pause", vm)["vm"]["state"] == "paused"
    blocked = daemon.cli("vm", "exec", vm, "--", "true", check=False)
    assert blocked.returncode != 0 and "paused" in blocked.stderr
    assert daemon.cli_json("vm", "resume", vm)["vm"]["state"] == "running"
    assert daemon.cli("vm", "exec", vm, "--", "true").returncode == 0


def test_a_file_written_in_the_guest_survives_a_restart(daemon, vm):
    daemon.cli("vm", "exec", vm, "--", "sh", "-c", "echo persisted > /root/marker && sync")
    old_pid = _show(daemon, vm)["pid"]
    restarted = daemon.cli_json("vm", "restart", vm, "--wait")
    assert restarted["vm"]["ready"] is True
    assert restarted["vm"]["pid"] != old_pid
    assert daemon.cli("vm", "exec", vm, "--", "cat", "/root/marker").stdout == "persisted\n"


def test_stop_is_a_clean_acpi_power_down(daemon, vm):
    pid = _show(daemon, vm)["pid"]
    stopped = daemon.cli_json("vm", "stop", vm)
    assert stopped["vm"]["state"] == "stopped"
    assert stopped["job"]["result"] == {"forced": False, "was_running": True}
    assert stopped["vm"]["last_exit"]["returncode"] == 0
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    # Stopping a stopped VM is not an error.
    assert daemon.cli_json("vm", "stop", vm)["job"]["result"]["was_running"] is False


def test_start_again_and_force_stop(daemon, vm):
    started = daemon.cli_json("vm", "start", vm, "--wait")
    assert started["vm"]["ready"] is True
    assert daemon.cli("vm", "exec", vm, "--", "cat", "/root/marker").stdout == "persisted\n"
    forced = daemon.cli_json("vm", "stop", vm, "--force")
    assert forced["vm"]["state"] == "stopped" and forced["job"]["result"]["forced"] is True


def test_metrics_report_the_running_vm(daemon, vm):
    from prometheus_client.parser import text_string_to_metric_families

    daemon.cli("vm", "start", vm, "--wait")
    deadline = time.monotonic() + 20
    with daemon.client() as corral:
        while True:
            families = {f.name: f for f in text_string_to_metric_families(corral.metrics())}
            used = [s for s in families["corral_vm_memory_used_bytes"].samples if s.labels["vm"] == vm]
            if used or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert used and used[0].value > 16 << 20, "the agent samples the QEMU's memory"
    running = [s for s in families["corral_vm_running"].samples if s.labels["vm"] == vm]
    assert running[0].value == 1
    reads = [s for s in families["corral_vm_disk_read_bytes"].samples if s.labels["vm"] == vm]
    assert reads and max(s.value for s in reads) > 0, "the guest read its root disk while booting"
    daemon.cli("vm", "stop", vm, "--force")


def test_delete_removes_the_vm_and_its_disks(daemon, vm):
    pool = daemon.home / "pools" / "default"
    disks = [d["path"] for d in _show(daemon, vm)["disks"]]
    assert all((pool / path).exists() for path in disks)
    daemon.cli("vm", "delete", vm)
    assert vm not in {v["name"] for v in daemon.cli_json("vm", "list")}
    assert not any((pool / path).exists() for path in disks)
    missing = daemon.cli("vm", "show", vm, check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr
