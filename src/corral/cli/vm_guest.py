"""`corral vm exec|console|ssh`: into the guest, through its agent, its serial line or SSH."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, fail, print_json, run


def exec_cmd(
    name: str = typer.Argument(..., help="VM name."),
    command: list[str] = typer.Argument(..., help="Command and arguments, after --."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds the command may run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a command in the guest through its guest agent; exits with the command's exit code."""

    argv = command[1:] if command[:1] == ["--"] else command

    def action() -> int:
        with client() as corral:
            result = corral.exec_vm(name, argv, timeout=timeout)
        if as_json:
            print_json(result)
        else:
            sys.stdout.write(result.get("stdout", ""))
            sys.stderr.write(result.get("stderr", ""))
        if result.get("exit_code") is None:
            return 128 + int(result.get("signal") or 0)
        return int(result["exit_code"])

    code = run(action)
    raise typer.Exit(code)


def console(name: str) -> None:
    """Attach to the VM's serial console; Ctrl-] detaches."""
    from corral.cli.console import attach

    run(lambda: attach(name))


def _identity_for(keys: list[str]) -> Path | None:
    """The user's private key whose public half was given to the VM, found among the usual names."""
    wanted = {" ".join(key.split()[:2]) for key in keys}
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        private = Path.home() / ".ssh" / name
        public = private.with_suffix(".pub")
        if private.exists() and public.exists() and " ".join(public.read_text().split()[:2]) in wanted:
            return private
    return None


def _wait_for_sshd(port: int, timeout: float) -> bool:
    """Until the guest's sshd sends its banner: user-mode networking accepts connections before it listens."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                if conn.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def ssh(
    name: str = typer.Argument(..., help="VM name."),
    command: list[str] = typer.Argument(None, help="Command to run instead of a login shell, after --."),
    user: str = typer.Option("corral", "--user", "-u", help="Guest user (the image's default user)."),
    identity: Path = typer.Option(None, "--identity", "-i", help="Private key (default: the one matching the VM)."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the guest's SSH server."),
) -> None:
    """SSH into a VM: finds its forwarded port, the user and your key (like `multipass shell`)."""
    import os

    def action() -> dict[str, Any]:
        with client() as corral:
            return corral.vm(name)

    vm = run(action)
    port = vm.get("ports", {}).get("ssh")
    if vm["state"] != "running" or not port:
        fail(f"VM {name} has no SSH port", "its image must support SSH (e.g. debian) and the VM must be running")
    key = identity or _identity_for(vm["spec"].get("ssh_keys", []))
    if not _wait_for_sshd(port, timeout):
        fail(f"VM {name}'s SSH server did not answer within {timeout:.0f} s", f"see `corral vm logs {name}`")
    argv = [
        "ssh",
        "-p",
        str(port),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]
    if key is not None:
        argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    argv.append(f"{user}@127.0.0.1")
    words = command[1:] if command and command[0] == "--" else (command or [])
    try:
        os.execvp("ssh", argv + words)
    except FileNotFoundError:
        fail("ssh is not installed", "apt-get install openssh-client")
