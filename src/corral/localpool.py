"""A pool of hosts on one machine: for the tests, and for `make cluster-demo` to let people try a pool.

Each host is a network namespace with its own address (a veth pair whose outer end is on one bridge), running
`corral agent` on its own CORRAL_HOME; a control plane (`corral serve --no-agent`) runs outside the namespaces on a
home of its own; all of them share one PostgreSQL store, reached over its unix socket (which works from inside the
namespaces too). Migration streams go between the namespaces' addresses, as they would between real hosts.

Two hosts on one machine must run without per-VM cgroups (``CORRAL_ISOLATION=0``, their cgroup names would
collide) and without the default NAT network (it would be made in every namespace).

    python -m corral.localpool up     # `make cluster-demo`: PostgreSQL, a control plane, h1..h3; prints exports
    python -m corral.localpool down   # `make cluster-down`: every part of it goes; safe to run twice

The demo lives under ``$CORRAL_HOME/cluster-demo``; its namespace, bridge and veth names derive from that path,
so ``down`` finds everything even without the state file, and two demos under different homes do not collide.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_HOSTS = ("h1", "h2", "h3")
# Variables that would point a child's CLI at another daemon than the pool's own.
FOREIGN_ENV = ("CORRAL_URL", "CORRAL_TOKEN", "CORRAL_PROJECT", "CORRAL_INSECURE")


class PoolError(Exception):
    """A step of bringing a pool up failed; the message says which and how to fix it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def ip(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip ...`, inside ``netns`` if given."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run([*prefix, "ip", *argv], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise PoolError(f"ip {' '.join(argv)} failed: {result.stderr.strip()}", "is this machine's iproute2 usable?")
    return result


def free_subnet(tag: str) -> str:
    """A /24 (its first three octets) in 10.200-249.x that overlaps no address or route of this machine: derived
    from ``tag`` so the same pool gets the same one, stepping on past subnets in use."""
    import ipaddress
    import re

    listed = ip("-4", "route", "show", "table", "all", check=False).stdout + ip("-4", "-o", "addr", check=False).stdout
    used = []
    for word in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", listed):
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(word, strict=False))
    start = int(tag[:4], 16)
    for step in range(50 * 256):
        index = (start + step) % (50 * 256)
        subnet = f"10.{200 + index // 256}.{index % 256}"
        candidate = ipaddress.ip_network(f"{subnet}.0/24")
        if not any(candidate.overlaps(network) for network in used if network.prefixlen > 0):
            return subnet
    raise PoolError("no free /24 in 10.200.0.0/13 for the pool's bridge", "remove unused routes")


def alive(pid: int) -> bool:
    """True while the process runs; a zombie waiting for a slow PID 1 to reap it counts as gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[1].split()[0] != "Z"


def pids_mentioning(path: Path, exclude: set[int] | None = None) -> list[int]:
    """Live processes whose command line names ``path`` (QEMU, dnsmasq, PostgreSQL, corral under a home)."""
    needle = str(path)
    skip = {os.getpid(), os.getppid(), *(exclude or set())}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def terminate(pids: list[int], grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL whatever still runs after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Proc:
    """A corral subprocess (inside a network namespace if given) on its own CORRAL_HOME, logging to
    ``HOME/<command>.log``. It runs in a session of its own, so it outlives whoever started it."""

    def __init__(self, home: Path, env: dict[str, str], argv: list[str], netns: str | None = None) -> None:
        self.home, self.env, self.argv, self.netns = home, env, argv, netns
        self.log = home / f"{argv[0]}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with self.log.open("ab") as log:
            # `ip netns exec` execs the command: the pid is corral's own.
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "corral", *self.argv],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None


def _temp_home(prefix: str) -> Callable[[str], Path]:
    # Short paths under /tmp: unix socket paths (QMP, the API) must stay under 108 bytes.
    return lambda name: Path(tempfile.mkdtemp(prefix=f"{prefix}-{name}-", dir="/tmp"))


class LocalPool:
    """A control plane and agents in network namespaces on one PostgreSQL ``url``.

    ``tag`` names everything this pool makes on the machine (namespaces ``{prefix}{tag}{host}``, the bridge
    ``{prefix}b{tag}``, veth pairs ``{prefix}v{tag}{host}``/``{prefix}p{tag}{host}``); interface names must stay
    within 15 characters, so keep ``prefix`` at 2 and ``tag`` at 5 characters. ``make_home(name)`` gives each
    process's CORRAL_HOME. ``settings`` are extra CORRAL_* variables for every process.
    """

    def __init__(
        self,
        url: str,
        tag: str | None = None,
        prefix: str = "cm",
        make_home: Callable[[str], Path] | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.tag = tag or uuid.uuid4().hex[:5]
        self.prefix = prefix
        self.bridge = f"{prefix}b{self.tag}"
        self.subnet = ""
        self.namespaces: list[str] = []
        self.homes: dict[str, Path] = {}
        self.agents: dict[str, Proc] = {}
        self.control: Proc | None = None
        self.make_home = make_home or _temp_home(prefix)
        self.settings = {
            "CORRAL_HOST_TIMEOUT": "5",
            "CORRAL_DEFAULT_NETWORK": "0",
            "CORRAL_ISOLATION": "0",
            **(settings or {}),
        }

    # -- plumbing ------------------------------------------------------------------------------------------------

    def network(self) -> None:
        """The bridge every host's veth plugs into; its .1 address lets this machine reach the hosts."""
        self.subnet = free_subnet(self.tag)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def address(self, name: str) -> str:
        """Host ``hN`` is at .1N (h1 at .11): names other than hN get .10 plus their order of creation."""
        number = int(name[1:]) if name[1:].isdigit() else len(self.namespaces)
        return f"{self.subnet}.{10 + number}"

    def netns(self, name: str) -> str:
        return f"{self.prefix}{self.tag}{name}"

    def add_host(self, name: str, pools_of: str | None = None, images: Path | None = None) -> Proc:
        """A namespace with its address, a home (its pool shared with host ``pools_of`` if given, its images
        directory a link to ``images`` if given) and its agent."""
        netns = self.netns(name)
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
        self.namespaces.append(netns)
        near, far = f"{self.prefix}v{self.tag}{name}", f"{self.prefix}p{self.tag}{name}"
        ip("link", "add", near, "type", "veth", "peer", "name", far)
        ip("link", "set", far, "netns", netns)
        ip("link", "set", near, "master", self.bridge)
        ip("link", "set", near, "up")
        ip("addr", "add", f"{self.address(name)}/24", "dev", far, netns=netns)
        ip("link", "set", far, "up", netns=netns)
        ip("link", "set", "lo", "up", netns=netns)
        home = self.make_home(name)
        self.homes[name] = home
        if pools_of is not None:
            (home / "pools").symlink_to(self.homes[pools_of] / "pools")
        else:
            (home / "pools" / "default").mkdir(parents=True)
        if images is not None:
            (home / "images").symlink_to(images)
        self.link_host(name)
        self.agents[name] = Proc(
            home,
            self.env(home),
            ["agent", "--name", name, "--address", self.address(name), "--log-level", "info"],
            netns,
        )
        return self.agents[name]

    def env(self, home: Path) -> dict[str, str]:
        """The environment of a process (or a CLI call) of this pool on ``home``."""
        env = {
            **os.environ,
            "CORRAL_HOME": str(home),
            "CORRAL_DB": self.url,
            **self.settings,
            "XDG_CONFIG_HOME": str(home / "config"),
        }  # no remote of the user's own redirects the CLI
        for variable in FOREIGN_ENV:
            env.pop(variable, None)
        return env

    def start_control(self, listen: str | None = None) -> Proc:
        """The control plane, on its unix socket and, with ``listen`` (HOST:PORT), on HTTPS too (the web console;
        a self-signed certificate made in its home)."""
        home = self.make_home("control")
        self.homes["control"] = home
        argv = ["serve", "--no-agent", "--log-level", "info", *(["--listen", listen] if listen else [])]
        self.control = Proc(home, self.env(home), argv)
        return self.control

    def link_host(self, name: str) -> None:
        """Let the control plane reach host ``name``'s VM consoles and serial logs: its home, as this machine sees
        it, at ``CONTROL_HOME/hosts/NAME`` (corral.api.routes_console; on real machines, a shared mount)."""
        if "control" in self.homes and name in self.homes:
            hosts = self.homes["control"] / "hosts"
            hosts.mkdir(exist_ok=True)
            (hosts / name).symlink_to(self.homes[name])

    # -- using it ------------------------------------------------------------------------------------------------

    def client(self, timeout: float = 120):  # type: ignore[no-untyped-def]
        from corral.client import Client

        return Client(home=self.homes["control"], timeout=timeout)

    def cli(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The CLI as a user of this pool runs it (on the control plane's socket)."""
        result = subprocess.run(
            [sys.executable, "-m", "corral", *argv],
            env=self.env(self.homes["control"]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"corral {' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
        return result

    def wait_online(self, names: list[str], timeout: float = 90.0) -> None:
        """Until the control plane answers and lists every host in ``names`` online; a process that exits
        meanwhile ends the wait with the tail of its log."""
        from corral.errors import CorralError

        deadline = time.monotonic() + timeout
        while True:
            for proc in [*([self.control] if self.control else []), *self.agents.values()]:
                if proc.exited() is not None:
                    tail = proc.log.read_text(errors="replace").strip().splitlines()[-1:] if proc.log.exists() else []
                    raise PoolError(f"corral {proc.argv[0]} on {proc.home} exited: {' '.join(tail)}", f"see {proc.log}")
            with contextlib.suppress(CorralError), self.client(10) as corral:
                hosts = {h["name"]: h["state"] for h in corral.hosts()}
                if all(hosts.get(name) == "online" for name in names):
                    return
            if time.monotonic() > deadline:
                raise PoolError(
                    f"hosts {', '.join(names)} were not all online after {timeout:.0f} s",
                    "see the agents' logs under their homes",
                )
            time.sleep(0.2)

    def close(self) -> None:
        """Delete the VMs, stop every process, kill what QEMU left, remove the namespaces, the bridge and the
        homes. Each step runs even when an earlier one failed."""
        with contextlib.suppress(Exception), self.client(30) as corral:
            for vm in corral.vms():
                with contextlib.suppress(Exception):
                    corral.wait_job(corral.delete_vm(vm["name"], force=True)["job"]["id"], timeout=30)
        for proc in [*self.agents.values(), *([self.control] if self.control else [])]:
            with contextlib.suppress(Exception):
                proc.stop()
        for netns in self.namespaces:
            terminate(namespace_pids(netns), grace=5)
        for home in self.homes.values():
            terminate(pids_mentioning(home), grace=5)
        for netns in self.namespaces:
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        ip("link", "del", self.bridge, check=False)
        for home in self.homes.values():
            shutil.rmtree(home, ignore_errors=True)


def namespace_pids(netns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


# -- the demo pool ---------------------------------------------------------------------------------------------


def demo_root(home: Path | None = None) -> Path:
    """The demo's directory: ``cluster-demo`` under the home, or the demo itself when the home is one of its
    hosts' (after `eval "$(make -s cluster-demo)"`, CORRAL_HOME is the control plane's home inside it)."""
    from corral.paths import default_home

    base = Path(home or os.environ.get("CORRAL_HOME") or default_home()).absolute()
    for candidate in (base, base.parent):
        if candidate.name == "cluster-demo" and (candidate / "state.json").exists():
            return candidate
    return base / "cluster-demo"


def demo_tag(root: Path) -> str:
    """Names on the machine (namespaces, links) derive from the demo's directory: the same ones for up and down."""
    return hashlib.sha1(str(root).encode()).hexdigest()[:5]


def _reachable_by(user: str, path: Path) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` (other than its owner) cannot enter, or None."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            return None
        info = directory.stat()
        if info.st_uid != uid and not info.st_mode & stat.S_IXOTH:
            return directory
    return None


def exports(root: Path) -> list[str]:
    """The lines that point the CLI at the demo's control plane: its unix socket under its home (as root, that is
    the cluster admin, no token), and no URL that would send the CLI elsewhere."""
    return [f"export CORRAL_HOME={root / 'control'}", "export CORRAL_URL="]


def demo_up(root: Path, say: Callable[[str], None]) -> list[str]:
    """Start the demo pool under ``root`` and return the export lines. Already up: the same lines again. Any
    failure tears down what was made and raises PoolError."""
    from corral.store.pgserver import PgServer, find_bin_dir

    if os.geteuid() != 0:
        raise PoolError("the demo pool needs root (its hosts are network namespaces)", "run it as root")
    if shutil.which("ip") is None or find_bin_dir() is None:
        raise PoolError("iproute2 or PostgreSQL is missing", "run `make setup` first")
    state_file = root / "state.json"
    if state_file.exists():
        pool = LocalPool("", tag=demo_tag(root), prefix="cd")
        pool.homes["control"] = root / "control"
        try:
            with pool.client(10) as corral:
                hosts = {h["name"]: h["state"] for h in corral.hosts()}
        except Exception:
            hosts = {}
        if all(hosts.get(name) == "online" for name in DEMO_HOSTS):
            say(f"the demo pool already runs under {root}")
            return exports(root)
        raise PoolError(f"a demo pool under {root} is there but not healthy", "run `make cluster-down` first")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    blocked = _reachable_by("postgres", root)
    if blocked is not None:
        raise PoolError(
            f"PostgreSQL runs as the postgres user, which cannot enter {blocked}",
            f"chmod o+x {blocked}, or set CORRAL_HOME to a directory it can reach",
        )
    tag = demo_tag(root)
    state: dict[str, Any] = {"tag": tag, "prefix": "cd", "pg": None}
    state_file.write_text(json.dumps(state))
    try:
        say("starting PostgreSQL")
        (root / "pg").mkdir(exist_ok=True)
        pg = PgServer(base_dir=root / "pg")
        state["pg"] = {"root": str(pg.root), "port": pg.port}
        state_file.write_text(json.dumps(state))
        pg.start()
        pg.create_database("corral")
        # Over the unix socket: it reaches the agents inside their namespaces too.
        url = f"postgresql+psycopg://corral@/corral?host={pg.root}&port={pg.port}"

        def make_home(name: str) -> Path:
            home = root / name
            home.mkdir(mode=0o755)
            return home

        settings = {"CORRAL_HOST_TIMEOUT": "15"}
        if os.environ.get("CORRAL_ACCEL"):
            settings["CORRAL_ACCEL"] = os.environ["CORRAL_ACCEL"]
        pool = LocalPool(url, tag=tag, prefix="cd", make_home=make_home, settings=settings)
        from corral.store.db import Store

        store = Store(url)
        try:
            store.migrate()  # once, before four processes would take turns at it
        finally:
            store.close()
        pool.network()
        state.update(subnet=pool.subnet, url=url)
        state_file.write_text(json.dumps(state))
        say("starting the control plane and agents h1, h2, h3")
        pool.start_control()
        images = root / "images"
        images.mkdir()
        pool.add_host("h1", images=images)
        pool.add_host("h2", pools_of="h1", images=images)
        pool.add_host("h3", images=images)
        pool.wait_online(list(DEMO_HOSTS))
        say("building the tiny image (cached after the first build)")
        with pool.client(3600) as corral:
            accepted = corral.build_image("tiny")
            if accepted.get("job"):
                corral.wait_job(accepted["job"]["id"], timeout=3600)
    except BaseException:
        demo_down(root, say=lambda _: None)
        raise
    say(
        f"the demo pool is up under {root}: hosts h1, h2 (sharing a storage pool) and h3 at "
        f"{pool.address('h1')}, {pool.address('h2')}, {pool.address('h3')}"
    )
    return exports(root)


def demo_down(root: Path, say: Callable[[str], None]) -> None:
    """Remove every part of the demo pool under ``root``: processes (agents, control plane, QEMU, anything else
    started under it), namespaces, links, PostgreSQL and the files. Nothing there: nothing to do."""
    from corral.store.pgserver import stop_data_dir

    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((root / "state.json").read_text())
    tag, prefix = state.get("tag") or demo_tag(root), state.get("prefix") or "cd"
    namespaces = [f"{prefix}{tag}{name}" for name in DEMO_HOSTS]
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    if not root.exists() and not any(netns in existing for netns in namespaces):
        say(f"no demo pool under {root}")
        return
    from corral.daemon import running_daemon_pid

    # The control plane and agents first (SIGTERM: they let go of QEMU), then everything left in the namespaces
    # and everything else started under the demo's directory, except PostgreSQL, which pg_ctl stops.
    pg_root = Path(state["pg"]["root"]) if state.get("pg") else None
    pg_pids = set(pids_mentioning(pg_root)) if pg_root else set()
    daemons = [
        pid
        for name in ("control", *DEMO_HOSTS)
        if (root / name).is_dir() and (pid := running_daemon_pid(root / name)) and pid > 0
    ]
    terminate(daemons)
    for netns in namespaces:
        terminate(namespace_pids(netns), grace=5)
    terminate([pid for pid in pids_mentioning(root) if pid not in pg_pids], grace=5)
    for netns in namespaces:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
    for name in DEMO_HOSTS:  # deleting a namespace takes its veth peers along; this is for a half-made host
        ip("link", "del", f"{prefix}v{tag}{name}", check=False)
    ip("link", "del", f"{prefix}b{tag}", check=False)
    if pg_root is not None:
        stop_data_dir(pg_root)
    terminate(pids_mentioning(root), grace=5)
    shutil.rmtree(root, ignore_errors=True)
    say(f"the demo pool under {root} is gone")


def main(argv: list[str]) -> int:
    """`python -m corral.localpool up|down`: progress on stderr, the export lines on stdout."""

    def say(line: str) -> None:
        print(f"corral: {line}", file=sys.stderr, flush=True)

    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("error: say up or down (hint: make cluster-demo, make cluster-down)", file=sys.stderr)
        return 2
    root = demo_root()
    try:
        if argv[0] == "up":
            print("\n".join(demo_up(root, say)), flush=True)
            print(
                "corral: now try: corral host list; corral vm run web1 --host h1; corral vm migrate web1 --to h3",
                file=sys.stderr,
            )
        else:
            demo_down(root, say)
    except PoolError as exc:
        print(f"error: {exc} (hint: {exc.hint})", file=sys.stderr)
        return 1
    except Exception as exc:  # a corral error from the client, say: one line all the same
        from corral.errors import CorralError

        message = exc.message if isinstance(exc, CorralError) else (str(exc).strip() or type(exc).__name__)
        hint = getattr(exc, "hint", None) or f"see the logs under {root}"
        print(f"error: {message.splitlines()[0]} (hint: {hint})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
