"""`corral backup ...` and `corral vm export / import`: copies of VMs that outlive them."""

from __future__ import annotations

import os
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, follow_required, human_size, print_json, run, table
from corral.errors import InvalidInput

app = typer.Typer(help="Back up VMs (full or incremental, running or stopped) and restore them.", no_args_is_help=True)


@app.command()
def create(
    vm: str = typer.Argument(..., help="VM name."),
    incremental: bool = typer.Option(
        False, "--incremental", "-i", help="Copy only what changed since the VM's last backup."
    ),
    name: str = typer.Option(None, "--name", "-n", help="Backup name (default: kind and time)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Back up every disk of a VM at one instant; a running VM keeps running."""

    def action() -> None:
        with client() as corral:
            job = follow_required(corral, corral.create_backup(vm, name, incremental), f"backup {vm}", quiet=as_json)
        if as_json:
            print_json(job)
            return
        result = job["result"]
        how = "live" + (", filesystems frozen" if result["frozen"] else "") if result["live"] else "offline"
        print(
            f"backed up {vm}: {result['kind']} backup {result['backup']}, {human_size(result['bytes'])} written ({how})"
        )

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
            table(
                ["VM", "NAME", "KIND", "BASED ON", "SIZE", "STATE", "CREATED", "VERIFIED"],
                [
                    (
                        r["vm"],
                        r["name"],
                        r["kind"] + (" (live)" if r["live"] else ""),
                        r["parent"] or "-",
                        human_size(r["size"]),
                        r["state"],
                        r["created_at"][:19],
                        _verified(r),
                    )
                    for r in rows
                ],
            )

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
        print(
            f"  taken: {row['created_at'][:19]} ({'live' if row['live'] else 'offline'}"
            f"{', by its schedule' if row.get('scheduled') else ''})"
        )
        print(f"  verified: {_verified(row)}" + (f": {row['verify_error']}" if row.get("verify_error") else ""))
        spec = row.get("spec") or {}
        print(f"  spec: {spec.get('cpus')} vCPUs, {human_size(spec.get('memory'))}, image {spec.get('image')}")
        for disk in row["disks"]:
            print(f"  disk{disk['index']}: {human_size(disk['size'])}, {human_size(disk['written'])} in this backup")

    run(action)


def _verified(row: dict[str, Any]) -> str:
    """``ok 2025-01-01T12:00:00``, ``CORRUPT ...`` or ``never``."""
    state = row.get("verify_state")
    if state is None:
        return "never"
    return f"{'ok' if state == 'ok' else state.upper()} {(row.get('verified_at') or '')[:19]}"


@app.command()
def verify(
    vm: str,
    name: str,
    boot: bool = typer.Option(
        False,
        "--boot",
        help="Then restore it into a scratch VM, start it until its guest agent answers, and delete the scratch VM.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Read a backup's whole chain back: each file against the SHA-256 recorded when it was made, qemu-img check,
    and every block of every disk. The outcome is kept and shown by `backup list/show`; corrupt exits 1."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.verify_backup(vm, name), f"verify {name}", quiet=as_json)
            assert job is not None
            if boot:
                job["result"]["boot"] = _boot_test(corral, vm, name, as_json)
        if as_json:
            print_json(job)
            return
        result = job["result"]
        print(
            f"backup {name} of {vm} is ok: {len(result['chain'])} backup(s) read back, "
            f"{human_size(result['bytes'])} checked against their checksums"
        )
        if boot:
            print(
                f"  restored into scratch VM {result['boot']['vm']}, whose guest agent answered after "
                f"{result['boot']['seconds']:.1f} s; the scratch VM is deleted"
            )
        if result["unrecorded"]:
            print(
                f"  no checksum was recorded for {', '.join(result['unrecorded'])} (made before corral recorded "
                "them): read back and checked, not compared"
            )

    run(action)


@app.command()
def schedule(
    what: str = typer.Argument(
        ..., metavar="VM | list | rm VM | set VM", help="A VM to schedule (or `set VM`), `list`, or `rm VM`."
    ),
    vm: str = typer.Argument(None, help="The VM, after `rm` or `set`."),
    every: str = typer.Option(None, "--every", help="Interval: 30s, 15m, 1h, 1d, 1w."),
    keep_last: int = typer.Option(24, "--keep-last", help="Keep the N newest scheduled backups."),
    keep_daily: int = typer.Option(7, "--keep-daily", help="Keep the newest of each of the last N days."),
    keep_weekly: int = typer.Option(4, "--keep-weekly", help="Keep the newest of each of the last N weeks."),
    incremental_every: int = typer.Option(
        0, "--incremental-every", help="N incremental backups after each full one (0: all full)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Back a VM up periodically and prune by retention (never a backup others build on). The control plane
    fires it; `backup schedule list` shows when next, `backup schedule rm VM` ends it (its backups stay)."""

    def action() -> None:
        with client() as corral:
            if what == "list" and vm is None:
                rows = corral.backup_schedules()
                if as_json:
                    print_json(rows)
                elif not rows:
                    print("no backup schedules")
                else:
                    table(
                        ["VM", "EVERY", "KEEP LAST/DAILY/WEEKLY", "INCREMENTALS", "NEXT", "LAST", "ERROR"],
                        [
                            (
                                r["vm"],
                                _seconds(r["every"]),
                                f"{r['keep_last']}/{r['keep_daily']}/{r['keep_weekly']}",
                                str(r["incremental_every"]),
                                r["next_at"][:19],
                                (r["last_at"] or "-")[:19],
                                r["last_error"] or "-",
                            )
                            for r in rows
                        ],
                    )
                return
            if what == "rm":
                if vm is None:
                    raise InvalidInput("`backup schedule rm` needs the VM", "write `corral backup schedule rm VM`")
                corral.remove_backup_schedule(vm)
                print_json({"vm": vm, "removed": True}) if as_json else print(
                    f"removed the backup schedule of {vm} (its backups stay)"
                )
                return
            target = vm if what == "set" else what
            if vm is not None and what != "set":
                raise InvalidInput(f"unexpected argument {vm!r}", "write `corral backup schedule VM --every 1h`")
            if target is None or every is None:
                raise InvalidInput(
                    "a schedule needs the VM and --every", "write `corral backup schedule VM --every 1h`"
                )
            row = corral.set_backup_schedule(target, every, keep_last, keep_daily, keep_weekly, incremental_every)
            if as_json:
                print_json(row)
            else:
                print(
                    f"backing up {target} every {_seconds(row['every'])}, keeping the last {row['keep_last']}, "
                    f"{row['keep_daily']} daily, {row['keep_weekly']} weekly; next at {row['next_at'][:19]}"
                )

    run(action)


def _boot_test(corral: Any, vm: str, name: str, quiet: bool) -> dict[str, Any]:
    """The restore test: the backup made into a new VM (its own name, MACs and machine id), started until its
    guest agent answers, then deleted whatever happened. Any failure fails the command."""
    import contextlib
    import secrets
    import time

    from corral.errors import CorralError

    scratch = f"verify-{secrets.token_hex(4)}"
    started = time.monotonic()
    try:
        follow_job(corral, corral.restore_backup(vm, name, scratch), f"restore into {scratch}", quiet=quiet)
        follow_job(
            corral, corral.start_vm(scratch, wait=True, ready_timeout=120), f"boot {scratch}", quiet=quiet, timeout=180
        )
        return {"vm": scratch, "ok": True, "seconds": time.monotonic() - started}
    finally:
        with contextlib.suppress(CorralError):
            follow_job(corral, corral.delete_vm(scratch, force=True), f"delete {scratch}", quiet=True)


def _seconds(value: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


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
            job = follow_required(corral, corral.restore_backup(vm, name, as_name), f"restore {name}", quiet=as_json)
        if as_json:
            print_json(job)
        else:
            target = job["result"]["vm"]
            print(
                f"restored backup {name} of {vm} into {'new VM ' if job['result']['new'] else ''}{target} "
                f"(start it with `corral vm start {target}`)"
            )

    run(action)


def export_vm(
    vm: str = typer.Argument(..., help="VM name."),
    file: str = typer.Argument(
        ...,
        help="The archive to write (FILE.tar): here when the server is remote, on the server host on the local socket.",
    ),
    compress: bool = typer.Option(False, "--compress", help="gzip the archive (tar only)."),
    format: str = typer.Option(
        None,
        "--format",
        help="tar (corral's own) or ova (OVF 1.x with streamOptimized "
        "VMDKs, for VirtualBox, VMware and qemu-img); default: ova for FILE.ova, else tar.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a VM's spec and flattened disks, with checksums, to one tar archive or an OVA (downloaded from a
    remote)."""
    from corral.cli.image import transfer_bar

    kind = format or ("ova" if file.endswith(".ova") else "tar")

    def action() -> None:
        if kind not in ("tar", "ova"):
            raise InvalidInput(f"unknown export format {kind!r}", "choose --format tar or --format ova")
        with client() as corral:
            if corral.url is None:
                job = follow_job(
                    corral, corral.export_vm(vm, os.path.abspath(file), compress, kind), f"export {vm}", quiet=as_json
                )
            else:
                if os.path.lexists(file):
                    raise InvalidInput(f"{file} already exists", "choose a new file name, or remove the old one")
                job = follow_job(corral, corral.export_vm(vm, None, compress, kind), f"export {vm}", quiet=as_json)
                assert job is not None
                with transfer_bar(f"downloading {os.path.basename(file)}", as_json) as progress:
                    corral.download_export(job["result"]["export"], file, progress)
                job["result"]["file"] = os.path.abspath(file)
        assert job is not None
        print_json(job) if as_json else print(
            f"exported {vm} to {job['result']['file']} ({human_size(job['result']['bytes'])})"
        )

    run(action)


def import_vm(
    file: str = typer.Argument(
        ...,
        help="A corral export (.tar), an OVA, or a libvirt domain XML (`virsh dumpxml`; "
        "the local socket only): uploaded when the server is remote, on the server host on "
        "the local socket.",
    ),
    name: str = typer.Option(None, "--name", "-n", help="Name of the new VM (default: the exported VM's)."),
    network: str = typer.Option(
        None,
        "--network",
        help="Put every NIC on this corral network (default: as "
        "exported; user-mode NAT for an OVA or a libvirt domain).",
    ),
    start: bool = typer.Option(False, "--start", help="Start the VM once imported."),
    import_dir: bool = typer.Option(False, "--import-dir", help="FILE is a name in the server's import directory."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a new VM from an export, an OVA or a libvirt domain (told apart by content); the input is checked in
    full before the VM can be used, and what corral cannot map is listed, one line each."""
    from pathlib import Path

    from corral.cli.image import upload_file

    def action() -> None:
        with client() as corral:
            if import_dir:
                accepted = corral.import_vm(file, name, network=network)
            elif corral.url is None:
                accepted = corral.import_vm(os.path.abspath(file), name, network=network)
            else:
                accepted = corral.import_vm(
                    None, name, upload=upload_file(corral, Path(file), as_json), network=network
                )
            job = follow_job(corral, accepted, f"import {os.path.basename(file)}", quiet=as_json)
            assert job is not None
            if start:
                follow_job(corral, corral.start_vm(job["result"]["vm"]), f"start {job['result']['vm']}", quiet=as_json)
        if as_json:
            print_json(job)
            return
        for line in job["result"].get("warnings") or []:
            print(f"warning: {line}")
        vm_name = job["result"]["vm"]
        print(
            f"imported VM {vm_name}" + (" and started it" if start else f" (start it with `corral vm start {vm_name}`)")
        )

    run(action)


def register_vm_commands(vm_app: typer.Typer) -> None:
    """`vm export` and `vm import` live under `corral vm` but here, beside the backups they resemble."""
    vm_app.command("export")(export_vm)
    vm_app.command("import")(import_vm)
