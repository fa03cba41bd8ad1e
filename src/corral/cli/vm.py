"""`corral vm ...`: the life of a VM. This module is the command table (the order of `corral vm --help`); the
commands live by concern in cli/vm_create.py, vm_lifecycle.py, vm_view.py and vm_guest.py, and other modules hang
theirs on this app (cli/main.py adds `vm export|import` and `vm stats`)."""

from __future__ import annotations

import typer

from corral.cli import replication, resize, vm_create, vm_guest, vm_lifecycle, vm_network, vm_view

app = typer.Typer(help="Create, run and manage VMs.", no_args_is_help=True)

app.command()(vm_create.create)
app.command("run")(vm_create.run_vm)
for _command in (
    vm_lifecycle.start,
    vm_lifecycle.stop,
    vm_lifecycle.restart,
    vm_lifecycle.pause,
    vm_lifecycle.resume,
    vm_lifecycle.migrate,
    vm_lifecycle.delete,
):
    app.command()(_command)
app.command("list")(vm_view.list_vms)
app.command()(vm_view.show)
app.command("exec")(vm_guest.exec_cmd)
app.command()(vm_view.logs)
app.command()(vm_guest.console)
app.command()(vm_lifecycle.clone)
app.command()(vm_lifecycle.fork)
app.command()(vm_guest.ssh)

resize.register(app)  # `vm set` and `vm disk`
vm_network.register(app, vm_lifecycle.verb)  # `vm nic` and `vm port-forward`
replication.register(app)  # `vm replicate|replication|failover`
