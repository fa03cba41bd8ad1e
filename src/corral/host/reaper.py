"""Reaping orphans: the daemon is a child subreaper, so processes that lose their parent (an image builder's
grandchildren, say) become its children and must be waited for here.

Only zombies that stay zombies across two passes are reaped, and never a QEMU we hold a Popen for: a
subprocess.run in another thread waits for its own child within microseconds, and taking its exit status
from it would turn a failure into a success.

A pass reads only the daemon's own children, from /proc/self/task/*/children (one file per thread: an orphan is
re-parented to one of the subreaper's threads, and a child started from a worker thread is listed under that
thread), not every process on the host: with 30 VMs and their helpers that is a few dozen small reads, not
thousands. A kernel without CONFIG_PROC_CHILDREN falls back to scanning /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TASKS = Path("/proc/self/task")


def _children() -> Iterable[int] | None:
    """The pids of this process's children, from every thread's children file; None if the kernel has none."""
    pids: set[int] = set()
    try:
        tasks = list(_TASKS.iterdir())
    except OSError:
        return None
    found_file = False
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:
            continue  # the thread exited, or the kernel has no children file
        except OSError:
            continue
        found_file = True
        pids.update(int(pid) for pid in text.split())
    return pids if found_file else None


def _all_pids() -> Iterable[int]:
    return (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())


class Reaper:
    def __init__(self) -> None:
        self._seen: set[int] = set()

    def _zombie_children(self, keep: set[int] | frozenset[int] = frozenset()) -> set[int]:
        """Zombies among this process's children, not reading the state of those in ``keep`` (the QEMUs, nearly
        every child: their exits are the agent's, through their pidfds)."""
        me = str(os.getpid())
        candidates = _children()
        if candidates is None:
            candidates = _all_pids()
        zombies = set()
        for pid in candidates:
            if pid in keep:
                continue
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and fields[1] == me:
                zombies.add(pid)
        return zombies

    def reap(self, keep: set[int]) -> list[int]:
        """Wait for zombies seen last time too; returns their pids."""
        zombies = self._zombie_children(keep)
        reaped = []
        for pid in zombies & self._seen:
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
            except ChildProcessError:
                pass
        self._seen = zombies - set(reaped)
        return reaped
