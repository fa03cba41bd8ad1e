"""The options `vm create` and `vm run` share, written once: `spec_options` adds them to a command's signature
(where Typer reads them) and hands the command one `SpecOptions`, so the two commands cannot drift apart and a new
spec field is one line here."""

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from corral.cli.common import fail

IMAGE = typer.Option("tiny", "--image", "-i", help="Image to boot (see `corral image list`).")
CPUS = typer.Option(1, "--cpus", "-c", help="Number of vCPUs.")
MEMORY = typer.Option("256M", "--memory", "-m", help="Guest memory, e.g. 256M or 2G.")
DISKS = typer.Option(None, "--disk", help="Add a blank disk of this size (repeatable), e.g. --disk 2G.")
VOLUMES = typer.Option(None, "--volume", help="Attach an existing volume (repeatable).")
RESTART = typer.Option("never", "--restart", help="Restart policy: never, on-failure or always.")
KERNEL_ARGS = typer.Option("", "--kernel-args", help="Extra kernel command line for direct-boot images.")
FORKABLE = typer.Option(False, "--forkable", help="Keep RAM in a shared file so the VM can be forked.")
TIMEOUT = typer.Option(300.0, "--timeout", help="Seconds to wait for the guest to become ready.")
ON_HOST = typer.Option(None, "--host", help="Place it on this host (see `corral host list`).")
GROUP = typer.Option(None, "--group", help="Placement group: its VMs share a host or avoid each other (--policy).")
POLICY = typer.Option(None, "--policy", help="The group's rule: affinity or anti-affinity (default for a new group).")
ACCEL = typer.Option(None, "--accel", help="Only hosts with this accelerator: kvm or tcg.")
DRY_RUN = typer.Option(False, "--dry-run", help="Show the host it would go to and why others would not; make nothing.")
FIRMWARE = typer.Option(None, "--firmware", help="Boot through bios (SeaBIOS) or uefi (OVMF); default: the image's.")
NICS = typer.Option(None, "--nic", help="A NIC: network=NAME[,mac=MAC] (repeatable); default: one on 'user'.")
CPU_LIMIT = typer.Option(None, "--cpu-limit", help="CPU quota in cores, e.g. 0.5 (default: its vCPU count).")
CPU_WEIGHT = typer.Option(None, "--cpu-weight", help="CPU share under contention, 1-10000 (default 100).")
DISK_READ_BPS = typer.Option(None, "--disk-read-bps", help="Disk read bandwidth limit, e.g. 50M (per second).")
DISK_WRITE_BPS = typer.Option(None, "--disk-write-bps", help="Disk write bandwidth limit, e.g. 20M (per second).")
DISK_IOPS = typer.Option(None, "--disk-iops", help="Disk operations per second limit.")
MAX_MEMORY = typer.Option(None, "--max-memory", help="Memory `vm set` may grow to live, e.g. 1G (default: --memory).")
MAX_CPUS = typer.Option(None, "--max-cpus", help="vCPUs `vm set` may grow to live (default: --cpus).")
HA = typer.Option(False, "--ha", help="Restart it on another host when its host dies (pools; docs/ha.md).")
HA_PRIORITY = typer.Option(0, "--ha-priority", help="With --ha: higher restarts first (-1000..1000).")
SSH_KEYS = typer.Option(None, "--ssh-key", help="Public key file for the default user (repeatable; cloud-init).")
USER_DATA = typer.Option(None, "--user-data", help="cloud-config or script to merge into the first boot.")
PASSWORD_LOGIN = typer.Option(False, "--password-login", help="Allow SSH password logins (off by default).")


