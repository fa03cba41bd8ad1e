"""NoCloud seeds: the ISO read back with pycdlib, the merged user-data, and input validation."""

from __future__ import annotations

import base64
import email
import io
import struct
from pathlib import Path

import pycdlib
import pytest
import yaml

from corral.errors import InvalidInput
from corral.images.cloudinit import make_seed, validate_ssh_key, validate_user_data


def _public_key(key_type: str = "ssh-ed25519", comment: str = "me@laptop") -> str:
    """A syntactically valid public key line (wire format: length-prefixed type, then key material)."""
    name = key_type.encode()
    blob = struct.pack(">I", len(name)) + name + struct.pack(">I", 32) + bytes(range(32))
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}"


ED25519 = _public_key()
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


def _read_seed(path: Path) -> tuple[str, dict[str, str]]:
    """(volume id, {rock ridge name: text}) of a seed ISO."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        volume_id = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue().decode()
        joliet = sorted(
            c.file_identifier().decode("utf-16_be")
            for c in iso.list_children(joliet_path="/")
            if not (c.is_dot() or c.is_dotdot())
        )
        assert joliet == sorted(files)
        return volume_id, files
    finally:
        iso.close()


def _cloud_config(text: str) -> dict:
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


# --- the seed image -----------------------------------------------------------------------------------------


def test_seed_files_volume_id_and_meta_data(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    make_seed(seed, instance_id="i-0123", hostname="web-1", ssh_keys=[ED25519], user_data=None)
    volume_id, files = _read_seed(seed)
    assert volume_id == "cidata"
    assert sorted(files) == ["meta-data", "user-data"]
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "i-0123", "local-hostname": "web-1"}


def test_default_user_data(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    make_seed(seed, instance_id="i-1", hostname="web-1", ssh_keys=[ED25519 + "\n"], user_data=None)
    config = _cloud_config(_read_seed(seed)[1]["user-data"])
    assert config["hostname"] == config["fqdn"] == "web-1"
    assert config["locale"] == "C.UTF-8"
    assert config["ssh_pwauth"] is False
    (user,) = config["users"]
    assert user["name"] == "corral"
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["ssh_authorized_keys"] == [ED25519]
    assert user["lock_passwd"] is True


def test_password_login_and_custom_user(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    make_seed(
        seed, instance_id="i-1", hostname="a", ssh_keys=[], user_data=None, password_login=True, default_user="ops"
    )
    config = _cloud_config(_read_seed(seed)[1]["user-data"])
    assert config["ssh_pwauth"] is True
    assert config["users"][0]["name"] == "ops"
    assert config["users"][0]["lock_passwd"] is False
    assert "ssh_authorized_keys" not in config["users"][0]


def test_user_cloud_config_is_merged(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    user_data = "#cloud-config\nruncmd:\n  - touch /tmp/x\npackages: [htop]\nusers:\n  - name: alice\ntimezone: UTC\n"
    make_seed(seed, instance_id="i-1", hostname="web-1", ssh_keys=[ED25519], user_data=user_data)
    config = _cloud_config(_read_seed(seed)[1]["user-data"])
    assert config["runcmd"] == ["touch /tmp/x"]
    assert config["packages"] == ["htop"]
    assert config["timezone"] == "UTC"
    assert [u["name"] for u in config["users"]] == ["corral", "alice"]  # lists are appended
    assert config["locale"] == "C.UTF-8" and config["hostname"] == "web-1"


def test_user_script_goes_into_a_multipart(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    script = "#!/bin/sh\necho hello > /root/hello\n"
    make_seed(seed, instance_id="i-1", hostname="web-1", ssh_keys=[ED25519], user_data=script)
    message = email.message_from_string(_read_seed(seed)[1]["user-data"])
    assert message.is_multipart()
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript"]
    assert _cloud_config(parts[0].get_payload(decode=True).decode())["hostname"] == "web-1"
    assert parts[1].get_payload(decode=True).decode() == script


def test_network_config_is_optional(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    network = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    make_seed(seed, instance_id="i-1", hostname="a", ssh_keys=[], user_data=None, network_config=network)
    files = _read_seed(seed)[1]
    assert yaml.safe_load(files["network-config"]) == network


def test_seed_is_replaced_atomically(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    make_seed(seed, instance_id="i-1", hostname="a", ssh_keys=[], user_data=None)
    make_seed(seed, instance_id="i-2", hostname="a", ssh_keys=[], user_data=None)  # a clone's new instance id
    assert yaml.safe_load(_read_seed(seed)[1]["meta-data"])["instance-id"] == "i-2"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"instance_id": "has space"}, "instance id"),
        ({"hostname": "Bad_Name"}, "hostname"),
        ({"default_user": "root"}, "default user"),
        ({"ssh_keys": [PRIVATE_KEY]}, "private SSH key"),
        ({"user_data": "runcmd: [ls]"}, "#cloud-config"),
    ],
)
def test_make_seed_rejects_bad_input(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    args = {"instance_id": "i-1", "hostname": "vm", "ssh_keys": [], "user_data": None, **kwargs}
    with pytest.raises(InvalidInput, match=fragment):
        make_seed(tmp_path / "seed.iso", **args)
    assert not (tmp_path / "seed.iso").exists()


# --- SSH keys -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp521"])
def test_public_keys_are_accepted(key_type: str) -> None:
    key = _public_key(key_type)
    assert validate_ssh_key(f"  {key}\n") == key


def test_key_without_comment_is_accepted() -> None:
    key = _public_key().rsplit(" ", 1)[0]
    assert validate_ssh_key(key) == key


def test_private_key_is_rejected_with_a_hint() -> None:
    with pytest.raises(InvalidInput, match="private SSH key") as info:
        validate_ssh_key(PRIVATE_KEY)
    assert info.value.hint and ".pub" in info.value.hint


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "one non-empty line"),
        ("hello world", "unknown key type"),
        ("ssh-ed25519", "no key data"),
        ("ssh-ed25519 !!!notbase64", "not valid base64"),
        ("ssh-ed25519 AAAA", "too short"),
        (_public_key("ssh-rsa").replace("ssh-rsa", "ssh-ed25519", 1), "does not belong"),
        (ED25519 + "\n" + ED25519, "one non-empty line"),
    ],
)
def test_garbage_keys_are_rejected(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        validate_ssh_key(text)


# --- user-data ----------------------------------------------------------------------------------------------


def test_valid_user_data_passes() -> None:
    assert validate_user_data("#cloud-config\nruncmd: [ls]") == "#cloud-config\nruncmd: [ls]\n"
    assert validate_user_data("#cloud-config\n") == "#cloud-config\n"
    assert validate_user_data("#!/bin/bash\necho hi\n") == "#!/bin/bash\necho hi\n"


def test_malformed_yaml_names_the_line() -> None:
    with pytest.raises(InvalidInput, match=r"not valid YAML at line 4, column \d+"):
        validate_user_data("#cloud-config\nruncmd:\n  - [unclosed\nfoo: bar\n")


def test_mapping_without_header_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="does not start with the '#cloud-config' header") as info:
        validate_user_data("packages: [htop]\n")
    assert info.value.hint and "first line" in info.value.hint


def test_cloud_config_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="must be a YAML mapping, not a list"):
        validate_user_data("#cloud-config\n- a\n- b\n")


def test_neither_config_nor_script_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="neither a cloud-config nor a script"):
        validate_user_data("just some words")


def test_huge_user_data_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="larger than"):
        validate_user_data("#!/bin/sh\n" + "#" * (2 << 20))
