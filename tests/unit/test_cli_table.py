"""The CLI's tables: aligned by display width, cells printed as they are, bold only on a terminal."""

from __future__ import annotations

import io
import sys

import pytest

from corral.cli.common import display_width, table


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _printed(monkeypatch: pytest.MonkeyPatch, *args: object, terminal: bool = False, **kwargs: object) -> str:
    out = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    table(*args, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def test_columns_line_up_two_spaces_apart_without_trailing_blanks(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _printed(monkeypatch, ["NAME", "STATE", "IP"], [["web-1", "running", None], ["db", "stopped", "10.0.0.2"]])
    assert text.splitlines() == ["NAME   STATE    IP", "web-1  running", "db     stopped  10.0.0.2"]


def test_a_cell_is_printed_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _printed(monkeypatch, ["DESCRIPTION"], [["[bold]not markup[/bold] :smile:"]])
    assert "[bold]not markup[/bold] :smile:" in text


def test_wide_characters_take_two_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    assert display_width("日本") == 4
    assert display_width("e\u0301") == 1
    lines = _printed(monkeypatch, ["A", "B"], [["日本", "x"], ["abcde", "y"]]).splitlines()
    first, second = lines[1], lines[2]
    assert display_width(first[: first.index("x")]) == display_width(second[: second.index("y")]) == 7


def test_short_rows_title_and_bold_header_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _printed(monkeypatch, ["A", "B"], [["1"]], title="Things", terminal=True).splitlines()
    assert lines == ["Things", "\033[1mA  B\033[0m", "1"]
    assert "\033[" not in _printed(monkeypatch, ["A"], [["1"]])
