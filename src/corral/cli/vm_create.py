"""`corral vm create|run`: define a VM (and start it); their shared options live in cli/vm_options.py."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, print_json, run, table
from corral.cli.vm_options import SpecOptions, spec_options
from corral.cli.vm_view import summary


def _show_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    rule = f", group {plan['group']} ({plan['policy']})" if plan.get("group") else ""
    print(
        f"placement ({plan['strategy']}{rule}): "
        + (f"would choose {plan['chosen']}" if plan["chosen"] else "no host can take this VM")
    )
    table(
        ["HOST", "VERDICT", "ALLOCATED", "VCPUS", "MEMORY", "WHY"],
        [
            [
                v["host"],
                "chosen" if v["chosen"] else ("fits" if v["fits"] else "rejected"),
                f"{v['weight']:.0%}",
                v["allocation"].get("cpus", ""),
                v["allocation"].get("memory", ""),
                v["reason"],
            ]
            for v in plan["hosts"]
        ],
    )
    if not plan["chosen"]:
        raise typer.Exit(1)


def _create(
    spec: dict[str, Any], start: bool, wait: bool, as_json: bool, template: str | None, options: SpecOptions
) -> None:
    name = spec["name"]

    def action() -> None:
        with client() as corral:
            accepted = corral.create_vm(
                spec,
                start=start,
                wait=wait,
                volumes=options.volume or [],
                template=template,
                ready_timeout=options.timeout,
                dry_run=options.dry_run,
                **options.placement(),
            )
            if options.dry_run:
                _show_plan(accepted, as_json)
                return
            follow_job(corral, accepted, f"vm {name}", quiet=as_json, timeout=options.timeout + 60 if wait else None)
            vm = corral.vm(name)  # a ready guest's addresses come with its readiness
        if as_json:
            print_json(vm)
        else:
            summary(vm)

    run(action)


@spec_options
def create(
    name: str = typer.Argument(..., help="VM name: lowercase letters, digits and '-'."),
    start: bool = typer.Option(False, "--start", help="Start it once created."),
    wait: bool = typer.Option(False, "--wait", help="With --start: wait until the guest agent answers."),
    template: str = typer.Option(None, "--template", "-t", help="Make a linked clone of this template."),
    as_json: bool = JSON_OPTION,
    *,
    options: SpecOptions,
) -> None:
    """Define a VM: its disks are made (a linked overlay of the image or template, plus blank ones)."""
    _create(options.spec(name), start, wait and start, as_json, template, options)


@spec_options
def run_vm(
    name: str = typer.Argument(..., help="VM name."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the guest agent answers."),
    template: str = typer.Option(None, "--template", "-t", help="Make a linked clone of this template."),
    as_json: bool = JSON_OPTION,
    *,
    options: SpecOptions,
) -> None:
    """Create and start a VM, and wait until its guest is ready."""
    _create(options.spec(name), True, wait, as_json, template, options)
