"""`corral backup ...` and `corral vm export / import`: copies of VMs that outlive them."""

from __future__ import annotations

import os
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, human_size, print_json, run, table
from corral.errors import InvalidInput

app = typer.Typer(help="Back up VMs (full or incremental, running or stopped) and restore them.",
                  no_args_is_help=True)


@app.command()
def create(
    vm: str = typer.Argument(..., help="VM name."),
    incremental: bool = typer.Option(False, "--incremental", "-i",
                                     help="Copy only what changed since the VM's last backup."),
    name: str = typer.Option(None, "--name", "-n", help="Backup name (default: kind and time)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Back up every disk of a VM at one instant; a running VM keeps running."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.create_backup(vm, name, incremental), f"backup {vm}", quiet=as_json)
        if as_json:
            print_json(job)
            return
        result = job["result"]
        how = "live" + (", filesystems frozen" if result["frozen"] else "") if result["live"] else "offline"
        print(f"backed up {vm}: {result['kind']} backup {result['backup']}, {human_size(result['bytes'])} "
              f"written ({how})")

    run(action)


@app.command("list")
def list_backups(vm: str = typer.Argument(None, help="Only this VM's backups."), as_json: bool = JSON_OPTION) -> None:
    """Backups, each with the chain it restores through."""

    def action() -> None:
        with client() as corral:
            rows = corral.backups(vm)
        if as_json:
            print_json(rows)
        elif not rows:
            print(f"VM {vm} has no backups" if vm else "no backups")
        else:
            table(["VM", "NAME", "KIND", "BASED ON", "SIZE", "STATE", "CREATED"],
                  [(r["vm"], r["name"], r["kind"] + (" (live)" if r["live"] else ""), r["parent"] or "-",
                    human_size(r["size"]), r["state"], r["created_at"][:19]) for r in rows])

    run(action)


@app.command()
def show(vm: str, name: str, as_json: bool = JSON_OPTION) -> None:
    """One backup: its chain, disks and the VM spec it recorded."""

    def action() -> None:
        with client() as corral:
            row: dict[str, Any] = corral.backup(vm, name)
        if as_json:
            print_json(row)
            return
        print(f"backup {row['name']} of {row['vm']}: {row['kind']}, {row['state']}, {human_size(row['size'])}")
        print(f"  chain: {' -> '.join(row['chain'])}")
        print(f"  taken: {row['created_at'][:19]} ({'live' if row['live'] else 'offline'})")
        spec = row.get("spec") or {}
        print(f"  spec: {spec.get('cpus')} vCPUs, {human_size(spec.get('memory'))}, image {spec.get('image')}")
        for disk in row["disks"]:
            print(f"  disk{disk['index']}: {human_size(disk['size'])}, {human_size(disk['written'])} in this backup")

    run(action)


@app.command()
def delete(vm: str, name: str, as_json: bool = JSON_OPTION) -> None:
    """Delete a backup; one that newer incremental backups build on is refused."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.delete_backup(vm, name), f"delete {name}", quiet=as_json)
        print_json(job) if as_json else print(f"deleted backup {name} of {vm}")

    run(action)


@app.command()
def restore(
    vm: str = typer.Argument(..., help="The VM the backup was taken of."),
    name: str = typer.Argument(..., help="Backup name (any in a chain)."),
    as_name: str = typer.Option(None, "--as", help="Restore into a new VM of this name."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Restore a backup into a new VM (--as), or over the VM's disks when it is stopped (or anew if it is gone)."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.restore_backup(vm, name, as_name), f"restore {name}", quiet=as_json)
        if as_json:
            print_json(job)
        else:
            target = job["result"]["vm"]
            print(f"restored backup {name} of {vm} into {'new VM ' if job['result']['new'] else ''}{target} "
                  f"(start it with `corral vm start {target}`)")

    run(action)


def export_vm(
    vm: str = typer.Argument(..., help="VM name."),
    file: str = typer.Argument(..., help="The archive to write (FILE.tar): here when the server is remote, "
                               "on the server host on the local socket."),
    compress: bool = typer.Option(False, "--compress", help="gzip the archive."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a VM's spec and flattened disks, with checksums, to one tar archive (downloaded from a remote)."""
    from corral.cli.image import transfer_bar

    def action() -> None:
        with client() as corral:
            if corral.url is None:
                job = follow_job(corral, corral.export_vm(vm, os.path.abspath(file), compress), f"export {vm}",
                                 quiet=as_json)
            else:
                if os.path.lexists(file):
                    raise InvalidInput(f"{file} already exists", "choose a new file name, or remove the old one")
                job = follow_job(corral, corral.export_vm(vm, None, compress), f"export {vm}", quiet=as_json)
                assert job is not None
                with transfer_bar(f"downloading {os.path.basename(file)}", as_json) as progress:
                    corral.download_export(job["result"]["export"], file, progress)
                job["result"]["file"] = os.path.abspath(file)
        assert job is not None
        print_json(job) if as_json else print(f"exported {vm} to {job['result']['file']} "
                                              f"({human_size(job['result']['bytes'])})")

    run(action)


def import_vm(
    file: str = typer.Argument(..., help="An archive made by `corral vm export`: uploaded when the server is "
                               "remote, on the server host on the local socket."),
    name: str = typer.Option(None, "--name", "-n", help="Name of the new VM (default: the exported VM's)."),
    import_dir: bool = typer.Option(False, "--import-dir", help="FILE is a name in the server's import directory."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a new VM from an export; the archive is checked in full before the VM can be used."""
    from pathlib import Path

    from corral.cli.image import upload_file

    def action() -> None:
        with client() as corral:
            if import_dir:
                accepted = corral.import_vm(file, name)
            elif corral.url is None:
                accepted = corral.import_vm(os.path.abspath(file), name)
            else:
                accepted = corral.import_vm(None, name, upload=upload_file(corral, Path(file), as_json))
            job = follow_job(corral, accepted, f"import {os.path.basename(file)}", quiet=as_json)
        assert job is not None
        print_json(job) if as_json else print(f"imported VM {job['result']['vm']} (start it with "
                                              f"`corral vm start {job['result']['vm']}`)")

    run(action)


def register_vm_commands(vm_app: typer.Typer) -> None:
    """`vm export` and `vm import` live under `corral vm` but here, beside the backups they resemble."""
    vm_app.command("export")(export_vm)
    vm_app.command("import")(import_vm)
