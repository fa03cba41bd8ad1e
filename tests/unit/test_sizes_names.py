import pytest

from corral.errors import InvalidInput
from corral.spec.names import validate_name
from corral.spec.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("10GiB", 10 << 30),
        ("512k", 512 << 10),
        ("1.5G", int(1.5 * (1 << 30))),
        ("4096", 4096),
        (" 2 G ", 2 << 30),
        ("3T", 3 << 40),
        (1024, 1024),
    ],
)
def test_parse_size_accepts_what_people_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-1", "12Q", "0", "", "G", "1..2G", "1e9", "2000P", True, "1 G B"])
def test_parse_size_rejects_nonsense_with_a_hint(text):
    with pytest.raises(InvalidInput) as err:
        parse_size(text)
    assert err.value.hint


def test_format_size_is_exact_when_it_can_be():
    assert format_size(256 << 20) == "256M"
    assert format_size(1 << 30) == "1G"
    assert format_size(1536 << 20) == "1.5G"
    assert format_size(100) == "100B"


@pytest.mark.parametrize("name", ["demo", "a", "web-1", "0vm", "a" * 63])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "Web", "a_b", "a.b", "a/b", "../x", "a" * 64, "é", "a b"])
def test_invalid_names(name):
    with pytest.raises(InvalidInput) as err:
        validate_name(name, "VM name")
    assert "VM name" in err.value.message
