"""What the API accepts for each verb, validated before the control plane looks at the store."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from corral.errors import InvalidInput
from corral.spec.firmware import Firmware, parse_firmware
from corral.spec.names import validate_name
from corral.spec.sizes import parse_size
from corral.spec.vm import VMSpec


def size_in_bytes(value: object) -> int:
    if isinstance(value, (str, int)):
        return parse_size(value)
    raise InvalidInput(f"invalid size {value!r}", "write a size such as 1G")


class VMCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: VMSpec
    volumes: list[str] = Field(default_factory=list, description="existing volumes to attach, in order")
    start: bool = False
    wait: bool = False
    ready_timeout: float | None = Field(default=None, gt=0, le=86400)
    host: str | None = None
    template: str | None = None
    # Placement hints (see corral.cluster.placement): an affinity group and its policy, an accelerator to require.
    group: str | None = None
    policy: Literal["affinity", "anti-affinity"] | None = None
    accel: Literal["kvm", "tcg"] | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "host name")

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "group name")

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[str]) -> list[str]:
        for name in value:
            validate_name(name, "volume name")
        if len(set(value)) != len(value):
            raise InvalidInput("a volume is listed twice", "attach each volume once")
        return value


class VMStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait: bool = False
    ready_timeout: float | None = Field(default=None, gt=0, le=86400)


class VMStop(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False
    timeout: float | None = Field(default=None, gt=0, le=3600)


class VMRestart(VMStop):
    wait: bool = False


class VMDelete(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_disks: bool = False
    force: bool = False


class VMExec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    argv: list[str] = Field(min_length=1)
    timeout: float = Field(default=60, gt=0, le=86400)
    stdin: str | None = None

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise InvalidInput("the command is empty", "pass a command after --")
        return value


class ImageBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str = "tiny"
    name: str | None = None
    release: str | None = None  # debian
    packages: list[str] = Field(default_factory=list)  # debian
    size: Annotated[int, BeforeValidator(size_in_bytes)] | None = None  # debian root disk


class ImageImport(BaseModel):
    """Each of the disk, the kernel and the initrd comes from a file or an upload (corral.spec.sources): a file is
    a host path (the local admin only) or a plain name in the import directory; an upload is an id from
    ``POST /uploads``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    file: str | None = Field(default=None, max_length=4096)
    upload: str | None = None
    format: Literal["raw", "qcow2"] | None = Field(
        default=None, description="the disk's format; None: qcow2 if it starts with qcow2's magic, else raw"
    )
    kernel: str | None = Field(default=None, max_length=4096)
    kernel_upload: str | None = None
    initrd: str | None = Field(default=None, max_length=4096)
    initrd_upload: str | None = None
    cmdline: str | None = None
    cloud_init: bool = False
    firmware: Annotated[Firmware | None, BeforeValidator(parse_firmware)] = None  # what the disk boots through

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "image name")


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: Annotated[int, BeforeValidator(size_in_bytes)]
    pool: str = "default"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "volume name")


class VolumeResize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: Annotated[int, BeforeValidator(size_in_bytes)]


class VMClone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    linked: bool = False
    from_snapshot: str | None = None
    start: bool = False
    wait: bool = False


class TemplateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source: str


class VMFork(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    count: int = 1
    wait: bool = True  # the job ends when the children answer with their new identity; False: when they run
    # An isolated copy (`corral env fork --isolated`): NICs moved to other networks (old name -> new name), keeping
    # their MACs and the guest's addresses (docs/environments.md).
    networks: dict[str, str] = {}
    keep_macs: bool = False
