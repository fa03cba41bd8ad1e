"""Where a host keeps things under CORRAL_HOME, and the guard that keeps user paths inside a pool."""

from __future__ import annotations

from pathlib import Path

from corral.errors import InvalidInput


class HostLayout:
    def __init__(self, home: Path) -> None:
        self.home = home

    @property
    def images(self) -> Path:
        return self.home / "images"

    def image_dir(self, image_id: str) -> Path:
        return self.images / image_id

    def pool(self, name: str = "default") -> Path:
        return self.home / "pools" / name

    def vm_run_dir(self, vm_id: str) -> Path:
        # Short on purpose: unix socket paths are limited to 107 bytes.
        return self.home / "run" / vm_id[:12]

    def ram_file(self, vm_id: str) -> Path:
        """Guest RAM of a forkable VM: in /dev/shm (tmpfs) so it never costs disk writes."""
        shm = Path("/dev/shm")
        if shm.is_dir():
            return shm / f"corral-{vm_id[:16]}.ram"
        return self.vm_run_dir(vm_id) / "ram"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def ensure(self) -> None:
        for path in (self.images, self.pool(), self.home / "run", self.logs):
            path.mkdir(parents=True, exist_ok=True)
        # Sandboxed QEMUs (their own uids) must be able to pass through the home to their run dirs and disks.
        mode = self.home.stat().st_mode & 0o777
        if mode & 0o001 == 0:
            self.home.chmod(mode | 0o711)


def inside_pool(pool_dir: Path, relative: str) -> Path:
    """Resolve ``relative`` under the pool and refuse anything that would land outside it."""
    root = pool_dir.resolve()
    candidate = (root / relative).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise InvalidInput(f"path {relative!r} escapes its storage pool", "use a plain file name inside the pool")
    return candidate
