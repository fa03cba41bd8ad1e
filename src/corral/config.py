"""Where corral keeps its state and how it is tuned.

Settings come from ``$CORRAL_HOME/config.toml`` with environment variables on top (``CORRAL_ACCEL=tcg``), so a
test or a benchmark can change one knob without writing a file.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.errors import InvalidInput
from corral.paths import default_cache, default_home


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Field(default_factory=default_home)
    cache: Path = Field(default_factory=default_cache)
    accel: Accel = Accel.AUTO
    machine: str = "q35"
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img_binary: str = "qemu-img"
    cpu_overcommit: float = Field(default=16.0, gt=0)
    memory_overcommit: float = Field(default=1.0, gt=0)
    # qcow2 disks are thin: the virtual sizes on a host may add up to this many times its storage.
    storage_overcommit: float = Field(default=4.0, gt=0)
    # Memory kept back for the host itself when deciding what fits.
    reserved_host_memory: int = Field(default=512 << 20, ge=0)
    host_name: str | None = None
    stop_timeout: float = Field(default=30.0, gt=0)
    # cgroup limits, a uid of its own and seccomp for each VM's QEMU (needs root; see docs/isolation.md).
    isolation: bool = True
    # TCG's translated-code cache per VM. QEMU 7.2's default (1 GiB) would make memory limits meaningless;
    # 64 MiB cost a Debian boot 4-6 s of retranslation (docs/images.md), 256 MiB keeps boots at full speed.
    tcg_tb_size_mib: int = Field(default=256, ge=8, le=4096)
    # The network listener's budget per request and per caller (docs/security.md): the largest JSON body, how
    # long a body may stall (and, for JSON, take in all) before it is cut, and how many long-lived requests
    # (job waits, event streams, log follows, consoles) each token may hold at once, per kind.
    max_request_body: int = Field(default=1 << 20, ge=1024)
    request_body_timeout: float = Field(default=60.0, gt=0)
    max_waits_per_caller: int = Field(default=8, ge=1)
    # A VM's serial log is rotated past this size (one previous part is kept): what a guest prints is bounded.
    serial_log_max: int = Field(default=4 << 20, ge=64 << 10)
    # UEFI firmware (Debian's ovmf package): the code every UEFI VM maps read-only, and the variable store
    # template each UEFI VM gets its own copy of. SeaBIOS, the default firmware, ships with QEMU.
    ovmf_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    ovmf_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    # The store: None is SQLite under the home (one host); a postgresql:// URL is a pool's shared store.
    database: str | None = None
    # Placement weights: spread VMs over the least allocated hosts, or pack them onto the fullest that fit.
    placement_strategy: Literal["spread", "pack"] = "spread"
    # Power commands for hosts put in standby by consolidation and woken for placement (an IPMI or wake-on-LAN
    # hook), run by the control plane with the host's name and address as arguments (docs/optimization.md).
    standby_command: str | None = None
    wake_command: str | None = None
    # Automatic ballooning (corral.host.autoballoon, docs/optimization.md): each agent steers its host's memory use
    # under balloon_target (a fraction) by moving balloons balloon_step of a VM's memory per round, a round every
    # balloon_interval seconds, never under a VM's floor nor leaving a guest less than balloon_guest_min_free of
    # its memory free. balloon_host_memory: a budget in bytes used instead of MemTotal, against which the guests'
    # own memory (their balloon sizes) counts as the host's use: for tests, and for hosts that share their memory
    # with work corral does not see.
    autoballoon: bool = True
    balloon_target: float = Field(default=0.8, gt=0, lt=1)
    balloon_step: float = Field(default=0.05, gt=0, le=0.5)
    balloon_interval: float = Field(default=5.0, ge=1)
    balloon_guest_min_free: float = Field(default=0.15, ge=0, lt=1)
    balloon_host_memory: int | None = Field(default=None, gt=0)
    # Automatic balancing (docs/optimization.md): the control plane's HostWatch makes a balance plan of one move
    # every auto_balance_interval seconds, and runs it when the move's gain passes the threshold (1..5).
    auto_balance: bool = False
    auto_balance_threshold: int = Field(default=3, ge=1, le=5)
    auto_balance_interval: float = Field(default=300.0, ge=1)
    # Automatic consolidation (docs/optimization.md): every auto_consolidate_interval seconds the HostWatch makes a
    # consolidation plan (N+1 kept) and runs it when it frees a host, which then goes to standby.
    auto_consolidate: bool = False
    auto_consolidate_interval: float = Field(default=3600.0, ge=1)
    # Seconds without a heartbeat after which a host is marked unreachable (agents beat every third of it, <= 10 s).
    host_timeout: float = Field(default=60.0, ge=3)
    # HA leases (PostgreSQL pools, docs/ha.md): an agent's lease lasts this long on the database clock and is renewed
    # every fifth of it; the agent fences itself (kills its HA VMs) when it could not renew for 80 % of it, and the
    # control plane takes the host over only after expiry plus half of it.
    lease_time: float = Field(default=10.0, ge=2, le=600)
    # Make the "default" NAT network (a bridge, dnsmasq, nftables rules) on first start.
    default_network: bool = True
    # Imports by remote callers: a directory whose <project>/ subdirectories hold files an administrator put there
    # for that project (None: off; remote callers then upload), the largest upload, and how long an unused upload or
    # an export nobody downloaded is kept (docs/images.md, docs/backups.md).
    import_dir: Path | None = None
    max_upload_size: int = Field(default=64 << 30, gt=0)
    transfer_expiry: float = Field(default=86400.0, gt=0)
    # The host ports port forwards may take ("LOW-HIGH"): the administrator's, for every caller (the local root
    # too), so a forward can never land on a port a host service uses or will use (docs/networking.md).
    port_forward_range: str = Field(default="20000-29999", pattern=r"^\s*\d{1,5}\s*-\s*\d{1,5}\s*$")
    # Networks across a pool's hosts: VXLAN's UDP port between hosts, and the MTU of the hosts' underlay links
    # (guests get 50 bytes less, what VXLAN's headers take).
    overlay_port: int = Field(default=4789, ge=1, le=65535)
    underlay_mtu: int = Field(default=1500, ge=1280, le=65535)
    # Host bridges project admins may join with bridge-mode networks; cluster admins may name any host bridge.
    # corral's own bridges are never uplinks, whatever this says.
    bridge_uplinks: list[str] = Field(default_factory=list)
    # Where backups are written (docs/backups.md): None keeps them in CORRAL_HOME/backups. Any directory works, an
    # NFS mount for one, so that another host mounting it can restore them when this one is gone.
    backup_dir: Path | None = None
    # The shortest interval a backup schedule may have: an hour-scale default keeps a typo from filling the disk;
    # tests lower it to seconds.
    backup_min_interval: float = Field(default=60.0, gt=0)

    @field_validator("backup_dir")
    @classmethod
    def _absolute_backup_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("give an absolute path, e.g. /mnt/backups")
        return value

    @field_validator("port_forward_range")
    @classmethod
    def _port_range(cls, value: str) -> str:
        low, high = (int(part) for part in value.split("-"))
        if not 1 <= low <= high <= 65535:
            raise ValueError("write LOW-HIGH with 1 <= LOW <= HIGH <= 65535, e.g. 20000-29999")
        return f"{low}-{high}"

    @property
    def forward_ports(self) -> range:
        """The host ports port forwards may use, as a range (HIGH included)."""
        low, high = (int(part) for part in self.port_forward_range.split("-"))
        return range(low, high + 1)

    @property
    def socket_path(self) -> Path:
        return self.home / "corral.sock"

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.home / 'corral.db'}"


_ENV = {
    "CORRAL_CACHE": "cache",
    "CORRAL_ACCEL": "accel",
    "CORRAL_MACHINE": "machine",
    "CORRAL_QEMU": "qemu_binary",
    "CORRAL_QEMU_IMG": "qemu_img_binary",
    "CORRAL_CPU_OVERCOMMIT": "cpu_overcommit",
    "CORRAL_MEMORY_OVERCOMMIT": "memory_overcommit",
    "CORRAL_HOST_NAME": "host_name",
    "CORRAL_ISOLATION": "isolation",
    "CORRAL_OVMF_CODE": "ovmf_code",
    "CORRAL_OVMF_VARS": "ovmf_vars",
    "CORRAL_DB": "database",
    "CORRAL_PLACEMENT": "placement_strategy",
    "CORRAL_HOST_TIMEOUT": "host_timeout",
    "CORRAL_LEASE_TIME": "lease_time",
    "CORRAL_DEFAULT_NETWORK": "default_network",
    "CORRAL_PORT_FORWARD_RANGE": "port_forward_range",
    "CORRAL_OVERLAY_PORT": "overlay_port",
    "CORRAL_UNDERLAY_MTU": "underlay_mtu",
    "CORRAL_BACKUP_DIR": "backup_dir",
    "CORRAL_BACKUP_MIN_INTERVAL": "backup_min_interval",
    "CORRAL_AUTOBALLOON": "autoballoon",
    "CORRAL_BALLOON_HOST_MEMORY": "balloon_host_memory",
    "CORRAL_AUTO_BALANCE": "auto_balance",
    "CORRAL_AUTO_CONSOLIDATE": "auto_consolidate",
}


def load_settings(home: Path | str | None = None) -> Settings:
    """Read config.toml under the home, then the environment; a bad value is one clear error."""
    home_path = Path(home or os.environ.get("CORRAL_HOME") or default_home()).absolute()
    values: dict[str, object] = {}
    config_file = home_path / "config.toml"
    if config_file.exists():
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"{config_file} is not valid TOML: {exc}", "fix or remove the file") from exc
    for env, key in _ENV.items():
        if os.environ.get(env):
            values[key] = os.environ[env]
    values["home"] = home_path
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(
            f"bad setting {where}: {first['msg']}", f"check {config_file} and the CORRAL_* variables"
        ) from exc
