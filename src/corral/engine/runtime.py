"""The runtime record: what a running QEMU is, written next to it so a restarted agent adopts it.

Ganeti's idea: the daemon is not the owner of a VM's life. QEMU outlives it, and the record (argv, pid, start
time, sockets) is enough to find the same process again and to refuse a stranger that reuses its pid.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel


class RuntimeRecord(BaseModel):
    name: str
    uuid: str
    pid: int
    argv: list[str]
    # Kernel start time of the process in clock ticks since boot; with the pid it identifies one process.
    start_ticks: int
    qmp_socket: Path
    console_socket: Path
    guest_agent_socket: Path | None
    serial_log: Path
    stderr_log: Path

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RuntimeRecord | None:
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError):
            return None


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat; None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def is_same_process(record: RuntimeRecord) -> bool:
    """True when the recorded pid is still the QEMU we launched, not a recycled pid or a zombie."""
    ticks = process_start_ticks(record.pid)
    if ticks is None or ticks != record.start_ticks:
        return False
    try:
        state = Path(f"/proc/{record.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
