"""One dnsmasq per network: DHCP with an address reserved for every MAC, and DNS for the guests' names.

DNS answers every name of the network, not only those of the guests that took a lease here: dnsmasq puts a
``--dhcp-hostsfile`` line in DNS only once its MAC has a lease from this very dnsmasq, so on a network that spans
hosts a guest on another host (or one just moved away) would not resolve. The names come from the store's
reservations instead, in an ``--addn-hosts`` file written next to the DHCP one, and reread on the same SIGHUP.

dnsmasq daemonizes itself, so a bad option or a busy port is reported by its exit status at start, and it
outlives the agent like QEMU does; the agent finds it again through its pid file and restarts it if it died.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.errors import EngineError

LEASE_TIME = "1h"
NAMES = "names"  # the addn-hosts file: "ADDRESS NAME" for every reservation of the network, on every host


@dataclass(frozen=True)
class DhcpHost:
    mac: str
    ip: str
    hostname: str


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if Path(p).exists()), None
    )
    if found is None:
        raise EngineError(
            "dnsmasq is not installed: networks cannot hand out addresses", "install it: apt-get install dnsmasq-base"
        )
    return found


def command(
    directory: Path, bridge: str, subnet: str, gateway: str, isolated: bool, mtu: int | None = None
) -> list[str]:
    network = ipaddress.IPv4Network(subnet)
    args = [
        dnsmasq_binary(),
        "--conf-file=/dev/null",
        f"--pid-file={directory / 'dnsmasq.pid'}",
        # Bound to this bridge alone (SO_BINDTODEVICE for DHCP): one dnsmasq per network can share the host.
        f"--interface={bridge}",
        "--bind-interfaces",
        "--except-interface=lo",
        f"--listen-address={gateway}",
        # "static": only MACs corral reserved an address for get one; a guest cannot take a neighbour's.
        f"--dhcp-range={network.network_address},static,{network.netmask},{LEASE_TIME}",
        f"--dhcp-hostsfile={directory / 'hosts'}",
        f"--addn-hosts={directory / NAMES}",
        f"--dhcp-leasefile={directory / 'leases'}",
        "--dhcp-authoritative",
        "--dhcp-no-override",
        "--strict-order",
        "--domain-needed",
        "--bogus-priv",
    ]
    if mtu is not None:
        # Option 26: a network spanning hosts carries 50 bytes less per frame than the hosts' links (VXLAN).
        args.append(f"--dhcp-option=option:mtu,{mtu}")
    if isolated:
        # No default route and no upstream DNS: nothing in the guest should even try to leave.
        args += ["--dhcp-option=option:router", "--no-resolv"]
    return args


def write_hosts(directory: Path, hosts: list[DhcpHost]) -> bool:
    """Write the reservations, for DHCP and for DNS; True if they changed (dnsmasq then needs a SIGHUP)."""
    ordered = sorted(hosts, key=lambda h: (ipaddress.IPv4Address(h.ip), h.mac))
    dhcp = "".join(f"{host.mac},{host.ip},{host.hostname}\n" for host in ordered)
    names = "".join(f"{host.ip} {host.hostname}\n" for host in ordered)
    changed = _replace(directory / "hosts", dhcp)
    return _replace(directory / NAMES, names) or changed


def _replace(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically (dnsmasq may be reading it); True if it changed."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return True


def outdated(directory: Path) -> bool:
    """A running dnsmasq started by an older corral, without the names file: it must be restarted to read it."""
    pid = running_pid(directory)
    if pid is None:
        return False
    try:
        return f"--addn-hosts={directory / NAMES}".encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def running_pid(directory: Path) -> int | None:
    """The pid of this network's dnsmasq if it still runs (and is dnsmasq, not a recycled pid)."""
    try:
        pid = int((directory / "dnsmasq.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    if state == "Z" or b"dnsmasq" not in cmdline or str(directory).encode() not in cmdline:
        return None
    return pid


def start(directory: Path, bridge: str, subnet: str, gateway: str, isolated: bool, mtu: int | None = None) -> int:
    (directory / "leases").touch()
    result = subprocess.run(
        command(directory, bridge, subnet, gateway, isolated, mtu), capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise EngineError(
            f"dnsmasq for bridge {bridge} failed to start: {result.stderr.strip()[:300]}",
            "another DHCP/DNS server may hold the bridge's address; see `ss -lunp`",
        )
    pid = running_pid(directory)
    if pid is None:
        raise EngineError(f"dnsmasq for bridge {bridge} exited right after starting", "run it by hand to see why")
    return pid


def reload(directory: Path) -> None:
    pid = running_pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)


def stop(directory: Path, wait: float = 0.0) -> None:
    """SIGTERM the network's dnsmasq; with ``wait``, until it has exited (and let go of its address and ports),
    for up to that many seconds."""
    pid = running_pid(directory)
    if pid is not None:
        pidfd = None
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid) if wait else None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if pidfd is not None:
            try:
                select.select([pidfd], [], [], wait)  # a pidfd turns readable when the process exits
            finally:
                os.close(pidfd)
    (directory / "dnsmasq.pid").unlink(missing_ok=True)
