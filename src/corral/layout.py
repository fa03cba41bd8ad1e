"""Where a host keeps things under CORRAL_HOME, and the guard that keeps user paths inside a pool.

At the bottom of the layers (beside paths.py): the agent lays files out this way, and the API reads the same
places on its own host (a VM's serial log for `vm logs`), so neither may own the convention alone."""

from __future__ import annotations

from pathlib import Path

from corral.errors import InvalidInput

SEARCH_ONLY = 0o711  # root's; other uids may pass through to a file they know the name of, never list
PRIVATE = 0o700


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
        """Make the home's directories with the modes isolation relies on (narrowing looser ones an older
        version made): sandboxed QEMUs (their own uids) pass through the home, images, pools and run to what is
        theirs or granted to them (search only: nobody lists another VM's files); logs are root's alone."""
        for path in (self.images, self.pool(), self.home / "run", self.logs):
            path.mkdir(parents=True, exist_ok=True)
        mode = self.home.stat().st_mode & 0o777
        if mode & 0o001 == 0:
            self.home.chmod(mode | 0o711)
        for path, wanted in (
            (self.images, SEARCH_ONLY),
            (self.home / "pools", SEARCH_ONLY),
            (self.pool(), SEARCH_ONLY),
            (self.home / "run", SEARCH_ONLY),
            (self.logs, PRIVATE),
        ):
            if path.stat().st_mode & 0o777 != wanted:
                path.chmod(wanted)


def pool_file(pool_dir: Path, relative: str) -> Path:
    """Like ``inside_pool`` but the last component is not resolved: the path names the pool's own entry, so
    creating it exclusively (O_EXCL) or unlinking it acts on that entry, never on what a link there points at."""
    root = pool_dir.resolve()
    candidate = root / relative
    parent = candidate.parent.resolve()
    if candidate.name in ("", ".", "..") or not parent.is_relative_to(root):
        raise InvalidInput(f"path {relative!r} escapes its storage pool", "use a plain file name inside the pool")
    return parent / candidate.name


def inside_pool(pool_dir: Path, relative: str) -> Path:
    """Resolve ``relative`` under the pool and refuse anything that would land outside it."""
    root = pool_dir.resolve()
    candidate = (root / relative).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise InvalidInput(f"path {relative!r} escapes its storage pool", "use a plain file name inside the pool")
    return candidate
