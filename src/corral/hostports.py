"""Holding a host port, so that no program on the host takes a port a VM forwards.

Both halves use it: the control plane probes a port when a forward is added on a single-host pool, the agent holds
the ports of the forwards of its VMs for as long as they exist. It needs nothing but sockets, hence a module of
its own below both.
"""

from __future__ import annotations

import errno
import socket

from corral.errors import Conflict


def hold_port(protocol: str, port: int) -> list[socket.socket]:
    """Bind ``port`` on every address of this host (IPv4, and IPv6 where the host has it), without SO_REUSEADDR:
    the bind fails if any program holds the port on any address, and while the sockets stay open no program can
    take it. Nothing listens on them: the firewall sends the port's traffic to the guest before a socket sees it.

    Raises Conflict, without a word on who holds the port (that would tell a tenant about the host)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    held: list[socket.socket] = []
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, kind)
        except OSError:
            if family == socket.AF_INET6:
                continue  # a host without IPv6
            raise
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                continue  # IPv6 disabled by sysctl
            for other in held:
                other.close()
            raise Conflict(
                f"host port {port}/{protocol} is in use on the host",
                "choose another host port in the range for port forwards",
            ) from exc
        held.append(sock)
    return held
