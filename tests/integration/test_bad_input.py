"""Bad input through the CLI: one clear line, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import pytest

from tests.conftest import qemu_pids_under, unique

pytestmark = pytest.mark.integration


def _state(daemon):  # type: ignore[no-untyped-def]
    pool = daemon.home / "pools" / "default"
    return (
        sorted(v["name"] for v in daemon.cli_json("vm", "list")),
        sorted(v["name"] for v in daemon.cli_json("volume", "list")),
        sorted(p.name for p in pool.iterdir()),
        sorted(qemu_pids_under(daemon.home)),
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["vm", "create", "Bad_Name"], "invalid VM name"),
        (["vm", "create", "-x-"], "No such option"),
        (["vm", "create", "ok", "--memory", "-1"], "invalid size"),
        (["vm", "create", "ok", "--memory", "12Q"], "invalid size"),
        (["vm", "create", "ok", "--memory", "999T"], "more than host"),
        (["vm", "create", "ok", "--cpus", "4096"], "invalid CPU count"),
        (["vm", "create", "ok", "--cpus", "200"], "vCPUs is more than host"),
        (["vm", "create", "ok", "--disk", "999T"], "larger than the storage pool"),
        (["vm", "create", "ok", "--disk", "12Q"], "invalid size"),
        (["vm", "create", "ok", "--image", "missing"], "image 'missing' not found"),
        (["vm", "create", "ok", "--restart", "sometimes"], "restart_policy"),
        (["vm", "start", "ghost"], "not found"),
        (["vm", "exec", "ghost", "--", "true"], "not found"),
        (["volume", "create", "v", "--size", "0"], "greater than zero"),
        (["volume", "resize", "ghost", "1G"], "not found"),
        (["image", "import", "x", "/nonexistent.img"], "does not exist"),
        (["image", "rm", "ghost"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(daemon, tiny, args, words):
    before = _state(daemon)
    result = daemon.cli(*args, check=False)
    assert result.returncode != 0
    assert words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 8  # Typer usage errors come boxed; ours are one line
    assert _state(daemon) == before


def test_duplicate_name_is_refused(daemon, tiny):
    name = unique("dup")
    daemon.cli("vm", "create", name)
    try:
        before = _state(daemon)
        result = daemon.cli("vm", "create", name, check=False)
        assert result.returncode != 0 and "already exists" in result.stderr
        assert result.stderr.count("\n") == 1
        assert _state(daemon) == before
    finally:
        daemon.cli("vm", "delete", name)


def test_a_file_that_is_not_a_disk_image_cannot_be_imported(daemon, tiny, tmp_path):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + b"\x00" * 60 + b"garbage" * 100)
    text = tmp_path / "notes.img"
    text.write_text("not a disk\n")
    before = _state(daemon)
    for path in (junk, text):
        name = unique("junk")
        result = daemon.cli("image", "import", name, str(path), check=False)
        assert result.returncode != 0
        assert "corrupt qcow2" in result.stderr or "not a disk image" in result.stderr, result.stderr
        assert name not in {i["name"] for i in daemon.cli_json("image", "list")}
    assert _state(daemon) == before


def test_an_image_corrupted_after_import_fails_vm_creation_cleanly(daemon, tiny, tmp_path):
    import subprocess

    good = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(good), "64M"], check=True)
    image = unique("img")
    daemon.cli("image", "import", image, str(good))
    stored = next(daemon.home.joinpath("images").glob("*/disk.qcow2"))
    with stored.open("r+b") as handle:  # wreck the qcow2 header's L1 table offset
        handle.seek(40)
        handle.write(b"\xff" * 8)
    before = _state(daemon)
    result = daemon.cli("vm", "create", unique("vm"), "--image", image, check=False)
    assert (result.returncode != 0 and image[:3] in result.stderr) or "corrupt" in result.stderr
    assert _state(daemon) == before


def test_missing_qemu_binary_is_reported_and_nothing_is_made(fresh_daemon, tiny):
    corral = fresh_daemon(CORRAL_QEMU="/nonexistent/qemu-system-x86_64")
    corral.start()
    corral.cli("image", "build", "tiny")
    hosts = corral.cli_json("host", "list")
    assert hosts[0]["qemu_version"] is None
    result = corral.cli("vm", "run", unique("noqemu"), check=False)
    assert result.returncode != 0 and "QEMU is not installed" in result.stderr
    assert corral.cli_json("vm", "list") == []


def test_a_second_daemon_on_the_same_home_is_refused(daemon):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "corral", "serve"], env=daemon.env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "already running" in result.stderr and result.stderr.count("\n") == 1


def test_commands_without_a_daemon_say_how_to_start_it(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CORRAL_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "corral", "vm", "list"], env=env, capture_output=True, text=True)
    assert result.returncode == 3
    assert "daemon is not running" in result.stderr and "corral serve" in result.stderr
