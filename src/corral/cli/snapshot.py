"""`corral snapshot ...`: points in a VM's history, with or without its memory."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, follow_required, human_size, print_json, run

app = typer.Typer(help="Create, list, revert and delete snapshots.", no_args_is_help=True)


@app.command()
def create(
    vm: str = typer.Argument(..., help="VM name."),
    name: str = typer.Argument(..., help="Snapshot name."),
    memory: bool = typer.Option(
        None, "--memory/--disk-only", help="Include RAM and device state (default: yes when the VM runs)."
    ),
    description: str = typer.Option("", "--description", "-d"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Snapshot every disk of a VM (and, running, its memory: the guest pauses only while it is written)."""

    def action() -> None:
        with client() as corral:
            job = follow_required(
                corral, corral.create_snapshot(vm, name, memory, description), f"snapshot {vm}", quiet=as_json
            )
        if as_json:
            print_json(job)
        else:
            result = job["result"]
            kind = f"with memory ({human_size(result['vm_state_size'])})" if result["memory"] else "disk-only"
            print(f"created snapshot {name} of {vm}, {kind}")

    run(action)


def _tree(snapshots: list[dict[str, Any]], vm: str) -> None:
    from rich.console import Console
    from rich.tree import Tree

    root = Tree(f"[bold]{vm}[/bold]")
    by_name = {s["name"]: s for s in snapshots}

    def label(snap: dict[str, Any]) -> str:
        kind = "memory" if snap["memory"] else "disk-only"
        mark = "  [green]<- current[/green]" if snap["current"] else ""
        desc = f"  {snap['description']}" if snap["description"] else ""
        return f"{snap['name']}  ({kind}, {snap['created_at'][:19]}){desc}{mark}"

    def add(node: Tree, snap: dict[str, Any]) -> None:
        branch = node.add(label(snap))
        for child in snap["children"]:
            add(branch, by_name[child])

    for snap in snapshots:
        if snap["parent"] is None:
            add(root, snap)
    Console().print(root)


@app.command("list")
def list_snapshots(vm: str = typer.Argument(..., help="VM name."), as_json: bool = JSON_OPTION) -> None:
    """The snapshot tree, with the current one marked."""

    def action() -> None:
        with client() as corral:
            snapshots = corral.snapshots(vm)
        if as_json:
            print_json(snapshots)
        elif not snapshots:
            print(f"VM {vm} has no snapshots")
        else:
            _tree(snapshots, vm)

    run(action)


@app.command()
def revert(vm: str, name: str, as_json: bool = JSON_OPTION) -> None:
    """Go back to a snapshot; with memory the VM resumes from that instant."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.revert_snapshot(vm, name), f"revert {vm}", quiet=as_json)
        print_json(job) if as_json else print(f"VM {vm} reverted to {name}")

    run(action)


@app.command()
def delete(vm: str, name: str, as_json: bool = JSON_OPTION) -> None:
    """Delete a snapshot; its children keep everything they had."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.delete_snapshot(vm, name), f"delete {name}", quiet=as_json)
        print_json(job) if as_json else print(f"deleted snapshot {name} of {vm}")

    run(action)
