"""What a test holds: a VM by name, with exec through the guest agent and ssh where the image has it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from corral.errors import Conflict


@dataclass(frozen=True)
class ExecResult:
    """A finished command in the guest (``exit_code`` is None when a signal ended it)."""

    stdout: str
    stderr: str
    exit_code: int | None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class VM:
    """A VM a fixture made for one test (or one environment member)."""

    def __init__(self, corral: Any, name: str) -> None:
        self.corral = corral
        self.name = name

    def __repr__(self) -> str:
        return f"VM({self.name!r})"

    def info(self) -> dict[str, Any]:
        """The VM as the daemon sees it now (state, addresses, ports, spec)."""
        return self.corral.vm(self.name)

    @property
    def ip(self) -> str | None:
        """The address corral reserved for its first NIC on a corral network (None on the user network)."""
        return next((nic["ip"] for nic in self.info().get("nics", []) if nic.get("ip")), None)

    @property
    def addresses(self) -> list[str]:
        return [
            address.split("/")[0]
            for iface in self.info().get("interfaces", [])
            for address in iface.get("addresses", [])
            if ":" not in address and not address.startswith("127.")
        ]

    def exec(
        self, argv: list[str] | str, timeout: float = 60, stdin: str | None = None, check: bool = False
    ) -> ExecResult:
        """Run a command in the guest through its guest agent (a string runs through ``sh -c``)."""
        words = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        result = self.corral.exec_vm(self.name, words, timeout=timeout, stdin=stdin)
        outcome = ExecResult(result.get("stdout", ""), result.get("stderr", ""), result.get("exit_code"))
        if check and not outcome.ok:
            raise AssertionError(f"{' '.join(words)} exited {outcome.exit_code} in {self.name}: {outcome.stderr}")
        return outcome

    def ssh(
        self, argv: list[str] | str, user: str = "corral", identity: str | None = None, timeout: float = 60
    ) -> ExecResult:
        """Run a command over SSH through the VM's forwarded SSH port (images with sshd, such as debian)."""
        port = self.info().get("ports", {}).get("ssh")
        if not port:
            raise Conflict(f"VM {self.name} has no SSH port", "use an image with SSH (debian), or .exec() instead")
        if shutil.which("ssh") is None:
            raise Conflict("ssh is not installed", "apt-get install openssh-client")
        words = [
            "ssh",
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
        ]
        if identity:
            words += ["-i", identity, "-o", "IdentitiesOnly=yes"]
        command = argv if isinstance(argv, str) else subprocess.list2cmdline(argv)
        done = subprocess.run(
            [*words, f"{user}@127.0.0.1", command], capture_output=True, text=True, timeout=timeout, check=False
        )
        return ExecResult(done.stdout, done.stderr, done.returncode)
