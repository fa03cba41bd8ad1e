"""`corral image ...`: the images VMs boot from."""

from __future__ import annotations

from pathlib import Path

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, human_size, print_json, run, table

app = typer.Typer(help="Build, import and remove images.", no_args_is_help=True)


@app.command()
def build(
    recipe: str = typer.Argument("tiny", help="tiny (busybox + guest agent) or debian (cloud-init, SSH)."),
    name: str = typer.Option(None, "--name", help="Image name (default: the recipe's name)."),
    release: str = typer.Option(None, "--release", help="debian: the release (default bookworm)."),
    packages: str = typer.Option("", "--packages", help="debian: extra packages, comma-separated."),
    size: str = typer.Option(None, "--size", help="debian: root disk size (default 4G)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Build an image from a recipe (cached: a second build is instant)."""
    extra = [p.strip() for p in packages.split(",") if p.strip()]

    def action() -> None:
        with client() as corral:
            accepted = corral.build_image(recipe, name, release=release, packages=extra, size=size)
            job = follow_job(corral, accepted, f"build {recipe}", quiet=as_json, timeout=3600)
            image = next(i for i in corral.images() if i["name"] == accepted["image"]["name"])
        if as_json:
            print_json(image)
        else:
            note = "" if job else " (already built)"
            print(f"image {image['name']} is {image['state']}{note}: {human_size(image['virtual_size'])} disk")

    run(action)


@app.command("import")
def import_image(
    name: str = typer.Argument(..., help="Name for the image."),
    file: Path = typer.Argument(..., help="A qcow2 or raw disk image."),
    kernel: Path = typer.Option(None, "--kernel", help="Boot this kernel directly."),
    initrd: Path = typer.Option(None, "--initrd", help="Initrd for --kernel."),
    cmdline: str = typer.Option(None, "--cmdline", help="Kernel command line for --kernel."),
    cloud_init: bool = typer.Option(False, "--cloud-init", help="A cloud image: give its VMs a NoCloud seed."),
    firmware: str = typer.Option(None, "--firmware", help="What the disk boots through: bios (default) or uefi."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import a disk image (and optionally a kernel and initrd) from a file."""

    def action() -> None:
        with client() as corral:
            accepted = corral.import_image(
                name,
                str(file.absolute()),
                str(kernel.absolute()) if kernel else None,
                str(initrd.absolute()) if initrd else None,
                cmdline,
                cloud_init,
                firmware,
            )
            follow_job(corral, accepted, f"import {name}", quiet=as_json, timeout=3600)
            image = next(i for i in corral.images() if i["name"] == name)
        if as_json:
            print_json(image)
        else:
            boots = f", boots through {image['details']['firmware']}" if image["details"].get("firmware") else ""
            print(f"imported image {name}: {human_size(image['virtual_size'])} {image['kind']} image{boots}")

    run(action)


@app.command("list")
def list_images(as_json: bool = JSON_OPTION) -> None:
    """List images."""

    def action() -> None:
        with client() as corral:
            images = corral.images()
        if as_json:
            print_json(images)
            return
        table(
            ["NAME", "STATE", "KIND", "DISK", "ON DISK", "SOURCE"],
            [
                [
                    i["name"],
                    i["state"],
                    i["kind"],
                    human_size(i["virtual_size"]),
                    human_size(i["size_on_disk"]),
                    i["source"],
                ]
                for i in images
            ],
        )

    run(action)


@app.command("rm")
def remove(name: str, as_json: bool = JSON_OPTION) -> None:
    """Remove an image no VM uses."""

    def action() -> None:
        with client() as corral:
            job = follow_job(corral, corral.delete_image(name), f"remove {name}", quiet=as_json)
        print_json(job) if as_json else print(f"removed image {name}")

    run(action)
