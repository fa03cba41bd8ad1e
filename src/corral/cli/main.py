"""Entry point. Heavy libraries (httpx, FastAPI, SQLAlchemy) are imported inside commands so that
``corral --help`` starts fast."""

from __future__ import annotations

import typer

from corral import __version__
from corral.cli import access, agent, backup, host, image, job, network, pool, serve, snapshot, template, ui, vm, volume
from corral.cli import env as env_cli

app = typer.Typer(
    name="corral",
    help="Virtual machines on QEMU, from one laptop to a pool of hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(vm.app, name="vm")
app.add_typer(image.app, name="image")
app.add_typer(volume.app, name="volume")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(backup.app, name="backup")
backup.register_vm_commands(vm.app)
pool.register_vm_commands(vm.app)
pool.register_host_commands(host.app)
app.add_typer(template.app, name="template")
app.add_typer(job.app, name="job")
app.add_typer(host.app, name="host")
app.add_typer(pool.app, name="pool")
app.add_typer(network.app, name="network")
serve.register(app)
access.register(app)
agent.register(app)
ui.register(app)
env_cli.register(app)


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
    app()
