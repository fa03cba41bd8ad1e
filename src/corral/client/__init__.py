"""The Python SDK: corral's REST API over httpx, on the daemon's unix socket or a URL.

    from corral.client import Client
    with Client() as corral:
        job = corral.create_vm({"name": "web", "image": "tiny"}, start=True, wait=True)
        corral.wait_job(job["id"])

Errors come back as the same exception types the server raised (NotFound, Conflict, ...).

`Client` is composed of one class per resource (client/vms.py, client/jobs.py, ...) over the connection in
client/connection.py; the names importable from here are the same as before the split.
"""

from __future__ import annotations

from corral.client.access import AccessApi
from corral.client.backups import BackupsApi
from corral.client.connection import TRANSFER_CHUNK, Connection, Progress, Transfer
from corral.client.hosts import HostsApi
from corral.client.images import ImagesApi
from corral.client.jobs import JobsApi
from corral.client.networks import NetworksApi
from corral.client.vms import VmsApi
from corral.errors import (
    CorralError,
    DaemonNotRunning,
    JobFailed,
    Timeout,
    TooManyRequests,
    Unauthorized,
    error_from_problem,
)

__all__ = [
    "TRANSFER_CHUNK",
    "Client",
    "Connection",
    "CorralError",
    "DaemonNotRunning",
    "JobFailed",
    "Progress",
    "Timeout",
    "TooManyRequests",
    "Transfer",
    "Unauthorized",
    "error_from_problem",
]


class Client(VmsApi, JobsApi, HostsApi, BackupsApi, ImagesApi, NetworksApi, AccessApi, Connection):
    """A connection to one daemon (see `Connection` for where it connects, with which token and project), with
    every resource's methods."""
