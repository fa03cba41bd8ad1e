"""`corral vm start|stop|restart|pause|resume|migrate|delete|clone|fork`: verbs that run a job on a VM."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, follow_required, print_json, run
from corral.cli.vm_options import TIMEOUT
from corral.cli.vm_view import summary


def verb(name: str, what: str, call: str, as_json: bool, wait_timeout: float | None = None, **kwargs: Any) -> None:
    def action() -> None:
        with client() as corral:
            accepted = getattr(corral, call)(name, **kwargs)
            job = follow_job(corral, accepted, f"{what} {name}", quiet=as_json, timeout=wait_timeout)
            vm = corral.vm(name)
        if as_json:
            print_json({"vm": vm, "job": job})
        else:
            summary(vm)

    run(action)


def start(
    name: str,
    wait: bool = typer.Option(False, "--wait", help="Wait until the guest agent answers."),
    timeout: float = TIMEOUT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a stopped VM."""
    verb(name, "start", "start_vm", as_json, timeout + 60 if wait else None, wait=wait, ready_timeout=timeout)


def stop(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="Power off at once, without asking the guest."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds the guest gets before it is forced off."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop a VM: ACPI power-down, then force it off after --timeout."""
    verb(name, "stop", "stop_vm", as_json, None, force=force, timeout=timeout)


def restart(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="Force it off instead of ACPI."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds the guest gets to power off."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the guest agent answers again."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop and start a VM (a fresh QEMU process)."""
    verb(name, "restart", "restart_vm", as_json, None, force=force, timeout=timeout, wait=wait)


def pause(name: str, as_json: bool = JSON_OPTION) -> None:
    """Freeze a running VM's vCPUs."""
    verb(name, "pause", "pause_vm", as_json)


def resume(name: str, as_json: bool = JSON_OPTION) -> None:
    """Resume a paused VM."""
    verb(name, "resume", "resume_vm", as_json)


def migrate(
    name: str,
    to: str = typer.Option(None, "--to", help="Destination host (default: the scheduler chooses)."),
    live: bool = typer.Option(None, "--live/--offline", help="Move it running (default when it runs) or stopped."),
    with_storage: bool = typer.Option(
        None,
        "--with-storage/--shared-storage",
        help="Copy the disks too (default: exactly when the two hosts do not share their storage pool).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Move a VM to another host: live (RAM, and disks without shared storage) or, stopped, on shared storage."""

    def action() -> None:
        with client() as corral:
            accepted = corral.migrate_vm(name, to=to, live=live, with_storage=with_storage)
            job = follow_job(corral, accepted, f"migrate {name}", quiet=as_json)
            vm = corral.vm(name)
        if as_json:
            print_json({"vm": vm, "job": job})
            return
        result = (job or {}).get("result") or {}
        if result:
            print(
                f"VM {name} moved from {result.get('from')} to {result.get('to')} "
                f"in {result.get('total_s', 0):.2f} s, "
                f"downtime {result.get('downtime_ms')} ms (guest paused {result.get('paused_ms')} ms)"
                + (", disks copied" if result.get("with_storage") else "")
            )
        else:
            print(f"VM {name} is now on host {vm['host']}")

    run(action)


def delete(
    name: str,
    keep_disks: bool = typer.Option(False, "--keep-disks", help="Keep its volumes (they stay listed)."),
    force: bool = typer.Option(False, "--force", "-f", help="Delete even if it is running."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a VM and, unless --keep-disks, its disks."""

    def action() -> None:
        with client() as corral:
            job = follow_job(
                corral, corral.delete_vm(name, keep_disks=keep_disks, force=force), f"delete {name}", quiet=as_json
            )
        if as_json:
            print_json(job)
        else:
            kept = (job or {}).get("result", {}).get("kept_volumes") or []
            print(f"deleted VM {name}" + (f"; kept volumes: {', '.join(kept)}" if kept else ""))

    run(action)


def clone(
    source: str = typer.Argument(..., help="VM to clone."),
    name: str = typer.Argument(..., help="Name of the new VM."),
    linked: bool = typer.Option(False, "--linked/--full", help="Linked (instant, shares a frozen base) or full copy."),
    from_snapshot: str = typer.Option(None, "--from-snapshot", help="Copy the disks as they were at a snapshot."),
    start: bool = typer.Option(False, "--start", help="Start the clone."),
    wait: bool = typer.Option(False, "--wait", help="With --start: wait until its guest agent answers."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Clone a VM with a new identity (name, hostname, MACs, machine id)."""

    def action() -> None:
        with client() as corral:
            accepted = corral.clone_vm(source, name, linked, from_snapshot, start, wait and start)
            follow_job(corral, accepted, f"clone {source} -> {name}", quiet=as_json)
            vm = corral.vm(name)  # a ready guest's addresses come with its readiness
        print_json(vm) if as_json else summary(vm)

    run(action)


def fork(
    source: str = typer.Argument(..., help="A running VM (started --forkable: the fastest forks)."),
    name: str = typer.Argument(..., help="Name of the child (with --count N: NAME-1 ... NAME-N)."),
    count: int = typer.Option(1, "--count", "-n", help="How many children."),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="Return once the children run, before they answer with their new identity."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Instant clone of a running VM: children resume from its current memory and CPU state."""

    def action() -> None:
        with client() as corral:
            accepted = corral.fork_vm(source, name, count, wait=not no_wait)
            job = follow_required(corral, accepted, f"fork {source}", quiet=as_json)
            children = [corral.vm(child) for child in job["result"]["children"]]
        if as_json:
            print_json({"job": job, "children": children})
        else:
            result = job["result"]
            print(
                f"forked {source} into {', '.join(result['children'])}: parent paused "
                f"{result['parent_pause_ms']:.0f} ms, children running after {result['child_ready_ms']:.0f} ms"
            )

    run(action)
