"""corral.yaml: an environment (VMs and their networks) described in one file.

    networks:
      lan: {mode: isolated, subnet: 10.80.0.0/24}
    vms:
      web: {image: tiny, memory: 256M, networks: [lan], provision: ["echo ready > /root/provisioned"]}
      db:  {image: tiny, memory: 256M, networks: [lan], count: 2}

Names in the file are short (``web``); the resources made for it are scoped by the environment's name
(``ENV-web``, ``ENV-db-1``), so two checkouts of one project do not collide. Errors name the file and the line,
because a user fixes a YAML file by its line numbers, not by a pydantic location tuple.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.errors import InvalidInput
from corral.spec.names import validate_name
from corral.spec.network import NetworkMode, PortForwardSpec, validate_subnet
from corral.spec.sizes import parse_size

MAX_COUNT = 64
MAX_FILE = 1 << 20


class _Invalid(ValueError):
    """Carries an InvalidInput through pydantic (which only collects ValueErrors) so its hint survives."""

    def __init__(self, cause: InvalidInput, loc: tuple[str, ...] = ()) -> None:
        super().__init__(cause.message)
        self.cause = cause
        self.loc = loc  # where in the file, when the validator knows better than pydantic (whole-file checks)


def _checked(check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except InvalidInput as exc:
        raise _Invalid(exc) from None


class EnvNetwork(BaseModel):
    """A network of the environment: made as ``ENV-NAME``."""

    model_config = ConfigDict(extra="forbid")

    mode: NetworkMode = NetworkMode.ISOLATED
    subnet: str | None = None
    dhcp: bool = True

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        return None if value is None else str(_checked(validate_subnet, value))

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: NetworkMode) -> NetworkMode:
        if value == NetworkMode.BRIDGE:
            raise _Invalid(InvalidInput("an environment's network cannot be a host bridge", "use mode nat or isolated"))
        return value


class EnvVM(BaseModel):
    """One VM entry; with ``count: N`` it stands for members NAME-1 .. NAME-N."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    template: str | None = None
    cpus: int = Field(default=1, ge=1, le=64)
    memory: str = "256M"
    count: int = Field(default=1, ge=1, le=MAX_COUNT)
    networks: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list, description="HOST:GUEST[/tcp|udp] port forwards")
    ssh_keys: list[str] = Field(default_factory=list)
    user_data: str | None = None
    provision: list[str | list[str]] = Field(
        default_factory=list, description="commands run once in the guest: a string runs through sh -c"
    )
    forkable: bool | None = None
    disks: list[str] = Field(default_factory=list)
    kernel_args: str = ""
    restart: str = "never"

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | int) -> str:
        _checked(parse_size, value, "memory")
        return str(value)

    @field_validator("disks")
    @classmethod
    def _disks(cls, value: list[str]) -> list[str]:
        for size in value:
            _checked(parse_size, size, "disk size")
        return value

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[str]) -> list[str]:
        for text in value:
            _checked(PortForwardSpec.parse, str(text))
        return [str(text) for text in value]

    @model_validator(mode="after")
    def _source(self) -> EnvVM:
        if (self.image is None) == (self.template is None):
            raise _Invalid(
                InvalidInput("a VM needs exactly one of image or template", "write image: tiny (or template: T)")
            )
        return self

    def commands(self) -> list[list[str]]:
        """The provisioning commands as argv lists (a string runs through the guest's shell)."""
        return [["sh", "-c", item] if isinstance(item, str) else list(item) for item in self.provision]

    def provision_digest(self) -> str:
        """Identifies the provisioning as written: `up` runs it again only when this changes."""
        return hashlib.sha256(json.dumps(self.commands()).encode()).hexdigest()[:16]

    def is_group(self) -> bool:
        """An entry that says ``count:`` (even 1) is a group: members NAME-1..NAME-N that `corral scale` sizes."""
        return "count" in self.model_fields_set or self.count > 1

    def members(self, name: str, count: int | None = None) -> list[str]:
        count = self.count if count is None else count
        return member_names(name, count) if self.is_group() else [name]

    def is_forkable(self) -> bool:
        """Groups are forkable unless the file says otherwise: new members are forks of a running one."""
        return self.forkable if self.forkable is not None else self.is_group()


