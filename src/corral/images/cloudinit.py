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

import io
import os
import re
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from corral.errors import InvalidInput
from corral.spec.firstboot import (  # noqa: F401 - re-exported for callers of this module
    MAX_USER_DATA,
    SSH_KEY_TYPES,
    parse_cloud_config,
    validate_ssh_key,
    validate_user_data,
)

#: The volume label cloud-init's NoCloud datasource searches for.
VOLUME_ID = "cidata"

#: Locale every Corral guest gets: it exists in every glibc without generating anything, and cloud-init
#: fails its locale module if asked for one that does not exist.
LOCALE = "C.UTF-8"

#: Host key types cloud-init generates at first boot. RSA is left out: generating a 3072-bit RSA key takes
#: seconds under TCG, and every current ssh client accepts ed25519.
HOST_KEY_TYPES = ["ed25519", "ecdsa"]

_HOSTNAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_USERNAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# ISO 9660 level-1 names (8.3, upper case) of each file; Rock Ridge and Joliet carry the real lowercase names,
# which are what Linux shows when it mounts the volume.
_ISO_NAMES = {"meta-data": "METADATA.;1", "user-data": "USERDATA.;1", "network-config": "NETWORKC.;1"}


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
    return render_cloud_config(merge_cloud_config(config, parse_cloud_config(text)))


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
