"""One dnsmasq per network: DHCP with an address reserved for every MAC, and DNS for the guests' names.

dnsmasq daemonizes itself, so a bad option or a busy port is reported by its exit status at start, and it
outlives the agent like QEMU does; the agent finds it again through its pid file and restarts it if it died.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.errors import EngineError

LEASE_TIME = "1h"


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
    """Write the reservations; True if they changed (dnsmasq then needs a SIGHUP)."""
    text = "".join(f"{host.mac},{host.ip},{host.hostname}\n" for host in sorted(hosts, key=lambda h: h.ip))
    path = directory / "hosts"
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return True


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


def stop(directory: Path) -> None:
    pid = running_pid(directory)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    (directory / "dnsmasq.pid").unlink(missing_ok=True)
