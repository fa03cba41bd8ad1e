"""The SDK's jobs: every change the daemon makes is one, and callers follow it here."""

from __future__ import annotations

import time
from typing import Any

from corral.client.connection import Connection, Progress
from corral.errors import CorralError, JobFailed, Timeout, TooManyRequests, error_from_problem


class JobsApi(Connection):
    """List, follow and cancel jobs."""

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")

    def jobs(self, limit: int = 50, active: bool = False) -> list[dict[str, Any]]:
        return self.request("GET", "/jobs", params={"limit": limit, "active": active})

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel")

    def wait_job(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Progress | None = None,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        """Follow a job until it ends (long-polling, so progress arrives as it happens)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.job(job_id)
        while True:
            if on_progress is not None:
                on_progress(job)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(
                    f"job {job_id[:12]} ({job['kind']}) did not finish within {timeout:.0f} s",
                    f"follow it with `corral job wait {job_id[:12]}`",
                )
            wait = 20.0 if deadline is None else max(0.0, min(20.0, deadline - time.monotonic()))
            try:
                job = self.request(
                    "GET", f"/jobs/{job_id}", params={"wait": wait, "version": job["version"]}, timeout=wait + 10
                )
            except TooManyRequests:
                # This token already holds its share of long polls (many commands at once): poll plainly.
                time.sleep(min(1.0, wait))
                job = self.job(job_id)
        if raise_on_failure and job["state"] != "succeeded":
            error = error_from_problem(
                {
                    "type": f"urn:corral:error:{job.get('error_code') or 'job-failed'}",
                    "detail": job.get("error") or f"job {job['state']}",
                    "hint": job.get("error_hint"),
                }
            )
            if type(error) is CorralError:
                error = JobFailed(error.message, error.hint)
            raise error
        return job
