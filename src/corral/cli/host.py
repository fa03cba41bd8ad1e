"""`corral host ...`: the hosts in the pool and what they have left."""

from __future__ import annotations

import typer

from corral.cli.common import JSON_OPTION, client, human_size, print_json, run, table

app = typer.Typer(help="Hosts and their capacity.", no_args_is_help=True)


@app.command("list")
def list_hosts(as_json: bool = JSON_OPTION) -> None:
    """Hosts with CPU and memory capacity and allocation."""

    def action() -> None:
        with client() as corral:
            hosts = corral.hosts()
        if as_json:
            print_json(hosts)
            return
        table(
            ["NAME", "STATE", "ACCEL", "QEMU", "VCPUS", "MEMORY", "STORAGE FREE", "VMS"],
            [
                [
                    h["name"],
                    h["state"],
                    h["accel"],
                    h["qemu_version"] or "missing",
                    f"{h['allocated_cpus']}/{h['cpus'] * h['cpu_overcommit']:g}",
                    f"{human_size(h['allocated_memory'])}/{human_size(h['memory'])}",
                    human_size(h["storage_free"]),
                    h["vms"],
                ]
                for h in hosts
            ],
        )

    run(action)
