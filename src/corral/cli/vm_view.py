"""`corral vm list|show|logs` and the summary every VM verb prints: reading a VM, changing nothing."""

from __future__ import annotations

import sys
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, human_size, print_json, run, table


def summary(vm: dict[str, Any]) -> None:
    state = vm["state"] + (" (ready)" if vm["ready"] else "")
    print(f"VM {vm['name']}: {state}")
    shown = addresses(vm)
    if shown:
        print(f"  addresses: {shown}")
    if vm["state"] in ("running", "paused"):
        print(f"  console:   corral vm console {vm['name']}   (Ctrl-] detaches)")
        print(f"  shell:     corral vm exec {vm['name']} -- uname -a")


def addresses(vm: dict[str, Any]) -> str:
    return ", ".join(
        address.split("/")[0]
        for iface in vm.get("interfaces", [])
        for address in iface.get("addresses", [])
        if ":" not in address
    )


def list_vms(as_json: bool = JSON_OPTION) -> None:
    """List VMs."""

    def action() -> None:
        with client() as corral:
            vms = corral.vms()
        if as_json:
            print_json(vms)
            return
        table(
            ["NAME", "STATE", "READY", "CPUS", "MEMORY", "IMAGE", "ADDRESSES", "HOST"],
            [
                [
                    vm["name"],
                    vm["state"],
                    "yes" if vm["ready"] else "no",
                    vm["cpus"],
                    human_size(vm["memory"]),
                    vm["image"],
                    addresses(vm),
                    vm["host"],
                ]
                for vm in vms
            ],
        )

    run(action)


def show(name: str, as_json: bool = JSON_OPTION) -> None:
    """Show a VM's spec, state, disks and addresses."""

    def action() -> None:
        with client() as corral:
            vm = corral.vm(name)
        if as_json:
            print_json(vm)
            return
        rows = [
            ("name", vm["name"]),
            ("id", vm["id"]),
            ("state", vm["state"]),
            ("desired", vm["desired_state"]),
            ("ready", "yes" if vm["ready"] else "no"),
            ("status", vm["status"] or "-"),
            ("host", vm["host"]),
            ("pid", vm["pid"] or "-"),
            ("image", vm["image"]),
            ("cpus", vm["cpus"]),
            (
                "memory",
                human_size(vm["memory"])
                + (f" (guest has {human_size(vm['memory_actual'])})" if vm.get("memory_actual") else ""),
            ),
            (
                "memory floor",
                human_size(vm["memory_floor"]) + ("" if vm.get("min_memory") else " (default)")
                if vm.get("memory_floor")
                else "-",
            ),
            ("restart", f"{vm['restart_policy']} ({vm['restart_count']} so far)"),
            ("addresses", addresses(vm) or "-"),
        ]
        for nic in vm.get("nics", []):
            address = f" {nic['ip']}" if nic["ip"] else ""
            rows.append((f"nic {nic['slot']}", f"{nic['network']} {nic['mac']}{address}"))
        for fwd in vm.get("port_forwards", []):
            rows.append(("forward", f"host {fwd['host_port']}/{fwd['protocol']} -> guest {fwd['guest_port']}"))
        for disk in vm["disks"]:
            rows.append((f"disk {disk['name']}", f"{human_size(disk['size'])} {disk['role']} ({disk['state']})"))
        if vm.get("replica"):
            from corral.cli.replication import replica_line

            rows.append(("replica", replica_line(vm["replica"])))
        if vm.get("last_exit") and vm["state"] == "crashed":
            rows.append(("last serial", " | ".join(vm["last_exit"].get("last_serial_lines", [])[-3:]) or "-"))
        table(["FIELD", "VALUE"], rows)

    run(action)


def logs(
    name: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new output."),
    lines: int = typer.Option(200, "--lines", "-n", help="How many of the last lines to show first."),
) -> None:
    """Print the VM's serial console log."""

    def action() -> None:
        with client() as corral:
            for chunk in corral.vm_logs(name, lines=lines, follow=follow):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    run(action)
