"""The CLI loads a command's module only when that command runs (cli/main.py), and still shows every command in
`corral --help` with its own help line. The timing itself is a benchmark (benchmarks/cli_startup.py)."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from corral.cli.main import _LOADERS, COMMANDS, app, load_commands

PROBE = """
import json, sys
sys.argv = ["corral", *json.loads(sys.argv[1])]
from corral.cli.main import main
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print(json.dumps({"code": code, "cli": sorted(m for m in sys.modules if m.startswith("corral.cli.")),
                  "httpx_cli": "httpx._main" in sys.modules and sys.modules["httpx._main"] is not None,
                  "heavy": sorted(m for m in ("pydantic", "rich", "sqlalchemy", "fastapi") if m in sys.modules)}))
"""


def _run(tmp_path, *args: str) -> dict:
    """`corral ARGS` in a fresh interpreter; what it imported, from its last line."""
    env = {"CORRAL_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)], env=env, capture_output=True, text=True, timeout=60
    )
    return {**json.loads(result.stdout.splitlines()[-1]), "stdout": result.stdout, "stderr": result.stderr}


def test_the_help_table_matches_every_command():
    """The line `corral --help` shows for a command is the command's own, and the table names each command once,
    with the loader that really makes it."""
    made = {}
    for loader in _LOADERS:
        for name, command in load_commands(loader).items():
            assert name not in made, f"{name} is made by both {made[name][0]} and {loader}"
            made[name] = (loader, command)
    assert set(made) == set(COMMANDS)
    for name, (loader, command) in made.items():
        shown = (command.short_help or command.help or "").split("\n\n")[0].strip()
        assert COMMANDS[name] == (loader, shown), name


def test_help_lists_every_command_without_importing_one(tmp_path):
    probe = _run(tmp_path, "--help")
    assert probe["code"] == 0
    assert probe["cli"] == ["corral.cli.main"]
    for name in COMMANDS:
        assert f" {name} " in probe["stdout"]


def test_a_command_loads_its_own_modules_only(tmp_path):
    """`vm list` with no daemon: the one-line error as before, after loading cli/vm.py (and what adds `vm`
    commands), not the other commands, nor httpx's own command line."""
    probe = _run(tmp_path, "vm", "list")
    assert probe["code"] != 0
    assert "corral serve" in probe["stderr"] or "not running" in probe["stderr"]
    assert "corral.cli.vm" in probe["cli"] and "corral.cli.backup" in probe["cli"]  # `vm export` lives there
    for other in ("corral.cli.image", "corral.cli.access", "corral.cli.serve", "corral.cli.env"):
        assert other not in probe["cli"]
    assert not probe["httpx_cli"]
    # Typer 0.29 and later import pydantic to coerce every option (~0.07 s a command): pyproject.toml keeps
    # Typer below it. Rich is for help pages and progress bars, not for reading options or printing a table.
    assert probe["heavy"] == []


def test_a_mistyped_command_is_still_suggested():
    result = CliRunner().invoke(app, ["serv"])
    assert result.exit_code == 2
    assert "Did you mean 'serve'" in result.output
