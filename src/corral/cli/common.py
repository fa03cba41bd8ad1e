"""What every command shares: the SDK client, output as tables or JSON, errors as one line, job progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import typer

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON.")


def client():  # type: ignore[no-untyped-def]
    from corral.client import Client

    return Client()


def fail(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    text = f"error: {message}"
    if hint:
        text += f" (hint: {hint})"
    print(text, file=sys.stderr)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    grid = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    Console(soft_wrap=True).print(grid)


def human_size(value: int | None) -> str:
    from corral.spec.sizes import format_size

    return "-" if value is None else format_size(int(value))


def follow_job(
    corral: Any, accepted: dict[str, Any], what: str, quiet: bool = False, timeout: float | None = None
) -> dict[str, Any] | None:
    """Wait for the job in an API answer, with a progress bar on a terminal and plain lines elsewhere."""
    job = accepted.get("job")
    if job is None:
        return None
    if quiet or not sys.stderr.isatty():
        last = {"message": None}

        def plain(update: dict[str, Any]) -> None:
            if not quiet and update["message"] != last["message"] and update["state"] == "running":
                print(f"{what}: {update['message']}", file=sys.stderr)
            last["message"] = update["message"]

        return corral.wait_job(job["id"], timeout=timeout, on_progress=plain)

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task(what, total=1.0)

        def bar(update: dict[str, Any]) -> None:
            progress.update(task, completed=update["progress"], description=f"{what}: {update['message']}")

        return corral.wait_job(job["id"], timeout=timeout, on_progress=bar)


def follow_required(
    corral: Any, accepted: dict[str, Any], what: str, quiet: bool = False, timeout: float | None = None
) -> dict[str, Any]:
    """``follow_job`` for verbs the API always answers with a job (their commands read its result): an answer
    without one is a daemon of another version, said in one line rather than as a traceback."""
    job = follow_job(corral, accepted, what, quiet=quiet, timeout=timeout)
    if job is None:
        fail(f"the daemon answered {what} without a job", "run a daemon of the same corral version as this CLI")
    return job


def run(action: Callable[[], Any]) -> Any:
    """Run a command body, turning corral's errors into one line and a non-zero exit."""
    from corral.errors import CorralError

    try:
        return action()
    except CorralError as exc:
        fail(exc.message, exc.hint, exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