class EnvironmentFile(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    networks: dict[str, EnvNetwork] = Field(default_factory=dict)
    vms: dict[str, EnvVM] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _checked(validate_name, value, "environment name")

    @field_validator("networks")
    @classmethod
    def _network_names(cls, value: dict[str, EnvNetwork]) -> dict[str, EnvNetwork]:
        for name in value:
            _checked(validate_name, name, "network name")
        return value

    @field_validator("vms")
    @classmethod
    def _vm_names(cls, value: dict[str, EnvVM]) -> dict[str, EnvVM]:
        for name in value:
            _checked(validate_name, name, "VM name")
        return value

    @model_validator(mode="after")
    def _references(self) -> EnvironmentFile:
        members: dict[str, str] = {}
        for name, vm in self.vms.items():
            for network in vm.networks:
                if network not in self.networks and network != "user":
                    raise _Invalid(
                        InvalidInput(
                            f"VM {name} names network {network!r}, which the file does not define",
                            f"add it under networks:, or use one of {sorted(self.networks) or ['user']}",
                        ),
                        ("vms", name, "networks"),
                    )
            for member in vm.members(name):
                if member in members:
                    raise _Invalid(
                        InvalidInput(
                            f"duplicate VM name {member!r} (from {members[member]} and {name})", "rename one of them"
                        ),
                        ("vms", name),
                    )
                members[member] = name
        return self


def member_names(name: str, count: int) -> list[str]:
    """``web-1`` .. ``web-N``: a group's members (the numbering `corral scale` continues)."""
    return [f"{name}-{index}" for index in range(1, count + 1)]


def scoped(env: str, name: str) -> str:
    """The daemon-side name of a file's resource: the environment's name first, so checkouts do not collide."""
    full = f"{env}-{name}"
    validate_name(full, "scoped name")
    return full


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic error location down the YAML node tree to the line a user should look at."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    node, line = value, value.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _duplicate_keys(node: yaml.Node | None, where: str) -> None:
    """YAML keeps the last of two equal keys silently; in corral.yaml that is always a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if key.value in seen:
                raise InvalidInput(
                    f"{where}:{line}: duplicate name {key.value!r} (first on line {seen[key.value]})",
                    "each VM and network name may appear once",
                )
            seen[key.value] = line
            _duplicate_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicate_keys(item, where)


def parse(text: str, where: str = "corral.yaml") -> EnvironmentFile:
    """Validate a corral.yaml's text; every error names ``where`` and the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInput(f"{where}{line}: not valid YAML: {problem}", "fix the YAML syntax at that line") from None
    _duplicate_keys(node, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput(f"{where}:1: the file must be a mapping with vms: and networks:", "see docs/environments.md")
    try:
        return EnvironmentFile.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = error.get("ctx", {}).get("error")
        loc = cause.loc if isinstance(cause, _Invalid) and cause.loc else tuple(error["loc"])
        line_no = _line_of(node, loc)
        if isinstance(cause, _Invalid):
            message, hint = cause.cause.message, cause.cause.hint
        else:
            message, hint = error["msg"], "see docs/environments.md for the format"
        field = ".".join(str(part) for part in loc)
        at = f":{line_no}" if line_no else ""
        raise InvalidInput(f"{where}{at}: {field + ': ' if field else ''}{message}", hint) from None


def load(path: Path | str) -> EnvironmentFile:
    """Read and validate a corral.yaml from disk."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read {path}: {exc.strerror}", "pass the file with -f, or cd to its directory"
        ) from None
    if len(data) > MAX_FILE:
        raise InvalidInput(f"{path} is larger than 1 MiB", "is it the right file?")
    return parse(data.decode(errors="replace"), str(path))


def default_env_name(directory: Path) -> str:
    """The directory's name made into a valid name: an environment's default scope."""
    raw = "".join(ch if ch.isalnum() else "-" for ch in directory.resolve().name.lower()).strip("-")
    return (raw or "env")[:40].strip("-") or "env"
