"""Resource names: short, DNS-label-like, safe as file names and hostnames."""

from __future__ import annotations

import re

from corral.errors import InvalidInput

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def validate_name(name: str, kind: str = "name") -> str:
    """Return ``name`` if it can name a resource, else raise with the rule spelled out.

    The same rule serves as hostname, file name and URL segment, which is why it is strict: lowercase letters,
    digits and dashes, starting with a letter or digit, at most 63 characters.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid {kind} {name!r}",
            "use 1-63 lowercase letters, digits or '-', starting with a letter or digit",
        )
    return name
