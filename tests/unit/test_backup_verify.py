"""The read-back of `backup verify` (corral.host.backup_jobs.read_back) on real qcow2 files: sound chains pass;
flipped data bytes, a missing file and damaged metadata are each caught and named."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.host.backup_jobs import read_back

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
SIZE = 16 << 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    full, inc = tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(full), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 4M", str(full)], check=True, capture_output=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", full.name, "-F", "qcow2", str(inc), str(SIZE)], check=True
    )
    subprocess.run(["qemu-io", "-c", "write -P 0xa5 1M 64k", str(inc)], check=True, capture_output=True)
    return full, inc


def _verify(full: Path, inc: Path, sums: list[str]) -> list[str]:
    problems, _ = read_back([("full", full, sums[0]), ("inc", inc, sums[1])], [("inc", inc, SIZE)])
    return problems


def test_a_sound_chain_passes(chain: tuple[Path, Path]) -> None:
    full, inc = chain
    problems, hashed = read_back([("full", full, _sha(full)), ("inc", inc, _sha(inc))], [("inc", inc, SIZE)])
    assert problems == [] and hashed == full.stat().st_size + inc.stat().st_size


def test_flipped_data_bytes_are_caught_by_the_checksum(chain: tuple[Path, Path]) -> None:
    full, inc = chain
    sums = [_sha(full), _sha(inc)]
    data = bytearray(full.read_bytes())
    at = len(data) // 2
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    full.write_bytes(bytes(data))
    assert subprocess.run(["qemu-img", "check", "-q", str(full)]).returncode == 0  # qcow2 itself sees nothing
    problems = _verify(full, inc, sums)
    assert len(problems) == 1 and problems[0].startswith("full: SHA-256"), problems


def test_a_missing_file_and_broken_metadata_are_named(chain: tuple[Path, Path]) -> None:
    full, inc = chain
    sums = [_sha(full), _sha(inc)]
    full.unlink()
    assert _verify(full, inc, sums)[0] == "full: its file is missing"
    inc.write_bytes(b"QFI\xfb" + b"\0" * 100)  # a qcow2 magic and nothing sound after it
    problems, _ = read_back([("inc", inc, None)], [("inc", inc, SIZE)])
    assert problems and problems[0].startswith("inc: qemu-img check failed"), problems
