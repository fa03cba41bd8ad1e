"""`corral volume ...`: qcow2 volumes in the default storage pool."""

from __future__ import annotations

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, follow_required, human_size, print_json, run, table

app = typer.Typer(help="Create, resize and delete volumes.", no_args_is_help=True)


@app.command("list")
def list_volumes(as_json: bool = JSON_OPTION) -> None:
    """List volumes, with the VM each is attached to."""

    def action() -> None:
        with client() as corral:
            volumes = corral.volumes()
        if as_json:
            print_json(volumes)
            return
        table(
            ["NAME", "SIZE", "ROLE", "STATE", "VM", "POOL"],
            [[v["name"], human_size(v["size"]), v["role"], v["state"], v["vm"] or "-", v["pool"]] for v in volumes],
        )

    run(action)


@app.command()
def create(
    name: str, size: str = typer.Option(..., "--size", "-s", help="Size, e.g. 10G."), as_json: bool = JSON_OPTION
) -> None:
    """Create a blank qcow2 volume (thin: it takes space as it is written)."""

    def action() -> None:
        with client() as corral:
            job = follow_required(corral, corral.create_volume(name, size), f"create {name}", quiet=as_json)
        print_json(job) if as_json else print(f"created volume {name} ({human_size(job['result']['size'])})")

    run(action)


@app.command()
def resize(
    name: str, size: str = typer.Argument(..., help="New size, e.g. 20G (grow only)."), as_json: bool = JSON_OPTION
) -> None:
    """Grow a volume; an attached running VM sees the new size at once."""

    def action() -> None:
        with client() as corral:
            job = follow_required(corral, corral.resize_volume(name, size), f"resize {name}", quiet=as_json)
        print_json(job) if as_json else print(f"volume {name} is now {human_size(job['result']['size'])}")

    run(action)


@app.command()
def delete(name: str, as_json: bool = JSON_OPTION) -> None:
    """Delete a volume that no VM uses."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.delete_volume(name), f"delete {name}", quiet=as_json)
        print_json(job) if as_json else print(f"deleted volume {name}")

    run(action)
