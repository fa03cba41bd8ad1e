"""`corral vm set` and `corral vm disk add|remove`: resize a VM, live where the running guest allows it."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, fail, follow_job, human_size, print_json, run

disk_app = typer.Typer(help="Add or remove a VM's data disks (hot-plugged on a running VM).", no_args_is_help=True)


def _report(vm: dict[str, Any], job: dict[str, Any] | None) -> None:
    """What changed, and what waits for the next start, in plain lines."""
    spec = vm["spec"]
    actual = vm.get("memory_actual")
    memory = human_size(vm["memory"]) + (f" (guest has {human_size(actual)})" if actual else "")
    ceiling = f", live up to {human_size(spec['max_memory'])}" if spec.get("max_memory") else ""
    ceiling += f", floor {human_size(vm['min_memory'])}" if vm.get("min_memory") else ""
    print(
        f"{vm['name']}: memory {memory}{ceiling}; CPUs {vm['cpus']}"
        + (f" (live up to {spec['max_cpus']})" if spec.get("max_cpus") else "")
    )
    result = (job or {}).get("result") or {}
    for note in result.get("notes", []) or ([result["note"]] if result.get("note") else []):
        print(f"note: {note}")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")


def set_vm(
    name: str = typer.Argument(..., help="VM name."),
    memory: str = typer.Option(None, "--memory", "-m", help="Guest memory, e.g. 128M; live up to --max-memory."),
    cpus: int = typer.Option(None, "--cpus", "-c", help="vCPUs; live up to --max-cpus."),
    cpu_limit: float = typer.Option(None, "--cpu-limit", help="CPU quota in cores, e.g. 0.5 (live)."),
    cpu_weight: int = typer.Option(None, "--cpu-weight", help="CPU share under contention, 1-10000 (live)."),
    max_memory: str = typer.Option(None, "--max-memory", help="Ceiling for live memory growth (next start)."),
    max_cpus: int = typer.Option(None, "--max-cpus", help="Ceiling for live vCPU growth (next start)."),
    ha: bool = typer.Option(None, "--ha/--no-ha", help="Restart it elsewhere when its host dies (docs/ha.md)."),
    ha_priority: int = typer.Option(None, "--ha-priority", help="Higher restarts first (-1000..1000)."),
    min_memory: str = typer.Option(
        None, "--min-memory", help="The floor automatic ballooning never goes under, e.g. 256M (docs/optimization.md)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a VM's memory, CPUs, CPU limits or HA; a running VM follows live where it can (docs/resize.md)."""
    changes = {
        "memory": memory,
        "cpus": cpus,
        "cpu_limit": cpu_limit,
        "cpu_weight": cpu_weight,
        "max_memory": max_memory,
        "max_cpus": max_cpus,
        "ha": ha,
        "ha_priority": ha_priority,
        "min_memory": min_memory,
    }
    if all(value is None for value in changes.values()):
        fail(
            "nothing to change",
            "pass --memory, --cpus, --cpu-limit, --cpu-weight, --max-memory, --max-cpus, --min-memory or --ha/--no-ha",
            2,
        )

    def action() -> None:
        with client() as corral:
            accepted = corral.resize_vm(name, **changes)
            job = follow_job(corral, accepted, f"resize {name}", quiet=as_json)
            vm = corral.vm(name)
        if as_json:
            print_json({"vm": vm, "job": job})
        else:
            _report(vm, job)

    run(action)


@disk_app.command("add")
def disk_add(
    name: str = typer.Argument(..., help="VM name."),
    size: str = typer.Option(None, "--size", "-s", help="A new blank volume of this size, e.g. 2G."),
    volume: str = typer.Option(None, "--volume", help="An existing free volume (see `corral volume list`)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a data disk; a running guest gets it hot-plugged (virtio-blk on a PCIe root port of its own)."""
    if (size is None) == (volume is None):
        fail("a disk needs either --size or --volume", "pass --size 2G or --volume NAME", 2)

    def action() -> None:
        with client() as corral:
            accepted = corral.add_disk(name, size=size, volume=volume)
            job = follow_job(corral, accepted, f"add a disk to {name}", quiet=as_json)
        if as_json:
            print_json(job)
            return
        result = (job or {}).get("result") or {}
        where = "hot-plugged into the running guest" if result.get("hotplugged") else "attached for the next start"
        print(f"{result.get('volume', volume)}: {where}")

    run(action)


@disk_app.command("remove")
def disk_remove(
    name: str = typer.Argument(..., help="VM name."),
    volume: str = typer.Argument(..., help="The volume to detach (see `corral vm show`)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Detach a data disk (a running guest is asked to release it first); the volume stays, free."""

    def action() -> None:
        with client() as corral:
            accepted = corral.remove_disk(name, volume)
            job = follow_job(corral, accepted, f"remove {volume} from {name}", quiet=as_json)
        if as_json:
            print_json(job)
        else:
            print(f"{volume}: detached from {name}; it is a free volume now")

    run(action)


def register(app: typer.Typer) -> None:
    """Hang `set` and `disk` on the `vm` command group (kept here so cli/vm.py stays a lifecycle file)."""
    app.command("set")(set_vm)
    app.add_typer(disk_app, name="disk")
