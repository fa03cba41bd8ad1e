"""The orphan reaper reads only the daemon's own children (/proc/self/task/*/children) and still finds every
zombie: one started from the main thread, one started from a worker thread that is still alive, and one whose
thread has exited; never a pid it is told to keep, and only on the second pass that sees it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from corral.host.reaper import Reaper


def _spawn() -> int:
    return os.posix_spawn("/bin/true", ["true"], dict(os.environ))


def _zombie(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, f"{pid} did not exit"
        time.sleep(0.01)  # a process's exit has no event we can wait on without reaping it


def test_zombies_of_every_thread_are_reaped_on_the_second_pass_and_kept_ones_never() -> None:
    main_child, kept = _spawn(), _spawn()
    from_thread: list[int] = []
    release = threading.Event()

    def worker() -> None:
        from_thread.append(_spawn())
        release.wait(60)

    alive = threading.Thread(target=worker)
    alive.start()
    gone = threading.Thread(target=lambda: from_thread.append(_spawn()))
    gone.start()
    gone.join()
    while len(from_thread) < 2:
        time.sleep(0.01)
    try:
        children = [main_child, kept, *from_thread]
        for pid in children:
            _zombie(pid)
        reaper = Reaper()
        first = reaper.reap(keep={kept})  # seen once: a subprocess.run elsewhere may be about to wait for it
        assert not set(children) & set(first)
        second = set(reaper.reap(keep={kept}))  # other tests' leftover zombies may be reaped too
        assert {main_child, *from_thread} <= second and kept not in second
        for pid in (main_child, *from_thread):
            assert not Path(f"/proc/{pid}").exists()
        assert Path(f"/proc/{kept}").exists()
    finally:
        release.set()
        alive.join()
        os.waitpid(kept, 0)
