"""Fixtures shared by the integration and end-to-end tests: a real daemon on its own CORRAL_HOME, the tiny
image, and the CLI run as a user would run it. Everything a test run starts is ended at teardown."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def require(condition: bool, reason: str) -> None:
    """Skip loudly when something the test needs is missing; in CI that is a failure, never a skip."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {reason}")
    pytest.skip(reason)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def alive(pid: int) -> bool:
    """True while the process runs; a zombie waiting for a (slow) PID 1 to reap it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def qemu_pids_under(home: Path) -> list[int]:
    """QEMU processes whose command line mentions ``home`` (what a test run may have left behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and str(home) in cmdline and alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


class Daemon:
    """A `corral serve` subprocess on a private CORRAL_HOME, with the CLI bound to it."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        # No default network unless a test asks for one: most tests need no bridge, and each would make its own.
        self.env = {
            **os.environ,
            "CORRAL_HOME": str(home),
            "CORRAL_ACCEL": "tcg",
            "CORRAL_DEFAULT_NETWORK": "0",
            **(extra_env or {}),
        }
        for variable in ("CORRAL_URL", "CORRAL_TOKEN", "CORRAL_PROJECT", "CORRAL_INSECURE"):
            self.env.pop(variable, None)
        self.env.setdefault("XDG_CONFIG_HOME", str(home / "config"))  # no remote of the user's own redirects the CLI
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "daemon-test.log"

    def start(self, timeout: float = 30) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral", "serve", "--log-level", "info"],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            if self.cli("host", "list", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("daemon did not answer")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def client(self):  # type: ignore[no-untyped-def]
        from corral.client import Client

        return Client(home=self.home, timeout=60)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"corral {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> object:
        """Run a command with --json (placed before any `--`, after which words belong to the guest)."""
        words = list(args)
        at = words.index("--") if "--" in words else len(words)
        return json.loads(self.cli(*words[:at], "--json", *words[at:]).stdout)

    def cleanup(self) -> None:
        """Stop every VM, the daemon, and anything QEMU left, even after a failed test."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                with self.client() as corral:
                    for vm in corral.vms():
                        with contextlib.suppress(Exception):
                            corral.wait_job(corral.delete_vm(vm["name"], force=True)["job"]["id"], timeout=30)
            except Exception:
                pass
            self.kill(signal.SIGTERM)
        for pid in qemu_pids_under(self.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        from corral.host.networks import remove_everything

        remove_everything(self.home)


def new_home(prefix: str = "corral-t-") -> Path:
    # Short paths under /tmp: unix socket paths must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def qemu_available() -> None:
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 is not installed (make setup)")
    require(shutil.which("qemu-img") is not None, "qemu-img is not installed (make setup)")


@pytest.fixture(scope="session")
def daemon(qemu_available):  # type: ignore[no-untyped-def]
    home = new_home()
    corral = Daemon(home)
    try:
        corral.start()
        yield corral
    finally:
        corral.cleanup()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny(daemon):  # type: ignore[no-untyped-def]
    """The tiny image, built once per run (the build itself is cached across runs)."""
    daemon.cli("image", "build", "tiny", timeout=1800)
    return "tiny"


@pytest.fixture
def fresh_daemon(qemu_available, request):  # type: ignore[no-untyped-def]
    """A daemon of a test's own, for tests that kill or misconfigure it. Shares the image cache."""
    daemons: list[Daemon] = []

    def make(**env: str) -> Daemon:
        corral = Daemon(new_home(), env)
        daemons.append(corral)
        return corral

    yield make
    for corral in daemons:
        corral.cleanup()
        shutil.rmtree(corral.home, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """A real, throw-away PostgreSQL server for the whole run (initdb in a temp dir, a free port), stopped and
    removed at the end even when tests fail. Tests take databases of their own from it (``create_database``)."""
    from corral.store.pgserver import PgServer, find_bin_dir

    require(find_bin_dir() is not None, "PostgreSQL is not installed (make setup installs it)")
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
