"""The store: desired state, observed state and jobs, in SQLite (one host) or PostgreSQL (a cluster).

It is the only channel between the control plane and the agents.
"""

# Every ORM session writes events for the state changes it flushes (see corral.store.events).
from corral.store import events as _events  # noqa: F401
