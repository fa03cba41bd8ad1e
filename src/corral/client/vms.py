"""The SDK's VMs: their life, guest access, clones and forks, live changes (`vm set`, disks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from corral.client.jobs import JobsApi


class VmsApi(JobsApi):
    """VMs: create, start, stop, exec, clone, fork, resize."""

    def vms(self) -> list[dict[str, Any]]:
        return self.request("GET", "/vms")

    def vm(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/vms/{name}")

    def create_vm(
        self,
        spec: dict[str, Any],
        start: bool = False,
        wait: bool = False,
        volumes: list[str] | None = None,
        host: str | None = None,
        template: str | None = None,
        ready_timeout: float | None = None,
        group: str | None = None,
        policy: str | None = None,
        accel: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Create a VM; with ``dry_run``, the placement plan instead (every host's verdict), changing nothing."""
        body = {
            "spec": spec,
            "start": start,
            "wait": wait,
            "ready_timeout": ready_timeout,
            "volumes": volumes or [],
            "host": host,
            "template": template,
            **{key: value for key, value in (("group", group), ("policy", policy), ("accel", accel)) if value},
        }
        return self.request("POST", "/placement/plan" if dry_run else "/vms", json=body)

    def start_vm(self, name: str, wait: bool = False, ready_timeout: float | None = None) -> dict[str, Any]:
        return self.request("POST", f"/vms/{name}/start", json={"wait": wait, "ready_timeout": ready_timeout})

    def stop_vm(self, name: str, force: bool = False, timeout: float | None = None) -> dict[str, Any]:
        return self.request("POST", f"/vms/{name}/stop", json={"force": force, "timeout": timeout})

    def restart_vm(
        self, name: str, force: bool = False, timeout: float | None = None, wait: bool = False
    ) -> dict[str, Any]:
        return self.request("POST", f"/vms/{name}/restart", json={"force": force, "timeout": timeout, "wait": wait})

    def pause_vm(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/vms/{name}/pause")

    def resume_vm(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/vms/{name}/resume")

    def delete_vm(self, name: str, keep_disks: bool = False, force: bool = False) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{name}", params={"keep_disks": keep_disks, "force": force})

    def exec_vm(self, name: str, argv: list[str], timeout: float = 60, stdin: str | None = None) -> dict[str, Any]:
        """Run a command in the guest and return its result (exit_code, stdout, stderr)."""
        accepted = self.request("POST", f"/vms/{name}/exec", json={"argv": argv, "timeout": timeout, "stdin": stdin})
        job = self.wait_job(accepted["job"]["id"], timeout=timeout + 30)
        return job["result"]

    def vm_logs(self, name: str, lines: int = 200, follow: bool = False) -> Iterator[bytes]:
        return self.stream(f"/vms/{name}/logs", {"lines": lines, "follow": follow})

    def clone_vm(
        self,
        source: str,
        name: str,
        linked: bool = False,
        from_snapshot: str | None = None,
        start: bool = False,
        wait: bool = False,
    ) -> dict[str, Any]:
        body = {"name": name, "linked": linked, "from_snapshot": from_snapshot, "start": start, "wait": wait}
        return self.request("POST", f"/vms/{source}/clone", json=body)

    def fork_vm(
        self,
        source: str,
        name: str,
        count: int = 1,
        wait: bool = True,
        networks: dict[str, str] | None = None,
        keep_macs: bool = False,
    ) -> dict[str, Any]:
        """``wait=False``: the job ends as soon as the children run (they renew their identity meanwhile).
        ``networks``/``keep_macs``: children on other networks with the parent's MACs (an isolated copy)."""
        body = {"name": name, "count": count, "wait": wait, "networks": networks or {}, "keep_macs": keep_macs}
        return self.request("POST", f"/vms/{source}/fork", json=body)

    def resize_vm(self, vm: str, **changes: Any) -> dict[str, Any]:
        """`vm set`: memory, cpus, cpu_limit, cpu_weight, max_memory, max_cpus, ha, ha_priority, min_memory (the
        floor of automatic ballooning); None values are left out."""
        return self.request("POST", f"/vms/{vm}/resize", json={k: v for k, v in changes.items() if v is not None})

    def add_disk(self, vm: str, size: str | int | None = None, volume: str | None = None) -> dict[str, Any]:
        body = {key: value for key, value in (("size", size), ("volume", volume)) if value is not None}
        return self.request("POST", f"/vms/{vm}/disks", json=body)

    def remove_disk(self, vm: str, volume: str) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{vm}/disks/{volume}")
