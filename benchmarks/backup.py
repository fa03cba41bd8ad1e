"""Backups: full and incremental backup time and bytes written, restore time, against `qemu-img convert`.

A 1 GiB qcow2 disk holds 200 MiB of data; between the full and the incremental backup 4 MiB change (64 writes
of 64 KiB spread over the data). The backups run through corral's own engine code (corral.engine.backup) in a
qemu-storage-daemon, the path a stopped VM takes; a running VM runs the same block jobs inside its QEMU. Restore
is what `corral backup restore` does per disk: a flattened `qemu-img convert` of the chain, then `qemu-img check`.
The checksums each backup records when it is made (SHA-256 of its file) and `corral backup verify` of the
incremental backup (both files hashed and checked, the disk read whole through the chain) are timed too.

    python benchmarks/backup.py [--runs 3] [--data-mib 200] [--changed-mib 4]

Goal: an incremental backup writes about the changed data only. Medians on a shared 2-core host.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "src"))
from _common import median, print_table  # noqa: E402

from corral.engine import backup as engine_backup  # noqa: E402
from corral.engine import qemu_img  # noqa: E402
from corral.host.backup_jobs import read_back  # noqa: E402

MIB = 1 << 20


def _qemu_io(disk: Path, commands: list[str]) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(disk)], check=True, capture_output=True)


async def _backup(disk: Path, target: Path, backup_id: str, parent_id: str | None, work: Path) -> float:
    started = time.perf_counter()
    size = int(qemu_img.info(disk)["virtual-size"])
    if parent_id is None:
        qemu_img.create_blank(target, size)
    else:
        qemu_img.run(
            ["create", "-q", "-f", "qcow2", "-b", f"../{parent_id}/disk0.qcow2", "-F", "qcow2", str(target), str(size)]
        )
    async with engine_backup.StorageDaemon([disk], work / "qsd.sock") as daemon:
        run = engine_backup.BackupRun(
            daemon,
            [engine_backup.DiskCopy(node="disk0", target=target)],
            engine_backup.bitmap_name(backup_id),
            engine_backup.bitmap_name(parent_id) if parent_id else None,
        )
        if parent_id is not None:
            await engine_backup.check_parent_bitmap(daemon, ["disk0"], run.parent_bitmap or "")
        await engine_backup.open_targets(run, None)
        await engine_backup.start(run)
        await engine_backup.wait(run)
        await engine_backup.close_targets(run)
        await engine_backup.settle_bitmaps(run, True)
    return time.perf_counter() - started


def one_run(work: Path, data_mib: int, changed_mib: int) -> dict[str, float]:
    disk = work / "vm.qcow2"
    qemu_img.create_blank(disk, 1 << 30)
    _qemu_io(disk, [f"write -P 0x5a 0 {data_mib}M"])
    backups = work / "backups"
    (backups / "full").mkdir(parents=True)
    (backups / "inc").mkdir()
    full_target, inc_target = backups / "full" / "disk0.qcow2", backups / "inc" / "disk0.qcow2"
    full_s = asyncio.run(_backup(disk, full_target, "full", None, work))
    writes = changed_mib * 16  # 64 KiB each
    stride = data_mib * MIB // writes
    _qemu_io(disk, [f"write -P 0xa5 {i * stride} 64k" for i in range(writes)])
    inc_s = asyncio.run(_backup(disk, inc_target, "inc", "full", work))
    started = time.perf_counter()
    sums = []
    for path in (full_target, inc_target):  # as the agent does once a backup's file is written
        with path.open("rb") as handle:
            sums.append(hashlib.file_digest(handle, "sha256").hexdigest())
    checksum_s = time.perf_counter() - started
    started = time.perf_counter()
    problems, _ = read_back(
        [("full", full_target, sums[0]), ("inc", inc_target, sums[1])], [("inc", inc_target, 1 << 30)]
    )
    verify_s = time.perf_counter() - started
    if problems:
        raise SystemExit(f"verify found {problems}")
    restored = work / "restored.qcow2"
    started = time.perf_counter()
    qemu_img.copy_with_progress(inc_target, restored)
    qemu_img.check(restored)
    restore_s = time.perf_counter() - started
    same = subprocess.run(["qemu-img", "compare", "-q", str(disk), str(restored)]).returncode == 0
    if not same:
        raise SystemExit("the restored disk differs from the source")
    baseline = work / "convert.qcow2"
    started = time.perf_counter()
    qemu_img.run(["convert", "-O", "qcow2", str(disk), str(baseline)])
    convert_s = time.perf_counter() - started
    result = {
        "full_s": full_s,
        "full_mib": engine_backup.allocated_bytes(full_target) / MIB,
        "inc_s": inc_s,
        "inc_mib": engine_backup.allocated_bytes(inc_target) / MIB,
        "restore_s": restore_s,
        "checksum_s": checksum_s,
        "verify_s": verify_s,
        "convert_s": convert_s,
        "convert_mib": engine_backup.allocated_bytes(baseline) / MIB,
    }
    for path in (disk, restored, baseline):
        path.unlink()
    shutil.rmtree(backups)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-mib", type=int, default=200)
    parser.add_argument("--changed-mib", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="corral-bk-", dir="/var/tmp"))
    try:
        runs = [one_run(work, args.data_mib, args.changed_mib) for _ in range(args.runs)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = {key: median([r[key] for r in runs]) for key in runs[0]}
    print_table(
        f"1 GiB qcow2 disk, {args.data_mib} MiB of data, {args.changed_mib} MiB changed; median of {args.runs}",
        ["operation", "time (s)", "written (MiB)", "vs qemu-img convert"],
        [
            ["full backup", f"{m['full_s']:.2f}", f"{m['full_mib']:.1f}", f"{m['full_s'] / m['convert_s']:.2f}x"],
            ["incremental backup", f"{m['inc_s']:.3f}", f"{m['inc_mib']:.1f}", f"{m['inc_s'] / m['convert_s']:.2f}x"],
            [
                "restore (flatten chain + check)",
                f"{m['restore_s']:.2f}",
                "-",
                f"{m['restore_s'] / m['convert_s']:.2f}x",
            ],
            [
                "checksums recorded (both files)",
                f"{m['checksum_s']:.2f}",
                "-",
                f"{m['checksum_s'] / m['convert_s']:.2f}x",
            ],
            [
                "verify the incremental (whole chain)",
                f"{m['verify_s']:.2f}",
                "-",
                f"{m['verify_s'] / m['convert_s']:.2f}x",
            ],
            ["qemu-img convert (baseline)", f"{m['convert_s']:.2f}", f"{m['convert_mib']:.1f}", "1.00x"],
        ],
    )


if __name__ == "__main__":
    main()
