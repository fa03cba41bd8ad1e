"""The SDK's hosts and pool: capacity, draining, usage history, balancing and consolidation plans, standby."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from corral.client.connection import Connection
from corral.errors import Timeout


class HostsApi(Connection):
    """Hosts, the pool and its plans (docs/optimization.md)."""

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def hosts(self) -> list[dict[str, Any]]:
        return self.request("GET", "/hosts")

    def host(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/hosts/{name}")

    def drain_host(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/hosts/{name}/drain")

    def undrain_host(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/hosts/{name}/undrain")

    def remove_host(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/hosts/{name}")

    def evacuate_host(self, name: str) -> dict[str, Any]:
        """Drain a host and move its VMs off: {"job": the drain job or None, "plan": where each VM goes}."""
        return self.request("POST", f"/hosts/{name}/evacuate")

    def migrate_vm(
        self, name: str, to: str | None = None, live: bool | None = None, with_storage: bool | None = None
    ) -> dict[str, Any]:
        """Move a VM to another host (``to`` None: the scheduler chooses); follow the returned job."""
        return self.request("POST", f"/vms/{name}/migrate", json={"to": to, "live": live, "with_storage": with_storage})

    def pool(self) -> dict[str, Any]:
        return self.request("GET", "/pool")

    # -- usage history, plans, standby (docs/optimization.md) ------------------------------------------------

    def vm_stats(self, name: str, since: str | None = None) -> dict[str, Any]:
        """A VM's usage history: points at the finest tier that covers ``since`` (30m, 1h, 1d), averages, peaks."""
        return self.request("GET", f"/vms/{name}/stats", params={"since": since} if since else None)

    def host_stats(self, name: str, since: str | None = None) -> dict[str, Any]:
        return self.request("GET", f"/hosts/{name}/stats", params={"since": since} if since else None)

    def balance_pool(self, threshold: int = 3, apply: bool = False, max_moves: int = 10) -> dict[str, Any]:
        """A stored balancing plan (``apply``: approved and running already); follow it with :meth:`wait_plan`."""
        return self.request(
            "POST", "/pool/balance", json={"threshold": threshold, "apply": apply, "max_moves": max_moves}
        )

    def consolidate_pool(self, apply: bool = False, solver_time_limit: float = 5.0) -> dict[str, Any]:
        return self.request("POST", "/pool/consolidate", json={"apply": apply, "solver_time_limit": solver_time_limit})

    def pool_status(self) -> dict[str, Any]:
        """The automatic modes (balancing, consolidation, ballooning) and what their last rounds did."""
        return self.request("GET", "/pool/status")

    def plans(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.request("GET", "/pool/plans", params={"limit": limit})

    def plan(self, plan_id: str) -> dict[str, Any]:
        return self.request("GET", f"/pool/plans/{plan_id}")

    def approve_plan(self, plan_id: str) -> dict[str, Any]:
        return self.request("POST", f"/pool/plans/{plan_id}/approve")

    def cancel_plan(self, plan_id: str) -> dict[str, Any]:
        return self.request("POST", f"/pool/plans/{plan_id}/cancel")

    def wait_plan(
        self,
        plan_id: str,
        timeout: float | None = None,
        interval: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a plan until it is no longer approved or running; returns its last view."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            plan = self.plan(plan_id)
            if on_progress is not None:
                on_progress(plan)
            if plan["state"] not in ("approved", "running"):
                return plan
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"plan {plan_id} is still {plan['state']}", "follow it with `corral pool plan show`")
            time.sleep(interval)

    def standby_host(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/hosts/{name}/standby")

    def wake_host(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/hosts/{name}/wake")

    def metrics(self) -> str:
        """The Prometheus exposition text of /metrics."""
        return self.request("GET", "/metrics")
