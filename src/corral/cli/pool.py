"""`corral pool show`: the pool's CPU, memory and storage, summed over the hosts that are online."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, human_size, print_json, run, table

app = typer.Typer(help="The pool of hosts as a whole.", no_args_is_help=True)


@app.command()
def show(as_json: bool = JSON_OPTION) -> None:
    """Capacity (physical), limit (under the overcommit ratios), allocated, used, and allocated/capacity."""

    def action() -> None:
        with client() as corral:
            pool = corral.pool()
        if as_json:
            print_json(pool)
            return
        print(f"hosts: {pool['hosts']} ({pool['online']} online, {pool['unreachable']} unreachable, "
              f"{pool['drained']} drained); VMs: {pool['vms']}")

        def row(label: str, r: dict[str, Any], fmt: Any) -> list[str]:
            return [label, fmt(r["capacity"]), fmt(r["limit"]), fmt(r["allocated"]), fmt(r["used"]),
                    f"{r['overcommit']:.2f}"]

        def cpus(value: float) -> str:
            return f"{value:g}"

        def size(value: float) -> str:
            return human_size(int(value))

        table(["RESOURCE", "CAPACITY", "LIMIT", "ALLOCATED", "USED", "OVERCOMMIT"],
              [row("cpu", pool["cpu"], cpus), row("memory", pool["memory"], size),
               row("storage", pool["storage"], size)])

    run(action)
