"""OVA export and import of a disk, against corral's own tar export, on plain files.

A 1 GiB qcow2 disk holds ``--data-mib`` of random data (incompressible, the worst case for streamOptimized's
compression); the rest reads as zeros. Timed per run: writing the corral tar (the qcow2 as it is), writing an
OVA (corral.host.appliance_jobs.write_ova: qemu-img convert to a streamOptimized VMDK, SHA-256, tar), and
importing the OVA's disk back (read_ova, the manifest's checksums, the VMDK checks, qemu-img convert to qcow2).

    python benchmarks/appliance.py [--runs 3] [--data-mib 128]

Medians on a shared 2-core host; the archive sizes are printed beside the times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "src"))
from _common import median, print_table  # noqa: E402

from corral.host.appliance_jobs import vmdk_to_qcow2, write_ova  # noqa: E402
from corral.spec.ovf import read_ova, verify_members  # noqa: E402

MIB = 1 << 20


def _disk(path: Path, data_mib: int) -> None:
    """A 1 GiB qcow2 whose first ``data_mib`` MiB are random (the rest reads as zeros)."""
    random = path.with_suffix(".rand")
    random.write_bytes(os.urandom(data_mib * MIB))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(random), str(path)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    random.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-mib", type=int, default=128)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"tar": [], "ova": [], "import": []}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-ova-") as tmp:
        work = Path(tmp)
        disk = work / "disk.qcow2"
        _disk(disk, args.data_mib)
        for run in range(args.runs):
            tar = work / f"vm{run}.tar"
            started = time.monotonic()
            with tarfile.open(tar, "w") as archive:
                archive.add(disk, "disks/disk0.qcow2")
            times["tar"].append(time.monotonic() - started)
            sizes["tar"] = tar.stat().st_size
            staging = work / f"staging{run}"
            staging.mkdir()
            ova = work / f"vm{run}.ova"
            started = time.monotonic()
            write_ova(ova, "bench", 1, 256 * MIB, [None], [disk], staging)
            times["ova"].append(time.monotonic() - started)
            sizes["ova"] = ova.stat().st_size
            started = time.monotonic()
            checked = read_ova(ova)
            verify_members(ova, checked)
            with tarfile.open(ova) as archive:
                archive.extract("bench-disk0.vmdk", staging, filter="data")
            vmdk_to_qcow2(staging / "bench-disk0.vmdk", staging / "back.qcow2", "disk")
            times["import"].append(time.monotonic() - started)
            for path in (tar, ova):
                path.unlink()
            subprocess.run(["rm", "-rf", str(staging)], check=True)
    print_table(
        f"OVA vs corral tar, 1 GiB disk with {args.data_mib} MiB of random data, median of {args.runs}",
        ["step", "seconds", "archive MiB", "vs tar"],
        [
            ["tar export (qcow2 as is)", f"{median(times['tar']):.2f}", f"{sizes['tar'] / MIB:.1f}", "1.00"],
            [
                "ova export (streamOptimized VMDK + SHA-256)",
                f"{median(times['ova']):.2f}",
                f"{sizes['ova'] / MIB:.1f}",
                f"{median(times['ova']) / median(times['tar']):.2f}",
            ],
            [
                "ova import (checks + convert to qcow2)",
                f"{median(times['import']):.2f}",
                "-",
                f"{median(times['import']) / median(times['tar']):.2f}",
            ],
        ],
    )


if __name__ == "__main__":
    main()
