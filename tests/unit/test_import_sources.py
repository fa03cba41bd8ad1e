"""Where imports read from (corral.spec.sources) and what qemu-img may be shown (engine.qemu_img.check_importable):
real files, links and qcow2 images made by qemu-img; no daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.engine import qemu_img
from corral.errors import Forbidden, InvalidInput, NotFound
from corral.spec.sources import Origin, SourceKind, opened, plain_name, resolve

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    home, imports = tmp_path / "home", tmp_path / "imports"
    (imports / "pa").mkdir(parents=True)
    (imports / "pa" / "disk.img").write_bytes(b"\0" * 4096)
    (imports / "pa" / "link").symlink_to("/etc/hostname")
    os.mkfifo(imports / "pa" / "fifo")
    (home / "uploads" / "pa").mkdir(parents=True)
    (home / "uploads" / "pa" / ("a" * 32)).write_bytes(b"up")
    return {"home": home, "imports": imports}


def test_remote_callers_never_reach_a_host_path(places: dict[str, Path]) -> None:
    remote = Origin(places["home"], places["imports"], local=False)
    for path in ("/etc/shadow", "/nonexistent", "../pb/x", "a/b"):
        with pytest.raises(Forbidden) as refused:
            resolve(remote, "pa", file=path, upload=None, what="image file")
        assert path not in refused.value.message  # the same answer whether it exists or not
    assert resolve(remote, "pa", file="disk.img", upload=None, what="image file").kind is SourceKind.IMPORT_DIR
    assert resolve(remote, "pa", file=None, upload="a" * 32, what="image file").kind is SourceKind.UPLOAD
    with pytest.raises(NotFound):
        resolve(remote, "pb", file=None, upload="a" * 32, what="image file")  # another project's upload
    for name, error in (("link", InvalidInput), ("fifo", InvalidInput), ("..", InvalidInput), ("nope", NotFound)):
        with pytest.raises(error):
            resolve(remote, "pa", file=name, upload=None, what="image file")
    with pytest.raises(InvalidInput):
        resolve(Origin(places["home"], None, local=False), "pa", file="disk.img", upload=None, what="x")


def test_the_local_admin_keeps_path_imports(places: dict[str, Path]) -> None:
    local = Origin(places["home"], None, local=True)
    source = resolve(local, "default", file="/etc/hostname", upload=None, what="image file")
    assert source.kind is SourceKind.PATH
    with opened(source) as (fd, path):
        assert os.read(fd, 1) and str(path).startswith("/proc/self/fd/")
    for bad in ("relative.img", "/nonexistent/x"):
        with pytest.raises(InvalidInput):
            resolve(local, "default", file=bad, upload=None, what="image file")


def test_plain_names() -> None:
    assert plain_name("disk.img") == "disk.img"
    for bad in ("", ".", "..", "a/b", "x\0y", "x" * 256):
        with pytest.raises(InvalidInput):
            plain_name(bad)


@needs_qemu_img
@pytest.mark.parametrize(
    "options,words",
    [
        (["-b", "/etc/shadow", "-F", "raw", "-u"], "backing file"),
        (["-o", "data_file={tmp}/data.raw"], "external data file"),
        (["-o", "data_file={tmp}/data.raw,data_file_raw=on"], "external data file"),
        (["-o", "compat=0.10", "-b", "/etc/shadow", "-F", "raw", "-u"], "backing file"),
    ],
)
def test_qcow2_that_points_at_another_file_is_refused_before_qemu_img_opens_it(
    tmp_path: Path, options: list[str], words: str
) -> None:
    disk = tmp_path / "x.qcow2"
    args = [option.replace("{tmp}", str(tmp_path)) for option in options]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(disk), "64M"], check=True)
    problem = qemu_img.qcow2_header_problem(disk.read_bytes()[: 1 << 16])
    assert problem is not None and words in problem
    with pytest.raises(InvalidInput, match=words):
        qemu_img.check_importable(disk, fmt="qcow2", label="x")


@needs_qemu_img
def test_formats_are_given_never_probed(tmp_path: Path) -> None:
    qcow2 = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    assert qemu_img.qcow2_header_problem(qcow2.read_bytes()[: 1 << 16]) is None
    assert qemu_img.check_importable(qcow2)["format"] == "qcow2"
    with pytest.raises(InvalidInput, match="given as raw"):
        qemu_img.check_importable(qcow2, fmt="raw")
    vmdk = tmp_path / "d.vmdk"
    vmdk.write_bytes(b'# Disk DescriptorFile\nRW 2 FLAT "/etc/shadow" 0\n'.ljust(1 << 20, b"\0"))
    assert qemu_img.check_importable(vmdk)["format"] == "raw"  # a raw disk of those bytes, nothing more
    with pytest.raises(InvalidInput, match="cannot be imported"):
        qemu_img.check_importable(vmdk, fmt="vmdk")
