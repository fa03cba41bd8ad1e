"""`corral agent`: one host of a pool. It runs this host's VMs and talks to the rest only through the store."""

from __future__ import annotations

import typer

from corral.cli.common import run


def register(app: typer.Typer) -> None:
    app.command()(agent)


def agent(
    db: str = typer.Option(None, "--db", help="The pool's store: postgresql://USER@HOST/DB (env CORRAL_DB)."),
    name: str = typer.Option(None, "--name", help="This host's name in the pool (default: the hostname)."),
    address: str = typer.Option(None, "--address", help="The address other hosts reach this one at."),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run only this host's agent (no API): it registers the host, heartbeats and runs the jobs placed here."""
    import logging

    from corral.config import load_settings
    from corral.spec.names import validate_name

    def action() -> None:
        settings = load_settings()
        updates = {key: value for key, value in (("database", db), ("host_name", name)) if value}
        if updates:
            settings = settings.model_copy(update=updates)
        if settings.host_name:
            validate_name(settings.host_name, "host name")
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        from corral.daemon import run_agent

        run_agent(settings, address=address)

    run(action)
