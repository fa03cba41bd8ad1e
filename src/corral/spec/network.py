"""What a user asks of a virtual network, and of the ports forwarded into guests."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.errors import InvalidInput
from corral.spec.names import validate_name

# Linux interface names: at most 15 bytes, no slash, no whitespace (see dev_valid_name in the kernel).
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_FORWARD = re.compile(r"^(\d{1,5}):(\d{1,5})(?:/(tcp|udp))?$")
MIN_PREFIX, MAX_PREFIX = 16, 29
MIN_VNI, MAX_VNI = 1, (1 << 24) - 1  # VXLAN's 24-bit network identifier
MIN_MTU, MAX_MTU = 576, 9000
VXLAN_OVERHEAD = 50  # outer Ethernet (14), IPv4 (20), UDP (8) and VXLAN (8) headers


class NetworkMode(StrEnum):
    NAT = "nat"  # a bridge of its own, DHCP/DNS, masquerade out through the host's routes
    ISOLATED = "isolated"  # a bridge of its own, DHCP/DNS, no way out and no way into the host
    BRIDGE = "bridge"  # VMs join an existing host bridge and are on that LAN


def validate_subnet(text: str) -> ipaddress.IPv4Network:
    """A private IPv4 subnet with room for a gateway and guests; host bits must be zero (10.20.0.0/24)."""
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidInput(f"invalid subnet {text!r}: {exc}", "write it as 10.20.0.0/24") from exc
    if not MIN_PREFIX <= subnet.prefixlen <= MAX_PREFIX:
        raise InvalidInput(
            f"subnet {text} has a /{subnet.prefixlen} prefix",
            f"use a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}, such as /24",
        )
    if not subnet.is_private or subnet.is_loopback or subnet.is_link_local:
        raise InvalidInput(
            f"subnet {text} is not a private range", "use one inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
        )
    return subnet


def validate_ifname(name: str) -> str:
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidInput(f"invalid interface name {name!r}", "name an existing host bridge such as br0")
    return name


class NetworkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    mode: NetworkMode = NetworkMode.NAT
    subnet: str | None = Field(default=None, description="CIDR such as 10.20.0.0/24; chosen when omitted")
    uplink: str | None = Field(default=None, description="bridge mode: the existing host bridge to join")
    dhcp: bool = True
    vni: int | None = Field(default=None, description="VXLAN network identifier in a pool; chosen when omitted")
    mtu: int | None = Field(default=None, description="the guests' MTU; in a pool at most the underlay's less 50")

    @field_validator("vni")
    @classmethod
    def _vni(cls, value: int | None) -> int | None:
        if value is not None and not MIN_VNI <= value <= MAX_VNI:
            raise InvalidInput(f"VNI {value} is out of range", f"choose a VNI between {MIN_VNI} and {MAX_VNI}")
        return value

    @field_validator("mtu")
    @classmethod
    def _mtu(cls, value: int | None) -> int | None:
        if value is not None and not MIN_MTU <= value <= MAX_MTU:
            raise InvalidInput(f"MTU {value} is out of range", f"choose an MTU between {MIN_MTU} and {MAX_MTU}")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        validate_name(value, "network name")
        if value == "user":
            raise InvalidInput("'user' names QEMU's built-in user-mode network", "choose another network name")
        return value

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        return None if value is None else str(validate_subnet(value))

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, value: str | None) -> str | None:
        return None if value is None else validate_ifname(value)

    @model_validator(mode="after")
    def _mode_options(self) -> NetworkSpec:
        if self.mode == NetworkMode.BRIDGE:
            if self.uplink is None:
                raise InvalidInput("a bridge-mode network needs the host bridge to join", "pass --uplink br0")
            if self.subnet is not None:
                raise InvalidInput(
                    "a bridge-mode network uses its LAN's addresses, not a subnet of its own", "leave out --subnet"
                )
            if self.vni is not None or self.mtu is not None:
                raise InvalidInput(
                    "a bridge-mode network stays on its host's LAN: it has no VNI or MTU of corral's",
                    "leave out --vni and --mtu",
                )
        elif self.uplink is not None:
            raise InvalidInput(
                f"--uplink only applies to bridge mode, not {self.mode.value}",
                "leave out --uplink, or use --mode bridge",
            )
        return self


class PortForwardSpec(BaseModel):
    """``HOST_PORT:GUEST_PORT[/tcp|udp]`` as the CLI writes it, or the three fields."""

    model_config = ConfigDict(extra="forbid")

    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    protocol: str = "tcp"

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        if value not in ("tcp", "udp"):
            raise InvalidInput(f"invalid protocol {value!r}", "use tcp or udp")
        return value

    @classmethod
    def parse(cls, text: str) -> PortForwardSpec:
        match = _FORWARD.fullmatch(text.strip())
        if match is None:
            raise InvalidInput(f"invalid port forward {text!r}", "write HOST_PORT:GUEST_PORT[/tcp|udp], e.g. 8080:80")
        host_port, guest_port = int(match[1]), int(match[2])
        for port in (host_port, guest_port):
            if not 1 <= port <= 65535:
                raise InvalidInput(f"invalid port {port} in {text!r}", "ports go from 1 to 65535")
        return cls(host_port=host_port, guest_port=guest_port, protocol=match[3] or "tcp")
