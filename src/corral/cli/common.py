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
    """Columns aligned by display width, two spaces apart, the header in bold on a terminal. Written here rather
    than with Rich's Table: importing Rich costs a listing command ~30 ms, a quarter of its start-up, and a cell
    is printed as the text it is (Rich would read `[bold]` in a name as markup)."""
    header = list(columns)
    body = [["" if cell is None else str(cell) for cell in row] for row in rows]
    body = [cells + [""] * (len(header) - len(cells)) for cells in body]
    widths = [max(display_width(text) for text in column) for column in zip(header, *body, strict=True)]
    bold = sys.stdout.isatty()
    lines = [title] if title else []
    for index, cells in enumerate([header, *body]):
        padded = "  ".join(
            text + " " * (width - display_width(text)) for text, width in zip(cells, widths, strict=True)
        )
        line = padded.rstrip()
        lines.append(f"\033[1m{line}\033[0m" if bold and index == 0 else line)
    print("\n".join(lines))


def display_width(text: str) -> int:
    """Terminal columns a text takes: East Asian wide and full-width characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text
    )


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
