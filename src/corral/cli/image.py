"""`corral image ...`: the images VMs boot from."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, follow_job, human_size, print_json, run, table
from corral.errors import InvalidInput

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


@contextlib.contextmanager
def transfer_bar(what: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar for an upload or a download (rich on a terminal, a line per 10% elsewhere)."""
    if quiet:
        yield lambda _done, _total: None
        return
    if not sys.stderr.isatty():
        shown = {"step": -1}

        def plain(done: int, total: int) -> None:
            step = 10 if not total else min(10, done * 10 // total)
            if step != shown["step"]:
                shown["step"] = step
                print(f"{what}: {step * 10}% of {human_size(total)}", file=sys.stderr)

        yield plain
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as progress:  # fmt: skip
        task = progress.add_task(what, total=None)

        def bar(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        yield bar


def upload_file(corral: Any, path: Path, quiet: bool = False) -> str:
    """Upload a local file to a remote server with a progress bar; its upload id."""
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist or is not a file", "check the path")
    with transfer_bar(f"uploading {path.name}", quiet) as progress:
        return corral.upload(path, progress)["id"]


@app.command("import")
def import_image(
    name: str = typer.Argument(..., help="Name for the image."),
    file: Path = typer.Argument(..., help="A qcow2 or raw disk image (uploaded when the server is remote)."),
    kernel: Path = typer.Option(None, "--kernel", help="Boot this kernel directly."),
    initrd: Path = typer.Option(None, "--initrd", help="Initrd for --kernel."),
    cmdline: str = typer.Option(None, "--cmdline", help="Kernel command line for --kernel."),
    cloud_init: bool = typer.Option(False, "--cloud-init", help="A cloud image: give its VMs a NoCloud seed."),
    firmware: str = typer.Option(None, "--firmware", help="What the disk boots through: bios (default) or uefi."),
    disk_format: str = typer.Option(None, "--format", help="raw or qcow2 (default: qcow2 if it starts as one)."),
    import_dir: bool = typer.Option(
        False, "--import-dir", help="FILE, --kernel and --initrd are names in the server's import directory."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import a disk image (and optionally a kernel and initrd): uploaded to a remote server, by path on the local
    socket, or named in the server's import directory."""

    def action() -> None:
        with client() as corral:
            paths: dict[str, str | None] = {}
            uploads: dict[str, str | None] = {}
            for key, given in (("file", file), ("kernel", kernel), ("initrd", initrd)):
                if given is None:
                    continue
                if import_dir:
                    paths[key] = str(given)
                elif corral.url is None:
                    paths[key] = str(given.absolute())
                else:
                    uploads[f"{key}_upload" if key != "file" else "upload"] = upload_file(corral, given, as_json)
            accepted = corral.import_image(
                name,
                paths.get("file"),
                paths.get("kernel"),
                paths.get("initrd"),
                cmdline,
                cloud_init,
                firmware,
                disk_format=disk_format,
                **uploads,
            )
            follow_job(corral, accepted, f"import {name}", quiet=as_json, timeout=3600)
            image = corral.request("GET", f"/images/{name}")
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
