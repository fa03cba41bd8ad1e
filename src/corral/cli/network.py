"""`corral network ...`: virtual networks (bridges with DHCP/DNS, NAT or isolated, or a host bridge)."""

from __future__ import annotations

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, print_json, run, table

app = typer.Typer(help="Create, list and delete virtual networks.", no_args_is_help=True)


@app.command("list")
def list_networks(as_json: bool = JSON_OPTION) -> None:
    """List networks with their mode, subnet, bridge and the VMs on them."""

    def action() -> None:
        with client() as corral:
            networks = corral.networks()
        if as_json:
            print_json(networks)
            return
        table(
            ["NAME", "MODE", "SUBNET", "GATEWAY", "BRIDGE", "STATE", "VMS"],
            [
                [
                    n["name"],
                    n["mode"],
                    n["subnet"] or "-",
                    n["gateway"] or "-",
                    n["bridge"],
                    n["state"],
                    ", ".join(n["vms"]) or "-",
                ]
                for n in networks
            ],
        )

    run(action)


@app.command()
def show(name: str, as_json: bool = JSON_OPTION) -> None:
    """Show one network."""

    def action() -> None:
        with client() as corral:
            network = corral.network(name)
        if as_json:
            print_json(network)
            return
        keys = ("name", "mode", "subnet", "gateway", "dhcp", "uplink", "bridge", "vni", "mtu", "state", "status")
        rows = [(key, network.get(key) if network.get(key) not in (None, "") else "-") for key in keys]
        rows.append(("vms", ", ".join(network["vms"]) or "-"))
        # The hosts whose VMs are on it: in a pool, the network's VXLAN segment spans exactly these.
        states = network.get("host_states") or {}
        shown = [f"{host} ({states[host]})" if host in states else host for host in network.get("hosts") or []]
        rows.append(("hosts", ", ".join(shown) or "-"))
        table(["FIELD", "VALUE"], rows)

    run(action)


@app.command()
def create(
    name: str = typer.Argument(..., help="Network name: lowercase letters, digits and '-'."),
    mode: str = typer.Option("nat", "--mode", help="nat (a way out through the host), isolated, or bridge."),
    subnet: str = typer.Option(None, "--subnet", help="Private IPv4 subnet, e.g. 10.20.0.0/24 (chosen if omitted)."),
    uplink: str = typer.Option(
        None,
        "--uplink",
        help="Bridge mode: the existing host bridge to join, e.g. br0 (cluster admins; project admins only the"
        " uplinks the administrator allows in bridge_uplinks).",
    ),
    dhcp: bool = typer.Option(True, "--dhcp/--no-dhcp", help="Hand out addresses with DHCP (nat and isolated)."),
    vni: int = typer.Option(None, "--vni", help="VXLAN identifier between a pool's hosts (chosen if omitted)."),
    mtu: int = typer.Option(
        None, "--mtu", help="The guests' MTU, told by DHCP (in a pool: at most the underlay's MTU less 50)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a network; VMs join it with --nic network=NAME."""

    def action() -> None:
        with client() as corral:
            accepted = corral.create_network(name, mode=mode, subnet=subnet, uplink=uplink, dhcp=dhcp, vni=vni, mtu=mtu)
            follow_job(corral, accepted, f"network {name}", quiet=as_json)
            network = corral.network(name)
        if as_json:
            print_json(network)
        else:
            where = network["subnet"] or f"host bridge {network['bridge']}"
            print(f"created {network['mode']} network {name} on {where} (bridge {network['bridge']})")

    run(action)


@app.command()
def delete(name: str, as_json: bool = JSON_OPTION) -> None:
    """Delete a network no VM uses: its bridge, DHCP server and firewall rules go with it."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.delete_network(name), f"delete network {name}", quiet=as_json)
        print_json(job) if as_json else print(f"deleted network {name}")

    run(action)
