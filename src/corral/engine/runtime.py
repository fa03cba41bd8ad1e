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
    return _is_running(record.pid)


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _argv_of(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def qemu_processes_under(run_root: Path) -> dict[int, Path]:
    """Live QEMU processes whose QMP socket lies in a run directory under ``run_root``, by pid -> run dir.

    This finds every QEMU an installation started, runtime record or not: an agent killed between starting
    QEMU and writing its record would otherwise leave a process nobody knows, holding the VM's disk locks."""
    prefix = f"unix:{run_root}/"
    found: dict[int, Path] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _argv_of(int(entry.name))
        if not argv or "qemu-system" not in Path(argv[0]).name or "-qmp" not in argv:
            continue
        qmp = argv[argv.index("-qmp") + 1] if argv.index("-qmp") + 1 < len(argv) else ""
        if not qmp.startswith(prefix):
            continue
        socket = Path(qmp.removeprefix("unix:").split(",", 1)[0])
        if _is_running(int(entry.name)):
            found[int(entry.name)] = socket.parent
    return found


def record_of_process(pid: int, run_dir: Path) -> RuntimeRecord | None:
    """Rebuild the runtime record of a QEMU found running without one, from its command line (the socket and
    log names are the launch plan's fixed names in its run directory); None when it is gone or not ours."""
    argv, ticks = _argv_of(pid), process_start_ticks(pid)
    if not argv or ticks is None or "-uuid" not in argv or "-name" not in argv:
        return None
    uuid = argv[argv.index("-uuid") + 1]
    name_opts = dict(part.partition("=")[::2] for part in argv[argv.index("-name") + 1].split(","))
    return RuntimeRecord(
        name=name_opts.get("guest", ""),
        uuid=uuid,
        pid=pid,
        argv=argv,
        start_ticks=ticks,
        qmp_socket=run_dir / "qmp.sock",
        console_socket=run_dir / "console.sock",
        guest_agent_socket=run_dir / "qga.sock" if any("qga.sock" in arg for arg in argv) else None,
        serial_log=run_dir / "serial.log",
        stderr_log=run_dir / "qemu.log",
    )
