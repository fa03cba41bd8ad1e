"""Entry point. A command's module is imported only when that command runs (`corral vm list` loads cli/vm.py and
what registers onto it, nothing else), and `corral --help` lists the commands from the table below without
importing any of them: Typer and Rich are the floor of every start. Heavy libraries (httpx, FastAPI,
SQLAlchemy) are imported inside commands for the same reason."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import typer
from typer import _click
from typer.core import TyperCommand, TyperGroup

from corral import __version__


def _sub_app(module: str, name: str, *also: Callable[[typer.Typer], None]) -> Callable[[typer.Typer], None]:
    def register(root: typer.Typer) -> None:
        sub = importlib.import_module(f"corral.cli.{module}").app
        for extra in also:
            extra(sub)
        root.add_typer(sub, name=name)

    return register


def _registered(module: str) -> Callable[[typer.Typer], None]:
    return lambda root: importlib.import_module(f"corral.cli.{module}").register(root)


def _onto(module: str, function: str) -> Callable[[typer.Typer], None]:
    """Commands another module adds to a sub-app (`vm export` comes from cli/backup.py)."""
    return lambda sub: getattr(importlib.import_module(f"corral.cli.{module}"), function)(sub)


# Every top-level command: its name, the first paragraph of its help (what `corral --help` shows; the unit test
# tests/unit/test_cli_startup.py checks it against the command itself) and how to load it. Order is the order
# of `corral --help`.
_LOADERS: dict[str, Callable[[typer.Typer], None]] = {
    "serve": _registered("serve"),
    "access": _registered("access"),
    "agent": _registered("agent"),
    "ui": _registered("ui"),
    "env": _registered("env"),
    "vm": _sub_app("vm", "vm", _onto("backup", "register_vm_commands"), _onto("pool", "register_vm_commands")),
    "image": _sub_app("image", "image"),
    "volume": _sub_app("volume", "volume"),
    "snapshot": _sub_app("snapshot", "snapshot"),
    "backup": _sub_app("backup", "backup"),
    "template": _sub_app("template", "template"),
    "job": _sub_app("job", "job"),
    "host": _sub_app("host", "host", _onto("pool", "register_host_commands")),
    "pool": _sub_app("pool", "pool"),
    "network": _sub_app("network", "network"),
}
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "Run the daemon: the API, the store and this host's agent. VMs keep running when it stops."),
    "shutdown": ("serve", "Stop the daemon on this CORRAL_HOME (VMs keep running and are adopted on the next start)."),
    "audit": ("access", "The audit log: who changed what, when, and how it ended (newest first)."),
    "events": (
        "access",
        "State changes and job steps; with --follow, as they happen (one JSON object a line with --json).",
    ),
    "agent": (
        "agent",
        "Run only this host's agent (no API): it registers the host, heartbeats and runs the jobs placed here.",
    ),
    "ui": ("ui", "Print a one-time login link (valid for a minute) to the web console at /ui/, as the local admin."),
    "up": ("env", "Create or start what is missing and provision once; a second `up` changes nothing."),
    "status": ("env", "What exists of the file's VMs and networks."),
    "diff": ("env", "What `up` would change; exits 1 when that is something (like `git diff --exit-code`)."),
    "down": ("env", "Stop the environment's VMs (disks kept), or delete everything it made with --destroy."),
    "scale": ("env", "Set a group's size: new members are forks of a running one; removal takes the newest first."),
    "vm": ("vm", "Create, run and manage VMs."),
    "image": ("image", "Build, import and remove images."),
    "volume": ("volume", "Create, resize and delete volumes."),
    "snapshot": ("snapshot", "Create, list, revert and delete snapshots."),
    "backup": ("backup", "Back up VMs (full or incremental, running or stopped) and restore them."),
    "template": ("template", "Create, list and delete templates."),
    "job": ("job", "List, follow and cancel jobs."),
    "host": ("host", "Hosts and their capacity (cluster-wide roles only)."),
    "pool": ("pool", "The pool of hosts as a whole."),
    "network": ("network", "Create, list and delete virtual networks."),
    "project": ("access", "Projects (tenants) and their quotas."),
    "user": ("access", "Users who hold API tokens."),
    "token": ("access", "API tokens: one user, one project, one role."),
    "remote": ("access", "Corral servers this CLI talks to (like `incus remote`)."),
    "env": ("env", "Environments made from a corral.yaml."),
}


def load_commands(loader: str) -> dict[str, _click.Command]:
    """The click commands one loader makes, built exactly as an eager `app.add_typer`/`register` would."""
    holder = typer.Typer()
    _LOADERS[loader](holder)
    group = typer.main.get_group(holder)
    return dict(group.commands)


class LazyGroup(TyperGroup):
    """The root group: every command starts as a placeholder carrying its help line; the first lookup that is not
    for the help listing imports the command's module and swaps in the real command."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._listing = False
        self._loaded: set[str] = set()
        for name, (_loader, help_line) in COMMANDS.items():
            self.commands.setdefault(name, TyperCommand(name, help=help_line))

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is not None and not self._listing and entry[0] not in self._loaded:
            self._loaded.add(entry[0])
            self.commands.update(load_commands(entry[0]))
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    name="corral",
    cls=LazyGroup,
    help="Virtual machines on QEMU, from one laptop to a pool of hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    project: str = typer.Option(
        None, "--project", "-p", help="The project to act in (env CORRAL_PROJECT; default: the token's)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Do not check the server's HTTPS certificate (env CORRAL_INSECURE=1)."
    ),
) -> None:
    """Run `corral serve` to start the daemon, then `corral vm run demo --image tiny`."""
    import os

    # The SDK client every command makes reads these, so one global option reaches every command.
    if project:
        os.environ["CORRAL_PROJECT"] = project
    if insecure:
        os.environ["CORRAL_INSECURE"] = "1"


def main() -> None:
    # httpx's package imports its own command line (click, Rich, Pygments: more than the rest of httpx) when
    # click is installed; the CLI never uses it, and every command that talks to the daemon would pay for it.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    app()
