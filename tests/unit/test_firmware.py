"""Firmware choice (bios/uefi): parsing, precedence, the OVMF check and each VM's own UEFI variable store."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.cluster.requests import ImageImport
from corral.config import Settings, load_settings
from corral.errors import Conflict, InvalidInput
from corral.host.firmware import VARS_FILE, check_machine, ovmf_files, uefi_firmware
from corral.spec.firmware import Firmware, effective_firmware, parse_firmware
from corral.spec.vm import VMSpec


@pytest.mark.parametrize(("text", "expected"), [("bios", Firmware.BIOS), ("UEFI", Firmware.UEFI), (None, None)])
def test_parse_firmware(text, expected):
    assert parse_firmware(text) == expected


@pytest.mark.parametrize("bad", ["efi", "", "seabios", 1])
def test_unknown_firmware_is_one_clear_error(bad):
    with pytest.raises(InvalidInput) as caught:
        parse_firmware(bad)
    assert "unknown firmware" in caught.value.message and "bios" in caught.value.hint and "uefi" in caught.value.hint


def test_unknown_firmware_is_refused_by_the_vm_spec_and_the_import_request():
    with pytest.raises(InvalidInput, match="unknown firmware 'efi'"):
        VMSpec(name="a", image="b", firmware="efi")
    with pytest.raises(InvalidInput, match="unknown firmware 'bois'"):
        ImageImport(name="a", file="/x.img", firmware="bois")
    assert VMSpec(name="a", image="b", firmware="UEFI").model_dump(mode="json")["firmware"] == "uefi"
    assert VMSpec(name="a", image="b").firmware is None


def test_the_vm_overrides_the_image_which_overrides_the_default():
    assert effective_firmware(None, {}) == Firmware.BIOS
    assert effective_firmware(None, None) == Firmware.BIOS
    assert effective_firmware(None, {"firmware": "uefi"}) == Firmware.UEFI
    assert effective_firmware("bios", {"firmware": "uefi"}) == Firmware.BIOS
    assert effective_firmware(Firmware.UEFI, {"cloud_init": True}) == Firmware.UEFI


def test_missing_ovmf_names_the_package_to_install(tmp_path):
    settings = Settings(home=tmp_path, ovmf_code=tmp_path / "nope" / "OVMF_CODE_4M.fd")
    with pytest.raises(Conflict) as caught:
        ovmf_files(settings)
    assert "UEFI firmware is not installed" in caught.value.message
    assert "install the ovmf package" in caught.value.hint
    with pytest.raises(Conflict):
        uefi_firmware(settings, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing made for a VM that cannot boot


def test_ovmf_paths_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_OVMF_CODE", str(tmp_path / "code.fd"))
    monkeypatch.setenv("CORRAL_OVMF_VARS", str(tmp_path / "vars.fd"))
    settings = load_settings(tmp_path)
    assert settings.ovmf_code == tmp_path / "code.fd" and settings.ovmf_vars == tmp_path / "vars.fd"


def test_microvm_cannot_boot_uefi():
    with pytest.raises(InvalidInput, match="microvm"):
        check_machine("microvm")
    check_machine("q35")
    check_machine("pc-i440fx-7.2")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_each_vm_gets_its_own_qcow2_vars_made_once_from_the_template(tmp_path):
    template = tmp_path / "OVMF_VARS_4M.fd"
    template.write_bytes(b"\x5a" * 540672)  # OVMF_VARS_4M.fd's size; the content is opaque to corral
    code = tmp_path / "OVMF_CODE_4M.fd"
    code.write_bytes(b"\0" * 4096)
    settings = Settings(home=tmp_path, ovmf_code=code, ovmf_vars=template)
    run_dir = tmp_path / "run" / "vm1"
    uefi = uefi_firmware(settings, run_dir)
    assert uefi.code == code and uefi.vars == run_dir / VARS_FILE and uefi.vars_format == "qcow2"
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(uefi.vars)], check=True, capture_output=True, text=True
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 540672
    assert uefi.vars.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in run_dir.iterdir()] == [VARS_FILE]  # no temporary file left
    # A guest's writes survive the next start: the store is made only when missing.
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4096", str(uefi.vars)], check=True, capture_output=True)
    uefi_firmware(settings, run_dir)
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(uefi.vars), str(raw)], check=True)
    assert raw.read_bytes()[:4096] == b"\x11" * 4096
    assert uefi_firmware(settings, tmp_path / "run" / "vm2").vars != uefi.vars
    assert template.read_bytes() == b"\x5a" * 540672  # the template itself is never written


def test_ovmf_default_paths_are_debians():
    settings = Settings()
    assert settings.ovmf_code == Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    assert settings.ovmf_vars == Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
