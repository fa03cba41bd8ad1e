import pytest

from corral.engine.accel import choose_accel
from corral.errors import InvalidInput


@pytest.fixture
def host(tmp_path):
    modules = tmp_path / "module"
    modules.mkdir()
    dev = tmp_path / "kvm"
    dev.touch()
    return modules, dev


def test_software_kvm_device_alone_is_not_trusted(host):
    modules, dev = host
    (modules / "kvm").mkdir()
    (modules / "kvm_pvm").mkdir()
    assert choose_accel("auto", modules, dev) == "tcg"


def test_hardware_module_and_device_choose_kvm(host):
    modules, dev = host
    (modules / "kvm_intel").mkdir()
    assert choose_accel("auto", modules, dev) == "kvm"


def test_no_device_means_tcg_even_with_module(host, tmp_path):
    modules, _ = host
    (modules / "kvm_amd").mkdir()
    assert choose_accel("auto", modules, tmp_path / "missing") == "tcg"


def test_forcing_kvm_without_hardware_is_an_error(host):
    modules, dev = host
    with pytest.raises(InvalidInput):
        choose_accel("kvm", modules, dev)


def test_tcg_is_always_possible(host):
    modules, dev = host
    (modules / "kvm_intel").mkdir()
    assert choose_accel("tcg", modules, dev) == "tcg"
