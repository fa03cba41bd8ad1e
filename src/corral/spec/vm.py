"""What a user asks of a VM, and the states it can be in."""

from __future__ import annotations

import random
import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from corral.errors import InvalidInput
from corral.spec.firmware import Firmware, parse_firmware
from corral.spec.firstboot import validate_ssh_key, validate_user_data
from corral.spec.names import validate_name
from corral.spec.sizes import parse_size

MIN_MEMORY = 32 << 20
MAX_CPUS = 255
MAX_DISKS = 16
MAX_NICS = 8
MAX_VM_NAME = 56  # so derived names (NAME-disk16, NAME-root) stay within 63
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
# Automatic ballooning (docs/optimization.md): `--min-memory` may not go under MIN_FLOOR (a Linux guest squeezed
# below ~64 MiB starts killing processes); without one, a VM keeps the larger of DEFAULT_FLOOR and a quarter of
# its memory.
MIN_FLOOR = 64 << 20
DEFAULT_FLOOR = 128 << 20


def memory_floor(memory: int, min_memory: int | None = None) -> int:
    """The least memory automatic ballooning leaves a VM of ``memory`` bytes: its own floor, or the default."""
    floor = min_memory if min_memory is not None else max(DEFAULT_FLOOR, memory // 4)
    return min(memory, floor)


def _size(value: object) -> int:
    if isinstance(value, (str, int)):
        return parse_size(value)
    raise InvalidInput(f"invalid size {value!r}", "write a size such as 256M, 1G or 10GiB")


Size = Annotated[int, BeforeValidator(_size)]


class RestartPolicy(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class PowerState(StrEnum):
    """What a VM is doing. Desired state uses the three stable values; observed state uses all."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    CRASHED = "crashed"
    # Its host died (lease expired and the control plane took the host over) and HA could not restart it.
    LOST = "lost"


class DiskSpec(BaseModel):
    """An extra disk: a new blank volume of ``size``, or an existing volume by name."""

    model_config = ConfigDict(extra="forbid")

    size: Size | None = None
    volume: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DiskSpec:
        if (self.size is None) == (self.volume is None):
            raise InvalidInput("a disk needs either a size or an existing volume", "pass --disk 2G or --volume NAME")
        if self.volume is not None:
            validate_name(self.volume, "volume name")
        return self


USER_NETWORK = "user"


class NicSpec(BaseModel):
    """A network interface: on a corral network (a bridge with DHCP, see corral.cluster.networks), or on
    ``network="user"``, QEMU's user-mode NAT, which needs no bridge and no root.

    ``slot`` is the NIC's place on the VM's PCI bus (its own hotplug port) and the suffix of its QEMU ids. It is
    fixed when the NIC is made, so hot-removing one NIC never renames the others inside a running guest."""

    model_config = ConfigDict(extra="forbid")

    network: str = USER_NETWORK
    mac: str | None = None
    slot: int | None = Field(default=None, ge=0, lt=MAX_NICS)

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        mac = value.lower()
        if not _MAC.match(mac):
            raise InvalidInput(f"invalid MAC address {value!r}", "write six hex pairs such as 52:54:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise InvalidInput(f"invalid MAC address {value!r}: multicast", "the first octet must be even")
        return mac

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        return value if value == USER_NETWORK else validate_name(value, "network name")


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range, as libvirt and QEMU users expect."""
    tail = [random.randint(0, 255) for _ in range(3)]
    return "52:54:00:" + ":".join(f"{octet:02x}" for octet in tail)


class VMSpec(BaseModel):
    """A VM as the user asked for it. Stored as JSON; the agent turns it into a QEMU command line."""

    model_config = ConfigDict(extra="forbid")

    name: str
    image: str
    cpus: int = Field(default=1)
    memory: Size = 256 << 20
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=lambda: [NicSpec()])
    restart_policy: RestartPolicy = RestartPolicy.NEVER
    # High availability (PostgreSQL pools, docs/ha.md): when its host dies, the control plane restarts it on a
    # survivor that reaches its disks, higher ``ha_priority`` first.
    ha: bool = False
    ha_priority: int = Field(default=0, ge=-1000, le=1000)
    kernel_args: str = ""
    # Run with guest RAM in a shared file so the VM can be forked (instant clones). Opt-in: children share
    # memory pages with the parent, which matters for side channels between tenants.
    forkable: bool = False
    # First boot through cloud-init (images that use it): public keys for the default user, extra user-data.
    ssh_keys: list[str] = Field(default_factory=list)
    user_data: str | None = None
    password_login: bool = False
    # Firmware to boot through (bios or uefi); None follows the image (its `--firmware` at import, else bios).
    firmware: Annotated[Firmware | None, BeforeValidator(parse_firmware)] = None
    # Resource limits beyond the vCPU count (enforced with cgroups and QEMU's block throttling; see
    # docs/isolation.md). cpu_limit is in cores (0.5 = half of one core); None means "as many as vCPUs".
    cpu_limit: float | None = Field(default=None, gt=0, le=MAX_CPUS)
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)
    disk_read_bps: Size | None = None
    disk_write_bps: Size | None = None
    disk_iops: int | None = Field(default=None, ge=1, le=1_000_000)
    # Ceilings for live resizing (docs/resize.md): QEMU starts with max_memory of RAM, ballooned down to
    # ``memory``, and with max_cpus CPU slots, ``cpus`` of them plugged. None means "the same as memory/cpus",
    # so a VM that never asked for headroom costs nothing extra.
    max_memory: Size | None = None
    max_cpus: int | None = Field(default=None, ge=1, le=MAX_CPUS)

    @model_validator(mode="after")
    def _ceilings(self) -> VMSpec:
        if self.max_memory is not None:
            if self.max_memory % (1 << 20):
                raise InvalidInput("max memory must be a whole number of MiB", "write it as 512M or 2G")
            if self.memory > self.max_memory:
                raise InvalidInput(
                    f"memory {self.memory >> 20}M is above the maximum {self.max_memory >> 20}M",
                    "raise --max-memory (it takes effect at the next start) or ask for less",
                )
        if self.max_cpus is not None and self.cpus > self.max_cpus:
            raise InvalidInput(
                f"{self.cpus} CPUs is more than the maximum of {self.max_cpus}",
                "raise --max-cpus (it takes effect at the next start) or ask for fewer",
            )
        return self

    @property
    def boot_memory(self) -> int:
        """The RAM QEMU is started with: the ceiling the balloon can give back without a restart."""
        return self.max_memory if self.max_memory is not None else self.memory

    @property
    def boot_max_cpus(self) -> int:
        return self.max_cpus if self.max_cpus is not None else self.cpus

    @field_validator("ssh_keys")
    @classmethod
    def _ssh_keys(cls, value: list[str]) -> list[str]:
        return [validate_ssh_key(key) for key in value]

    @field_validator("user_data")
    @classmethod
    def _user_data(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return validate_user_data(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        validate_name(value, "VM name")
        if len(value) > MAX_VM_NAME:
            raise InvalidInput(
                f"VM name {value!r} is longer than {MAX_VM_NAME} characters",
                "its disks are named after it (NAME-root, NAME-disk16): use a shorter name",
            )
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return validate_name(value, "image name")

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: int) -> int:
        if not 1 <= value <= MAX_CPUS:
            raise InvalidInput(f"invalid CPU count {value}", f"use 1 to {MAX_CPUS}")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value < MIN_MEMORY:
            raise InvalidInput(f"memory {value} bytes is too small", "give a VM at least 32M")
        if value % (1 << 20):
            raise InvalidInput("memory must be a whole number of MiB", "write it as 256M or 1G")
        return value

    @field_validator("disks")
    @classmethod
    def _disks(cls, value: list[DiskSpec]) -> list[DiskSpec]:
        if len(value) > MAX_DISKS:
            raise InvalidInput(f"too many disks ({len(value)})", f"attach at most {MAX_DISKS}")
        return value

    @field_validator("nics")
    @classmethod
    def _nics(cls, value: list[NicSpec]) -> list[NicSpec]:
        if len(value) > MAX_NICS:
            raise InvalidInput(f"too many NICs ({len(value)})", f"attach at most {MAX_NICS}")
        macs = [nic.mac for nic in value if nic.mac]
        if len(macs) != len(set(macs)):
            raise InvalidInput("two NICs share a MAC address", "give each NIC its own MAC")
        slots = [nic.slot for nic in value if nic.slot is not None]
        if len(slots) != len(set(slots)):
            raise InvalidInput("two NICs share a slot", "leave slots to corral")
        return value

    @field_validator("disk_read_bps", "disk_write_bps")
    @classmethod
    def _bps(cls, value: int | None) -> int | None:
        if value is not None and value < 1 << 20:
            raise InvalidInput(f"disk bandwidth limit {value} bytes/s is below 1M", "write a rate such as 50M")
        return value

    @field_validator("kernel_args")
    @classmethod
    def _kernel_args(cls, value: str) -> str:
        if len(value) > 1024 or "\n" in value:
            raise InvalidInput("kernel arguments are too long or span lines", "keep them on one line")
        return value

    def with_macs(self) -> VMSpec:
        """A copy where every NIC has a MAC and a slot, so the guest sees the same NICs on every boot."""
        taken = {nic.mac for nic in self.nics if nic.mac}
        used_slots = {nic.slot for nic in self.nics if nic.slot is not None}
        free_slots = iter(slot for slot in range(MAX_NICS) if slot not in used_slots)
        nics = []
        for nic in self.nics:
            mac = nic.mac
            while mac is None or (mac in taken and nic.mac is None):
                mac = random_mac()
            taken.add(mac)
            slot = nic.slot if nic.slot is not None else next(free_slots)
            nics.append(nic.model_copy(update={"mac": mac, "slot": slot}))
        return self.model_copy(update={"nics": nics})

    def nic_slot(self, position: int) -> int:
        """The slot of the NIC at ``position`` (specs made before slots existed use their position)."""
        slot = self.nics[position].slot
        return position if slot is None else slot
