"""`corral vm replicate`, `corral vm replication list|show|remove` and `corral vm failover`: copies of a VM's
disks on a partner host, and starting the VM from them when its host is gone (docs/ha.md)."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, human_size, print_json, run, table

replication_app = typer.Typer(help="A VM's replicas on partner hosts.", no_args_is_help=True)


def register(vm_app: typer.Typer) -> None:
    """Hang these commands on `corral vm`."""
    vm_app.command("replicate")(replicate)
    vm_app.command("failover")(failover)
    vm_app.add_typer(replication_app, name="replication")


def _age(row: dict[str, Any]) -> str:
    age = row.get("age_seconds")
    return "no copy yet" if age is None else f"{age:.0f} s old"


def replica_line(row: dict[str, Any]) -> str:
    """`vm show`'s line: where, the bound on data loss, and the age of the last copy."""
    return (
        f"on {row['partner']} ({row['state']}), every {row['every']:g} s: data loss bounded by "
        f"{row['data_loss_bound_seconds']:g} s; last copy {_age(row)}"
    )


def _copy(row: dict[str, Any]) -> str:
    if row.get("last_at") is None:
        return "-"
    how = "consistent (frozen)" if row.get("last_consistent") else "crash-consistent"
    return f"{row['last_kind']}, {human_size(row.get('last_bytes'))} in {row.get('last_seconds')} s, {how}"


def replicate(
    name: str = typer.Argument(..., help="VM name."),
    to: str = typer.Option(..., "--to", help="The partner host that keeps the replica."),
    every: str = typer.Option(None, "--every", help="Interval between copies: 60s (default), 5m, 1h."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Copy a running VM's disks to another host now and then every interval (incremental after the first).
    Asked again for the same host, it copies at once."""

    def action() -> None:
        with client() as corral:
            answer = corral.replicate_vm(name, to, every)
            job = follow_job(corral, answer, f"replicate {name}", quiet=as_json)
            row = corral.replica(name)
        if as_json:
            print_json({"replica": row, "job": job})
            return
        if job is None:
            print(f"replica of {name} on {to}: every {row['every']:g} s; the first copy starts when the VM runs")
            return
        result = job["result"] or {}
        print(
            f"replicated {name} to {to}: {result.get('kind')} copy, {human_size(row.get('last_bytes'))} "
            f"in {result.get('seconds')} s{' (filesystems frozen)' if result.get('frozen') else ''}; "
            f"next every {row['every']:g} s"
        )

    run(action)


def failover(
    name: str = typer.Argument(..., help="VM name."),
    to: str = typer.Option(None, "--to", help="The replica's host (the only one that can take it)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Start the VM from its newest replica. Refused while the VM may still run on its own host: stop it, or wait
    until the pool declares that host dead (HA VMs fail over by themselves)."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.failover_vm(name, to), f"failover {name}", quiet=as_json)
        if as_json:
            print_json(job)
            return
        result = (job or {}).get("result") or {}
        print(f"{name} runs on {result.get('host')} from its replica (copy of {(result.get('copy_at') or '?')[:19]})")

    run(action)


@replication_app.command("list")
def list_replicas(as_json: bool = JSON_OPTION) -> None:
    """Every replica: partner, interval, age of the last copy."""

    def action() -> None:
        with client() as corral:
            rows = corral.replicas()
        if as_json:
            print_json(rows)
        elif not rows:
            print("no replicas")
        else:
            table(
                ["VM", "PARTNER", "EVERY", "STATE", "COPIES", "LAST COPY", "AGE", "ERROR"],
                [
                    (
                        r["vm"],
                        r["partner"],
                        f"{r['every']:g} s",
                        r["state"],
                        str(r["copies"]),
                        _copy(r),
                        _age(r),
                        r["last_error"] or "-",
                    )
                    for r in rows
                ],
            )

    run(action)


@replication_app.command("show")
def show(name: str = typer.Argument(..., help="VM name."), as_json: bool = JSON_OPTION) -> None:
    """A VM's replica, with the bound on the data a failover would lose."""

    def action() -> None:
        with client() as corral:
            row = corral.replica(name)
        if as_json:
            print_json(row)
            return
        print(f"replica of {name} on {row['partner']}: {row['state']}, {row['copies']} copies")
        print(f"  every {row['every']:g} s: a failover loses at most the writes since the last copy")
        print(f"  last copy: {(row['last_at'] or '-')[:19]} ({_age(row)}): {_copy(row)}")
        if row.get("last_error"):
            print(f"  last error: {row['last_error']}")

    run(action)


@replication_app.command("remove")
def remove(name: str = typer.Argument(..., help="VM name."), as_json: bool = JSON_OPTION) -> None:
    """Stop replicating the VM and delete its replica's files on the partner."""

    def action() -> None:
        with client() as corral:
            answer = corral.remove_replica(name)
            job = follow_job(corral, answer, f"remove replica of {name}", quiet=as_json)
        if as_json:
            print_json({"replica": answer["replica"], "job": job})
            return
        print(f"removed the replica of {name} on {answer['replica']['partner']}")

    run(action)