class SpecOptions:
    """What `vm create` and `vm run` both take, typed as Typer reads them (a missing option is None, as before).
    The fields before `forkable` come before the command's own options in `--help`, the rest after (the order users
    have seen since the first release)."""

    image: str = IMAGE
    cpus: int = CPUS
    memory: str = MEMORY
    disk: list[str] = DISKS
    volume: list[str] = VOLUMES
    restart: str = RESTART
    kernel_args: str = KERNEL_ARGS
    forkable: bool = FORKABLE
    ssh_key: list[Path] = SSH_KEYS
    user_data: Path = USER_DATA
    password_login: bool = PASSWORD_LOGIN
    nic: list[str] = NICS
    cpu_limit: float = CPU_LIMIT
    cpu_weight: int = CPU_WEIGHT
    disk_read_bps: str = DISK_READ_BPS
    disk_write_bps: str = DISK_WRITE_BPS
    disk_iops: int = DISK_IOPS
    max_memory: str = MAX_MEMORY
    max_cpus: int = MAX_CPUS
    ha: bool = HA
    ha_priority: int = HA_PRIORITY
    firmware: str = FIRMWARE
    timeout: float = TIMEOUT
    on_host: str = ON_HOST
    group: str = GROUP
    policy: str = POLICY
    accel: str = ACCEL
    dry_run: bool = DRY_RUN

    def __init__(self, **values: Any) -> None:
        # A plain class rather than a dataclass: generating a 28-field dataclass costs milliseconds at every start.
        self.__dict__.update(values)

    def spec(self, name: str) -> dict[str, Any]:
        """The VM spec the API takes; bad input (a NIC, a file, --ha-priority alone) fails here, before the
        daemon is asked for anything."""
        spec: dict[str, Any] = {
            "name": name,
            "image": self.image,
            "cpus": self.cpus,
            "memory": self.memory,
            "disks": [{"size": size} for size in self.disk or []],
            "restart_policy": self.restart,
            "kernel_args": self.kernel_args,
            "forkable": self.forkable,
            "ssh_keys": [_read_text(path, "SSH key file").strip() for path in self.ssh_key or []],
            "user_data": _read_text(self.user_data, "user-data file") if self.user_data else None,
            "password_login": self.password_login,
        }
        extras: dict[str, Any] = {
            "cpu_limit": self.cpu_limit,
            "cpu_weight": self.cpu_weight,
            "disk_read_bps": self.disk_read_bps,
            "disk_write_bps": self.disk_write_bps,
            "disk_iops": self.disk_iops,
        }
        if self.nic:
            extras["nics"] = [parse_nic(text) for text in self.nic]
        spec.update({key: value for key, value in extras.items() if value is not None})
        spec.update(
            {key: value for key, value in (("max_memory", self.max_memory), ("max_cpus", self.max_cpus)) if value}
        )
        if self.ha_priority and not self.ha:
            fail("--ha-priority needs --ha", "add --ha, or leave out --ha-priority", 2)
        if self.ha:
            spec.update({"ha": True, "ha_priority": self.ha_priority})
        if self.firmware is not None:
            spec["firmware"] = self.firmware
        return spec

    def placement(self) -> dict[str, Any]:
        return {"host": self.on_host, "group": self.group, "policy": self.policy, "accel": self.accel}


# Real types, not strings (no `from __future__ import annotations` here): Typer reads them as they are, and
# evaluating 28 strings at every start of the CLI would cost more than the rest of this module.
_HINTS: dict[str, Any] = dict(SpecOptions.__annotations__)
_FIELDS = {name: getattr(SpecOptions, name) for name in _HINTS}
_BEFORE_OWN = list(_FIELDS)[: list(_FIELDS).index("forkable")]
_AFTER_OWN = list(_FIELDS)[len(_BEFORE_OWN) :]


def _parameter(name: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_FIELDS[name], annotation=_HINTS[name])


def spec_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give COMMAND, written as ``(name, <its own options>, as_json, options: SpecOptions)``, the shared options:
    in `--help` they read name, image .. kernel-args, its own options, forkable .. dry-run, --json."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    name, middle, as_json = own[0], own[1:-2], own[-2]
    parameters = [
        name,
        *(_parameter(field) for field in _BEFORE_OWN),
        *middle,
        *(_parameter(field) for field in _AFTER_OWN),
        as_json,
    ]
    parameters = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters]

    @functools.wraps(command)
    def with_options(**values: Any) -> None:
        shared = {field: values.pop(field) for field in _FIELDS}
        command(**values, options=SpecOptions(**shared))

    del with_options.__wrapped__  # type: ignore[attr-defined]  # Typer must read the signature below, not COMMAND's
    with_options.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    with_options.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return with_options


def parse_nic(text: str) -> dict[str, Any]:
    """``network=NAME[,mac=MAC]``, or just ``NAME``."""
    nic: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep and not nic and key:
            key, value = "network", key
        if key not in ("network", "mac") or not value or key in nic:
            fail(f"invalid --nic {text!r}", "write network=NAME[,mac=52:54:00:xx:xx:xx]", 2)
        nic[key] = value
    return nic


def _read_text(path: Path, what: str, limit: int = 64 << 10) -> str:
    """A user's file, read here so a bad path is one clear line before anything is asked of the daemon."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror}", "check the path and its permissions", 2)
    if len(data) > limit:
        fail(f"{what} {path} is larger than {limit >> 10} KiB", "is it the right file?", 2)
    try:
        return data.decode()
    except UnicodeDecodeError:
        fail(f"{what} {path} is not text", "give a text file", 2)
