"""`corral vm nic add|remove` and `corral vm port-forward`: a VM's NICs and the host ports forwarded to it."""

from __future__ import annotations

from collections.abc import Callable

import typer

from corral.cli.common import JSON_OPTION, client, fail, follow_job, print_json, run, table

nic_app = typer.Typer(help="Add or remove a VM's NICs (live on a running VM).", no_args_is_help=True)
_verb: Callable[..., None]


def register(vm_app: typer.Typer, verb: Callable[..., None]) -> None:
    """Hang these commands on `corral vm`; ``verb`` runs a VM verb and prints the VM as `vm start` does."""
    global _verb
    _verb = verb
    vm_app.add_typer(nic_app, name="nic")
    vm_app.command("port-forward")(port_forward)


@nic_app.command("add")
def nic_add(
    name: str = typer.Argument(..., help="VM name."),
    network: str = typer.Option(..., "--network", "-n", help="Network to join ('user' for QEMU's user-mode NAT)."),
    mac: str = typer.Option(None, "--mac", help="MAC address (chosen if omitted)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a NIC; a running guest gets it hot-plugged."""
    _verb(name, "add a NIC to", "add_nic", as_json, network=network, mac=mac)


@nic_app.command("remove")
def nic_remove(
    name: str = typer.Argument(..., help="VM name."),
    nic: str = typer.Argument(..., help="The NIC's slot or MAC (see `corral vm show`)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove a NIC; a running guest is asked to release it first."""
    _verb(name, "remove a NIC from", "remove_nic", as_json, nic=nic)


def port_forward(
    name: str = typer.Argument(..., help="VM name."),
    forward: str = typer.Argument(
        None,
        help="HOST_PORT:GUEST_PORT, e.g. 20080:80 (add /udp for UDP). The host port must be in the administrator's"
        " port_forward_range (default 20000-29999) and free on the host.",
    ),
    remove: str = typer.Option(None, "--remove", help="Remove the forward from this host port (8080, or 5353/udp)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Forward a host port to a guest port (NAT networks and user-mode NICs), or list the VM's forwards."""
    from corral.spec.network import PortForwardSpec

    def action() -> None:
        with client() as corral:
            if forward is None and remove is None:
                forwards = corral.vm(name)["port_forwards"]
                if as_json:
                    print_json(forwards)
                else:
                    table(
                        ["HOST PORT", "PROTO", "GUEST PORT", "NIC"],
                        [[f["host_port"], f["protocol"], f["guest_port"], f["nic"]] for f in forwards],
                    )
                return
            if remove is not None:
                port, _, protocol = remove.partition("/")
                if not port.isdigit():
                    fail(f"invalid --remove {remove!r}", "write the host port, e.g. --remove 8080 or 5353/udp", 2)
                accepted = corral.remove_port_forward(name, int(port), protocol or "tcp")
                what = f"removed the forward from host port {remove}"
            else:
                spec = PortForwardSpec.parse(forward)
                accepted = corral.add_port_forward(name, spec.host_port, spec.guest_port, spec.protocol)
                what = f"host port {spec.host_port}/{spec.protocol} now reaches {name}:{spec.guest_port}"
            job = follow_job(corral, accepted, f"port-forward {name}", quiet=as_json)
        print_json(job) if as_json else print(what)

    run(action)
