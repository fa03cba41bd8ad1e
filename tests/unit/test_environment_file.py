"""corral.yaml: the schema, and errors that name the file and the line a user must fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import InvalidInput
from corral.spec.environment import default_env_name, load, parse, scoped

EXAMPLE = """\
networks:
  lan: {mode: isolated, subnet: 10.80.0.0/24}
vms:
  web: {image: tiny, memory: 256M, networks: [lan], provision: ["echo ready > /root/provisioned"]}
  db:  {image: tiny, memory: 256M, networks: [lan]}
"""


def test_the_issue_example_parses_as_written() -> None:
    config = parse(EXAMPLE)
    assert list(config.vms) == ["web", "db"]
    assert config.networks["lan"].subnet == "10.80.0.0/24"
    assert config.vms["web"].commands() == [["sh", "-c", "echo ready > /root/provisioned"]]
    assert config.vms["web"].members("web") == ["web"]
    assert not config.vms["web"].is_forkable()


def test_groups_are_numbered_and_forkable() -> None:
    config = parse("vms:\n  app: {image: tiny, count: 3}\n  one: {image: tiny, count: 1}\n")
    assert config.vms["app"].members("app") == ["app-1", "app-2", "app-3"]
    assert config.vms["one"].members("one") == ["one-1"]  # a group of one, which `corral scale` can grow
    assert config.vms["app"].is_forkable()


def test_provision_digest_follows_the_commands() -> None:
    one = parse(EXAMPLE).vms["web"]
    two = parse(EXAMPLE.replace("echo ready", "echo steady")).vms["web"]
    assert one.provision_digest() != two.provision_digest()
    assert one.provision_digest() == parse(EXAMPLE).vms["web"].provision_digest()


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (EXAMPLE.replace("256M, networks: [lan], provision", "25x, networks: [lan], provision"), 4, "memory"),
        (EXAMPLE.replace("  db:", "  web:"), 5, "duplicate name 'web'"),
        (EXAMPLE.replace("networks: [lan]}", "networks: [lam]}"), 5, "'lam'"),
        (EXAMPLE.replace("10.80.0.0/24", "8.8.8.0/24"), 2, "not a private range"),
        (EXAMPLE + "  cache: {image: tiny, size: 1G}\n", 6, "size"),
        (EXAMPLE + "  bare: {memory: 1G}\n", 6, "exactly one of image or template"),
        (EXAMPLE + "  app: {image: tiny, count: 2}\n  app-1: {image: tiny}\n", 7, "duplicate VM name 'app-1'"),
        ("vms: [1, 2\n", 2, "not valid YAML"),
        ("- a list\n", 1, "must be a mapping"),
    ],
)
def test_bad_files_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(text, "corral.yaml")
    assert caught.value.message.startswith(f"corral.yaml:{line}:"), caught.value.message
    assert words in caught.value.message
    assert caught.value.hint


def test_load_reads_a_file_and_refuses_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "corral.yaml"
    path.write_text(EXAMPLE)
    assert "web" in load(path).vms
    with pytest.raises(InvalidInput, match="cannot read"):
        load(tmp_path / "nope.yaml")


def test_names_are_scoped_by_environment(tmp_path: Path) -> None:
    assert scoped("shop", "web-1") == "shop-web-1"
    with pytest.raises(InvalidInput):
        scoped("x" * 60, "web")  # too long for a name: refused, never truncated into a collision
    checkout = tmp_path / "My_Project.v2"
    checkout.mkdir()
    assert default_env_name(checkout) == "my-project-v2"
