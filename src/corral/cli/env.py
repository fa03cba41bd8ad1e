"""`corral up | status | diff | down | scale` and `corral env ...`: environments from a corral.yaml."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, print_json, run, table

app = typer.Typer(help="Environments made from a corral.yaml.", no_args_is_help=True)

FILE = typer.Option(Path("corral.yaml"), "--file", "-f", help="The environment file.")
ENV = typer.Option(None, "--env", "-e", help="Environment name (default: the file's name:, else its directory's).")
TIMEOUT = typer.Option(300.0, "--timeout", help="Seconds to wait for each VM to become ready.")


def _open(corral: Any, file: Path, env: str | None) -> Any:
    from corral.client.environments import Environment
    from corral.spec.environment import default_env_name, load

    config = load(file)
    if env:  # --env wins over the file's name: (a copy made by `env fork` shares its original's file)
        config = config.model_copy(update={"name": None})
    return Environment(corral, config, env or default_env_name(file.resolve().parent), file.resolve())


def _reporter(quiet: bool):  # type: ignore[no-untyped-def]
    def report(step: Any) -> None:
        if not quiet:
            print(f"{step.action} {step.target}" + (f": {step.detail}" if step.detail else ""), file=sys.stderr)

    return report


def _show_steps(env: str, steps: list[Any], as_json: bool, verb: str) -> None:
    if as_json:
        print_json({"env": env, "steps": [step.to_dict() for step in steps]})
        return
    if not steps:
        print(f"environment {env}: nothing to change")
        return
    table(
        ["ACTION", "TARGET", "DETAIL", "TIME"],
        [
            [step.action, step.target, step.detail, f"{step.seconds:.1f}s" if step.seconds is not None else ""]
            for step in steps
        ],
        title=f"environment {env}: {verb}",
    )
    notes = [step for step in steps if step.action in ("needs-recreate", "needs-restart", "orphan")]
    for step in notes:
        print(f"note: {step.target}: {step.detail}", file=sys.stderr)


def up(file: Path = FILE, env: str = ENV, timeout: float = TIMEOUT, as_json: bool = JSON_OPTION) -> None:
    """Create or start what is missing and provision once; a second `up` changes nothing."""

    def action() -> None:
        with client() as corral:
            environment = _open(corral, file, env)
            steps = environment.up(report=_reporter(as_json), timeout=timeout)
        _show_steps(environment.env, steps, as_json, "up")

    run(action)


def diff(file: Path = FILE, env: str = ENV, as_json: bool = JSON_OPTION) -> None:
    """What `up` would change; exits 1 when that is something (like `git diff --exit-code`)."""

    def action() -> list[Any]:
        with client() as corral:
            environment = _open(corral, file, env)
            steps = environment.plan()
        _show_steps(environment.env, steps, as_json, "diff (what `corral up` would do)")
        return steps

    if run(action):
        raise typer.Exit(1)


def status(file: Path = FILE, env: str = ENV, as_json: bool = JSON_OPTION) -> None:
    """What exists of the file's VMs and networks."""

    def action() -> None:
        with client() as corral:
            environment = _open(corral, file, env)
            rows = environment.status()
        if as_json:
            print_json({"env": environment.env, "resources": rows})
            return
        table(
            ["KIND", "NAME", "STATE", "READY", "PROVISIONED", "ADDRESSES"],
            [
                [
                    row["kind"],
                    row["name"],
                    row["state"],
                    _yes(row.get("ready")) if row["kind"] == "vm" else "",
                    _yes(row.get("provisioned")) if row["kind"] == "vm" else "",
                    row.get("addresses") or row.get("subnet") or "",
                ]
                for row in rows
            ],
            title=f"environment {environment.env}",
        )

    run(action)


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def down(
    file: Path = FILE,
    env: str = ENV,
    destroy: bool = typer.Option(False, "--destroy", help="Delete the VMs, their disks and the networks."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop the environment's VMs (disks kept), or delete everything it made with --destroy."""

    def action() -> None:
        with client() as corral:
            environment = _open(corral, file, env)
            steps = environment.down(destroy=destroy, report=_reporter(as_json))
        _show_steps(environment.env, steps, as_json, "down")

    run(action)


def scale(
    name: str = typer.Argument(..., help="The VM entry of the file (one with count:)."),
    count: int = typer.Argument(..., help="How many members it should have."),
    file: Path = FILE,
    env: str = ENV,
    timeout: float = TIMEOUT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Set a group's size: new members are forks of a running one; removal takes the newest first."""

    def action() -> None:
        with client() as corral:
            environment = _open(corral, file, env)
            steps = environment.scale(name, count, report=_reporter(as_json), timeout=timeout)
        _show_steps(environment.env, steps, as_json, f"scale {name} to {count}")

    run(action)


@app.command("fork")
def fork_env(
    name: str = typer.Argument(..., help="The environment to copy (see `corral env list`)."),
    new: str = typer.Argument(..., help="The copy's environment name."),
    isolated: bool = typer.Option(
        False, "--isolated", help="Duplicate its networks: same addresses, no route to the original."
    ),
    timeout: float = TIMEOUT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fork every running VM of an environment into a new one (with --isolated, on copies of its networks)."""

    def action() -> None:
        from corral.client.environments import fork_environment

        with client() as corral:
            steps = fork_environment(corral, name, new, isolated, report=_reporter(as_json), timeout=timeout)
        _show_steps(new, steps, as_json, f"fork of {name}")

    run(action)


@app.command("list")
def list_envs(as_json: bool = JSON_OPTION) -> None:
    """Environments this user brought up (from the local state), with how many of their VMs exist."""

    def action() -> None:
        from corral.client.environments import list_states

        states = list_states()
        with client() as corral:
            names = [vm["name"] for vm in corral.vms()]
        rows = [
            {
                "env": state.env,
                "file": state.file,
                "daemon": state.daemon,
                "vms": sorted(name for name in names if name.startswith(f"{state.env}-")),
            }
            for state in states
        ]
        if as_json:
            print_json(rows)
            return
        table(["ENV", "VMS", "FILE"], [[row["env"], len(row["vms"]), row["file"]] for row in rows])

    run(action)


def register(root: typer.Typer) -> None:
    """Top-level verbs (as with docker compose) and the `env` group."""
    for command in (up, status, diff, down, scale):
        root.command(command.__name__)(command)
    root.add_typer(app, name="env")
