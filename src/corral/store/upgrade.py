"""`python -m corral.store.upgrade`: bring the store whose URL comes on standard input to the newest schema, in a
process of its own.

A daemon that finds its store behind (a new home, or after an upgrade) migrates through this rather than in
itself: Alembic and Mako then never enter the long-running process (~12.5 MiB of an idle daemon's RSS, issue 17,
docs/performance.md). The URL comes on stdin because a PostgreSQL URL can hold a password, which any user can
read in /proc/PID/cmdline. A failure is the error's problem body as one JSON line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys

from corral.errors import CorralError
from corral.store.db import Store


def main() -> int:
    store = Store(sys.stdin.read().strip())
    try:
        store.migrate()
    except CorralError as error:
        print(json.dumps(error.to_problem()), file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
