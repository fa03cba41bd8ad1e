"""Reaping orphans: the daemon is a child subreaper, so processes that lose their parent (an image builder's
grandchildren, say) become its children and must be waited for here.

Only zombies that stay zombies across two passes are reaped, and never a QEMU we hold a Popen for: a
subprocess.run in another thread waits for its own child within microseconds, and taking its exit status
from it would turn a failure into a success.
"""

from __future__ import annotations

import os
from pathlib import Path


class Reaper:
    def __init__(self) -> None:
        self._seen: set[int] = set()

    def _zombie_children(self) -> set[int]:
        me = str(os.getpid())
        zombies = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and fields[1] == me:
                zombies.add(int(entry.name))
        return zombies

    def reap(self, keep: set[int]) -> list[int]:
        """Wait for zombies seen last time too; returns their pids."""
        zombies = self._zombie_children() - keep
        reaped = []
        for pid in zombies & self._seen:
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
            except ChildProcessError:
                pass
        self._seen = zombies - set(reaped)
        return reaped
