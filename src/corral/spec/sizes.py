"""Sizes written by people: ``256M``, ``1G``, ``10GiB``, ``512k``, or plain bytes.

Units are binary (``1G`` is 1024**3), as in QEMU and qemu-img, so that a size given to corral means the same
thing when it reaches QEMU.
"""

from __future__ import annotations

import re

from corral.errors import InvalidInput

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
MAX_SIZE = 1 << 50


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse a size into bytes; reject negatives, unknown units and absurd values with the accepted form."""
    if isinstance(text, bool):
        raise InvalidInput(f"invalid {what} {text!r}", "write a size such as 256M, 1G or 10GiB")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise InvalidInput(f"invalid {what} {text!r}", "write a size such as 256M, 1G or 10GiB")
        number, unit = match.groups()
        value = int(float(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise InvalidInput(f"invalid {what} {text!r}: must be greater than zero", "write a size such as 1G")
    if value > MAX_SIZE:
        raise InvalidInput(f"invalid {what} {text!r}: larger than 1P", "write a size such as 1G")
    return value


def format_size(value: int) -> str:
    """The shortest exact binary form (``1G``, ``256M``), or one decimal place when not exact."""
    for unit in ("P", "T", "G", "M", "K"):
        factor = _UNITS[unit.lower()]
        if value >= factor:
            if value % factor == 0:
                return f"{value // factor}{unit}"
            return f"{value / factor:.1f}{unit}"
    return f"{value}B"
