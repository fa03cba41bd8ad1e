"""What a user gives a VM's first boot: SSH public keys and cloud-init user-data, checked once, here.

cloud-init silently ignores what it does not understand, so these checks are what turns a typo into an error
at `vm create` time instead of a guest that "did nothing".
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Any

import yaml

from corral.errors import InvalidInput

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

#: user-data bigger than this is almost certainly a mistake (a binary or a whole log pasted in).
MAX_USER_DATA = 1 << 20

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


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
        parse_cloud_config(body)
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


def parse_cloud_config(text: str) -> dict[str, Any]:
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
