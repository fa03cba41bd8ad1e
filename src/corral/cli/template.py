"""`corral template ...`: read-only bases that VMs are linked clones of."""

from __future__ import annotations

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, human_size, print_json, run, table

app = typer.Typer(help="Create, list and delete templates.", no_args_is_help=True)


@app.command()
def create(
    name: str, source: str = typer.Option(..., "--from", help="The VM to make it from."), as_json: bool = JSON_OPTION
) -> None:
    """Make a template from a VM's disks (a flattened, read-only copy; the VM is left as it is)."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.create_template(name, source), f"template {name}", quiet=as_json)
        print_json(job) if as_json else print(
            f"template {name} made from {source}; use `corral vm create NAME --template {name}`"
        )

    run(action)


@app.command("list")
def list_templates(as_json: bool = JSON_OPTION) -> None:
    """Templates and the VMs made from them."""

    def action() -> None:
        with client() as corral:
            templates = corral.templates()
        if as_json:
            print_json(templates)
            return
        table(
            ["NAME", "STATE", "FROM", "IMAGE", "CPUS", "MEMORY", "DISKS", "USED BY"],
            [
                [
                    t["name"],
                    t["state"],
                    t["source_vm"],
                    t["image"],
                    t["cpus"],
                    human_size(t["memory"]),
                    len(t["disks"]),
                    ", ".join(t["used_by"]) or "-",
                ]
                for t in templates
            ],
        )

    run(action)


@app.command()
def delete(name: str, as_json: bool = JSON_OPTION) -> None:
    """Delete a template that no VM is based on."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.delete_template(name), f"delete {name}", quiet=as_json)
        print_json(job) if as_json else print(f"deleted template {name}")

    run(action)
