"""What a job handler is given and what it is: the job context and the handler type.

In a module of its own so that the job modules (``*_jobs.py``) and the registry (``handlers.py``) need nothing from
``agent.py`` but the Agent's type, and the agent needs nothing from them but the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, NotFound
from corral.spec import job_params
from corral.spec.job_params import P
from corral.store import jobs

if TYPE_CHECKING:
    from corral.host.agent import Agent


class JobCancelled(CorralError):
    code = "cancelled"
    http_status = 409


@dataclass
class JobContext:
    """What a job handler gets: the job's identity and parameters, and a way to report progress."""

    agent: Agent
    job_id: str
    kind: str
    target_id: str | None
    target_name: str
    params: dict[str, Any]  # as stored; handlers read them typed, through ``params_as``
    project: str
    cancelled: bool = False

    def params_as(self, model: type[P]) -> P:
        """The job's parameters as its kind's model (corral.spec.job_params.PARAMS)."""
        return job_params.parse(model, self.params)

    def vm_id(self) -> str:
        """The id of the VM the job is about; NotFound when the job names none (its VM was deleted meanwhile)."""
        if self.target_id is None:
            raise NotFound(f"VM {self.target_name} not found")
        return self.target_id

    def progress(self, fraction: float | None, message: str | None = None) -> None:
        """Report progress. If the user asked to cancel, this raises JobCancelled: the handler's failure path
        then undoes what it made, as for any other error."""
        if jobs.report(self.agent.store, self.job_id, fraction, message):
            self.cancelled = True
            raise JobCancelled(f"{self.kind} of {self.target_name} was cancelled")

    def note(self, fraction: float | None, message: str | None = None) -> None:
        """Report progress where stopping halfway would do harm (a stop, a copy in a thread): a cancel request
        is remembered and honoured at the next safe point, ``check_cancelled``."""
        with contextlib.suppress(JobCancelled):
            self.progress(fraction, message)

    def check_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled(f"{self.kind} of {self.target_name} was cancelled")


Handler = Callable[[JobContext], Awaitable[dict[str, Any] | None]]
