"""NoCloud seeds: the small read-only ISO that configures a cloud-init guest on its first boot.

cloud-init's NoCloud datasource looks for a filesystem labelled `cidata` holding `meta-data` (instance id and
hostname), `user-data` (what to do) and optionally `network-config`. Corral attaches one such volume per VM as a
read-only virtio disk. It is written with pycdlib rather than by shelling out to genisoimage/xorriso, so the host
needs no extra tools and the code can be unit-tested by reading the image back.

The user-data is always a `#cloud-config` that Corral controls (hostname, a C.UTF-8 locale, the default user with
sudo and the user's SSH keys), with the user's own cloud-config merged in, or their script run alongside it
through a MIME multipart document. cloud-init runs its per-instance modules once per *instance id*: a clone must
get a new one (Corral uses the VM's uuid) so it regenerates SSH host keys and takes its own hostname.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import struct
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from corral.errors import InvalidInput

#: The volume label cloud-init's NoCloud datasource searches for.
VOLUME_ID = "cidata"

#: Public key types sshd accepts in authorized_keys (the `sk-` ones are FIDO security keys).
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)

#: Locale every Corral guest gets: it exists in every glibc without generating anything, and cloud-init
#: fails its locale module if asked for one that does not exist.
LOCALE = "C.UTF-8"

#: Host key types cloud-init generates at first boot. RSA is left out: generating a 3072-bit RSA key takes
#: seconds under TCG, and every current ssh client accepts ed25519.
HOST_KEY_TYPES = ["ed25519", "ecdsa"]

#: user-data bigger than this is almost certainly a mistake (a binary or a whole log pasted in).
MAX_USER_DATA = 1 << 20

_HOSTNAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_USERNAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")

# ISO 9660 level-1 names (8.3, upper case) of each file; Rock Ridge and Joliet carry the real lowercase names,
# which are what Linux shows when it mounts the volume.
_ISO_NAMES = {"meta-data": "METADATA.;1", "user-data": "USERDATA.;1", "network-config": "NETWORKC.;1"}


# --- validation ---------------------------------------------------------------------------------------------


def validate_ssh_key(text: str) -> str:
    """Check that `text` is one SSH *public* key and return it normalized to `type base64 [comment]`.

    The key blob is decoded and its embedded type compared with the declared one, which catches truncated
    copy-pastes; private keys get their own message because pasting `id_ed25519` for `id_ed25519.pub` is the
    usual mistake.
    """
    stripped = text.strip()
    if "PRIVATE KEY" in stripped:
        raise InvalidInput(
            "this is a private SSH key, not a public one",
            "give the public half (the .pub file, e.g. ~/.ssh/id_ed25519.pub) and keep the private key secret",
        )
    if not stripped or "\n" in stripped:
        raise InvalidInput(
            "an SSH public key must be exactly one non-empty line",
            "give one key per entry, e.g. the contents of ~/.ssh/id_ed25519.pub",
        )
    parts = stripped.split(None, 2)
    key_type = parts[0]
    if key_type not in SSH_KEY_TYPES:
        raise InvalidInput(
            f"not an SSH public key (unknown key type {key_type[:40]!r})",
            f"a public key starts with one of {', '.join(SSH_KEY_TYPES[:3])}, ... as in ~/.ssh/id_ed25519.pub",
        )
    if len(parts) < 2:
        raise InvalidInput(f"the {key_type} key has no key data", "copy the whole line from the .pub file")
    _check_key_blob(key_type, parts[1])
    return " ".join(parts)


def _check_key_blob(key_type: str, blob_b64: str) -> None:
    """The base64 part must decode to an SSH wire-format blob that starts with the same key type."""
    hint = "copy the whole line from the .pub file; it may have been truncated or wrapped"
    if not _BASE64.fullmatch(blob_b64):
        raise InvalidInput(f"the {key_type} key data is not valid base64", hint)
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except binascii.Error as exc:
        raise InvalidInput(f"the {key_type} key data is not valid base64", hint) from exc
    if len(blob) < 4:
        raise InvalidInput(f"the {key_type} key data is too short", hint)
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != key_type.encode():
        raise InvalidInput(f"the key data does not belong to a {key_type} key", hint)


def validate_user_data(text: str) -> str:
    """Check user-data is a `#cloud-config` YAML mapping or a `#!` script; return it with a final newline.

    cloud-init silently ignores user-data it does not recognise, so a missing header or a YAML typo would
    otherwise surface only as a guest that "did nothing". Failing here names the problem at `vm create` time.
    """
    if len(text.encode()) > MAX_USER_DATA:
        raise InvalidInput(
            f"user-data is larger than {MAX_USER_DATA >> 10} KiB",
            "keep user-data to configuration and scripts; fetch large files from the guest instead",
        )
    body = text.lstrip("\ufeff")
    if not body.endswith("\n"):
        body += "\n"
    first_line = body.split("\n", 1)[0].rstrip()
    if first_line.startswith("#!"):
        return body
    if first_line == "#cloud-config":
        _parse_cloud_config(body)
        return body
    if _looks_like_mapping(body):
        raise InvalidInput(
            "user-data is YAML but does not start with the '#cloud-config' header line",
            "add '#cloud-config' as its first line (cloud-init ignores user-data without it)",
        )
    raise InvalidInput(
        "user-data is neither a cloud-config nor a script",
        "start it with a '#cloud-config' line followed by YAML, or with '#!' for a script (e.g. '#!/bin/sh')",
    )


def _parse_cloud_config(text: str) -> dict[str, Any]:
    """The mapping in a `#cloud-config` document; an empty document is an empty mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise InvalidInput(
            f"user-data is not valid YAML{where}: {problem}",
            "fix the YAML (check indentation and quote values containing ': ' or '#')",
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(
            f"the cloud-config in user-data must be a YAML mapping, not a {type(data).__name__}",
            "write it as 'key: value' lines, e.g. 'packages: [htop]'",
        )
    return data


def _looks_like_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def _validate_identity(instance_id: str, hostname: str, default_user: str) -> None:
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise InvalidInput(
            f"invalid instance id {instance_id!r}",
            "use 1-128 letters, digits, '.', '_', ':' or '-' (Corral uses the VM's uuid)",
        )
    if not _HOSTNAME.fullmatch(hostname):
        raise InvalidInput(
            f"invalid hostname {hostname!r}", "use 1-63 lowercase letters, digits or '-', starting with a letter"
        )
    if not _USERNAME.fullmatch(default_user) or default_user == "root":
        raise InvalidInput(
            f"invalid default user name {default_user!r}",
            "use a lowercase name of up to 32 characters such as 'corral' (root cannot be the default user)",
        )


# --- contents -----------------------------------------------------------------------------------------------


def meta_data(instance_id: str, hostname: str) -> str:
    """NoCloud meta-data: the instance id (a new one re-runs per-instance modules) and the hostname."""
    return yaml.safe_dump({"instance-id": instance_id, "local-hostname": hostname}, sort_keys=False)


def base_cloud_config(hostname: str, ssh_keys: list[str], password_login: bool, default_user: str) -> dict[str, Any]:
    """The cloud-config Corral always applies: identity, locale, the default user and SSH policy."""
    user: dict[str, Any] = {
        "name": default_user,
        "gecos": "Corral default user",
        "groups": ["sudo"],
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": not password_login,
    }
    if ssh_keys:
        user["ssh_authorized_keys"] = list(ssh_keys)
    return {
        "hostname": hostname,
        "fqdn": hostname,
        "manage_etc_hosts": True,
        "locale": LOCALE,
        "users": [user],
        "disable_root": True,
        "ssh_pwauth": password_login,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": list(HOST_KEY_TYPES),
    }


def merge_cloud_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge the user's cloud-config into Corral's: mappings recursively, lists appended, scalars replaced.

    Appending lists keeps both Corral's default user and the user's extra `users`, and runs both sets of
    `runcmd`; a scalar the user sets (even `hostname`) is their explicit choice and wins.
    """
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_cloud_config(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            merged[key] = old + value
        else:
            merged[key] = value
    return merged


def render_cloud_config(config: dict[str, Any]) -> str:
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def build_user_data(
    *, hostname: str, ssh_keys: list[str], user_data: str | None, password_login: bool, default_user: str
) -> str:
    """The user-data document: one merged `#cloud-config`, or a MIME multipart when the user gave a script."""
    keys = [validate_ssh_key(k) for k in ssh_keys]
    config = base_cloud_config(hostname, keys, password_login, default_user)
    if user_data is None:
        return render_cloud_config(config)
    text = validate_user_data(user_data)
    if text.startswith("#!"):
        return _multipart([(render_cloud_config(config), "cloud-config"), (text, "x-shellscript")])
    return render_cloud_config(merge_cloud_config(config, _parse_cloud_config(text)))


def _multipart(parts: list[tuple[str, str]]) -> str:
    """A MIME multipart user-data (cloud-init runs every part: the cloud-config and then the script)."""
    message = MIMEMultipart(boundary="corral-user-data-boundary")
    for index, (text, subtype) in enumerate(parts):
        part = MIMEText(text, subtype, "utf-8")
        part.add_header("Content-Disposition", "attachment", filename=f"part-{index:03d}")
        message.attach(part)
    return message.as_string() + "\n"


# --- the ISO ------------------------------------------------------------------------------------------------


def make_seed(
    path: Path,
    *,
    instance_id: str,
    hostname: str,
    ssh_keys: list[str],
    user_data: str | None,
    password_login: bool = False,
    default_user: str = "corral",
    network_config: dict[str, Any] | None = None,
) -> None:
    """Write the NoCloud seed ISO for one VM to `path` (atomically: a half-written seed never exists).

    `instance_id` must change whenever the disk is cloned (use the VM's uuid), `hostname` is the VM name,
    `ssh_keys` are public keys for `default_user`, and `user_data` is the user's own cloud-config or script
    (merged in). `network_config` (cloud-init network config v1 or v2) is written only when given; without it
    cloud-init brings the first NIC up with DHCP. Raises InvalidInput naming the bad input.
    """
    _validate_identity(instance_id, hostname, default_user)
    files = {
        "meta-data": meta_data(instance_id, hostname),
        "user-data": build_user_data(
            hostname=hostname,
            ssh_keys=ssh_keys,
            user_data=user_data,
            password_login=password_login,
            default_user=default_user,
        ),
    }
    if network_config is not None:
        if not isinstance(network_config, dict) or "version" not in network_config:
            raise InvalidInput("network-config must be a mapping with a 'version' key", "see cloud-init's docs")
        files["network-config"] = yaml.safe_dump(network_config, sort_keys=False)
    _write_iso(Path(path), files)


def _write_iso(path: Path, files: dict[str, str]) -> None:
    """An ISO 9660 image labelled `cidata` with Rock Ridge and Joliet names, so `user-data` keeps its case."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for name, text in files.items():
            data = text.encode()
            iso.add_fp(io.BytesIO(data), len(data), f"/{_ISO_NAMES[name]}", rr_name=name, joliet_path=f"/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            iso.write(str(tmp))
            tmp.chmod(0o444)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        iso.close()
