"""`corral host ...`: the hosts in the pool, what they have left, and taking one out of service."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, human_size, print_json, run, table

# Host facts are for cluster-wide roles: a project token gets the API's 403 as one line (docs/networking.md).
app = typer.Typer(help="Hosts and their capacity (cluster-wide roles only).", no_args_is_help=True)


def _state(host: dict[str, Any]) -> str:
    return host["state"] + (" (drained)" if host.get("drained") else "") + (" (standby)" if host.get("standby") else "")


@app.command("list")
def list_hosts(as_json: bool = JSON_OPTION) -> None:
    """Hosts with CPU, memory and storage capacity and allocation.

    STATE: online, unreachable (no heartbeat), fenced (its HA lease expired: docs/ha.md), dead (taken over),
    offline (agent stopped cleanly)."""

    def action() -> None:
        with client() as corral:
            hosts = corral.hosts()
        if as_json:
            print_json(hosts)
            return
        table(
            ["NAME", "STATE", "ADDRESS", "ACCEL", "QEMU", "VCPUS", "MEMORY", "STORAGE FREE", "VMS"],
            [
                [
                    h["name"],
                    _state(h),
                    h.get("address") or "-",
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


@app.command()
def show(name: str, as_json: bool = JSON_OPTION) -> None:
    """One host: inventory, overcommit ratios, allocation, measured usage and its VMs."""

    def action() -> None:
        with client() as corral:
            h = corral.host(name)
        if as_json:
            print_json(h)
            return
        usage = h.get("usage") or {}
        rows = [
            ("name", h["name"]),
            ("state", _state(h)),
            ("address", h.get("address") or "-"),
            ("heartbeat", h["heartbeat_at"]),
            (
                "ha lease",
                f"until {h['lease_expires_at']} (epoch {h.get('epoch', 0)})"
                if h.get("lease_expires_at")
                else f"none (epoch {h.get('epoch', 0)})",
            ),
            ("accelerator", h["accel"]),
            ("qemu", h["qemu_version"] or "missing"),
            (
                "vcpus",
                f"{h['allocated_cpus']} allocated of {h['cpus']} x {h['cpu_overcommit']:g}; "
                f"load {usage.get('load1', '-')}",
            ),
            (
                "memory",
                f"{human_size(h['allocated_memory'])} allocated of {human_size(h['memory'])} x "
                f"{h['memory_overcommit']:g}; {human_size(usage.get('memory_used'))} used",
            ),
            (
                "storage",
                f"{human_size(h['allocated_storage'])} allocated of {human_size(h['storage_total'])} x "
                f"{h['storage_overcommit']:g}; {human_size(h['storage_total'] - h['storage_free'])} used",
            ),
            ("vms", ", ".join(h.get("vm_names") or []) or "-"),
        ]
        for key, value in rows:
            print(f"{key + ':':13}{value}")

    run(action)


@app.command()
def drain(
    name: str,
    keep_vms: bool = typer.Option(False, "--keep-vms", help="Only stop placing new VMs here; move nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Take no new VMs on this host and move every VM off it (each placed by the scheduler, one at a time)."""
    if keep_vms:
        _set(name, "drain_host", as_json, f"host {name} drained: no new VMs go there")
        return

    def action() -> None:
        from corral.cli.common import follow_job

        with client() as corral:
            accepted = corral.evacuate_host(name)
            plan = accepted["plan"]
            for move in plan.get("vms", []):
                if not as_json:
                    print(f"{move['vm']} -> {move['to']}" + (" (with its disks)" if move["with_storage"] else ""))
            job = follow_job(corral, accepted, f"drain {name}", quiet=as_json)
        stayed = plan.get("not_moved", [])
        if job is None and stayed:  # with a job, its failure names them
            from corral.errors import Conflict

            shown = "; ".join(f"{item['vm']}: {item['reason']}" for item in stayed[:5])
            raise Conflict(
                f"host {name} is drained but {len(stayed)} VM(s) stay on it: {shown}",
                f"fix what is named, then `corral host drain {name}` again",
            )
        if as_json:
            print_json({"plan": plan, "job": job})
            return
        for item in plan.get("moved_stopped", []):
            print(f"{item['vm']} (stopped) now belongs to {item['to']}")
        print(
            f"host {name} drained: {len(plan.get('vms', []))} VM(s) moved live, "
            f"{len(plan.get('moved_stopped', []))} stopped VM(s) reassigned"
        )

    run(action)


@app.command()
def undrain(name: str, as_json: bool = JSON_OPTION) -> None:
    """Let this host take new VMs again."""
    _set(name, "undrain_host", as_json, f"host {name} takes new VMs again")


def _set(name: str, call: str, as_json: bool, message: str) -> None:
    def action() -> None:
        with client() as corral:
            host = getattr(corral, call)(name)
        if as_json:
            print_json(host)
        else:
            print(message)

    run(action)


@app.command()
def remove(name: str, as_json: bool = JSON_OPTION) -> None:
    """Forget a host whose agent is stopped and which holds no VMs or volumes."""

    def action() -> None:
        with client() as corral:
            result = corral.remove_host(name)
        if as_json:
            print_json(result)
        else:
            print(f"host {name} removed")

    run(action)
