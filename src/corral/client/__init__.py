"""The Python SDK: corral's REST API over httpx, on the daemon's unix socket or a URL.

    from corral.client import Client
    with Client() as corral:
        job = corral.create_vm({"name": "web", "image": "tiny"}, start=True, wait=True)
        corral.wait_job(job["id"])

Errors come back as the same exception types the server raised (NotFound, Conflict, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from corral.errors import (
    CorralError,
    DaemonNotRunning,
    JobFailed,
    Timeout,
    TooManyRequests,
    Unauthorized,
    error_from_problem,
)
from corral.paths import default_home

Progress = Callable[[dict[str, Any]], None]
Transfer = Callable[[int, int], None]  # (bytes so far, total bytes; 0 if unknown)
TRANSFER_CHUNK = 1 << 20


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class Client:
    """A connection to one daemon: its unix socket (as local root), or a URL with a token.

    Where to connect: ``url``, else CORRAL_URL, else the remote chosen with `corral remote switch`, else the unix
    socket under ``home``. An explicit ``home`` always means that home's socket. The token comes from ``token``,
    CORRAL_TOKEN or the remote; the project (sent with every request) from ``project``, CORRAL_PROJECT or the
    remote. HTTPS certificates are checked against the remote's pinned certificate when the URL is a configured
    remote, against the system's CAs otherwise, or not at all with ``insecure`` (CORRAL_INSECURE=1).
    """

    def __init__(
        self,
        url: str | None = None,
        home: Path | str | None = None,
        timeout: float = 30.0,
        *,
        token: str | None = None,
        project: str | None = None,
        insecure: bool | None = None,
    ) -> None:
        from corral.client import remotes

        remote = None
        if url is None and home is None:
            url = os.environ.get("CORRAL_URL") or None
            remote = remotes.for_url(url) if url else remotes.current()
            if remote is not None and url is None:
                url = remote["url"]
        elif url is not None:
            remote = remotes.for_url(url)
        self.url = url
        self.home = Path(home or os.environ.get("CORRAL_HOME") or default_home())
        self.socket_path = self.home / "corral.sock"
        self.token = token or os.environ.get("CORRAL_TOKEN") or (remote or {}).get("token")
        self.project = project or os.environ.get("CORRAL_PROJECT") or (remote or {}).get("project")
        insecure = _truthy(os.environ.get("CORRAL_INSECURE")) if insecure is None else insecure
        headers = {"Authorization": f"Bearer {self.token}"} if self.token and self.url else {}
        params = {"project": self.project} if self.project else {}
        self.tls_verify: bool | object = True
        if self.url:
            verify: bool | object = True
            if insecure:
                verify = False
            elif remote is not None and remote.get("certificate"):
                verify = remotes.pinned_context(remote["certificate"])
            self.tls_verify = verify  # what the websocket console trusts too
            self._http = httpx.Client(
                base_url=self.url,
                timeout=timeout,
                headers=headers,
                params=params,
                verify=verify,  # type: ignore[arg-type]
            )
        else:
            # Plain HTTP on the unix socket: no TLS, so no certificate store to load (~0.05 s of every command).
            transport = httpx.HTTPTransport(uds=str(self.socket_path), verify=False)
            self._http = httpx.Client(
                base_url="http://corral", transport=transport, timeout=timeout, headers=headers, params=params
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _not_running(self) -> DaemonNotRunning:
        where = self.url or str(self.socket_path)
        return DaemonNotRunning(
            f"the corral daemon is not running (no answer on {where})",
            "start it with `corral serve` (or `corral serve --detach`)",
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise Unauthorized(
                    f"the certificate of {self.url} is not trusted: {exc}",
                    "pin it with `corral remote add NAME URL`, or set CORRAL_INSECURE=1 to skip the check",
                ) from exc
            raise self._not_running() from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"the daemon did not answer {method} {path} in time") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                raise CorralError(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}") from None
            raise error_from_problem(body)
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[bytes]:
        try:
            with self._http.stream("GET", path, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_problem(response.json())
                yield from response.iter_bytes()
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise self._not_running() from exc

    # -- host -------------------------------------------------------------------------------------------------

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

    # -- jobs -------------------------------------------------------------------------------------------------

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

    # -- VMs --------------------------------------------------------------------------------------------------

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

    # -- snapshots --------------------------------------------------------------------------------------------

    def snapshots(self, vm: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/vms/{vm}/snapshots")

    def create_snapshot(self, vm: str, name: str, memory: bool | None = None, description: str = "") -> dict[str, Any]:
        body = {"name": name, "memory": memory, "description": description}
        return self.request("POST", f"/vms/{vm}/snapshots", json=body)

    def revert_snapshot(self, vm: str, name: str, wait: bool = False) -> dict[str, Any]:
        return self.request("POST", f"/vms/{vm}/snapshots/{name}/revert", json={"wait": wait})

    def delete_snapshot(self, vm: str, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{vm}/snapshots/{name}")

    # -- backups, export, import ------------------------------------------------------------------------------

    def backups(self, vm: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", "/backups", params={"vm": vm} if vm else None)

    def backup(self, vm: str, name: str) -> dict[str, Any]:
        return self.request("GET", f"/vms/{vm}/backups/{name}")

    def create_backup(self, vm: str, name: str | None = None, incremental: bool = False) -> dict[str, Any]:
        """Back up a VM's disks (running or stopped); follow the returned job."""
        return self.request("POST", f"/vms/{vm}/backups", json={"name": name, "incremental": incremental})

    def delete_backup(self, vm: str, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{vm}/backups/{name}")

    def restore_backup(self, vm: str, name: str, as_name: str | None = None) -> dict[str, Any]:
        """Into a new VM (``as_name``), or over ``vm`` when it is stopped (or anew when it no longer exists)."""
        return self.request("POST", f"/vms/{vm}/backups/{name}/restore", json={"as_name": as_name})

    def verify_backup(self, vm: str, name: str) -> dict[str, Any]:
        """Read the backup's chain back against its recorded checksums; follow the returned job."""
        return self.request("POST", f"/vms/{vm}/backups/{name}/verify")

    def backup_schedules(self) -> list[dict[str, Any]]:
        return self.request("GET", "/backup-schedules")

    def set_backup_schedule(
        self,
        vm: str,
        every: str,
        keep_last: int = 24,
        keep_daily: int = 7,
        keep_weekly: int = 4,
        incremental_every: int = 0,
    ) -> dict[str, Any]:
        """Make or replace a VM's backup schedule (``every``: 30s, 15m, 1h, 1d, 1w or seconds)."""
        return self.request(
            "PUT",
            f"/vms/{vm}/backup-schedule",
            json={
                "every": every,
                "keep_last": keep_last,
                "keep_daily": keep_daily,
                "keep_weekly": keep_weekly,
                "incremental_every": incremental_every,
            },
        )

    def remove_backup_schedule(self, vm: str) -> None:
        self.request("DELETE", f"/vms/{vm}/backup-schedule")

    # -- replication -------------------------------------------------------------------------------------------

    def replicate_vm(self, vm: str, to: str, every: str | None = None) -> dict[str, Any]:
        """Make (or re-time) the VM's replica on host ``to`` and copy now; ``{"replica", "job"}``."""
        return self.request("PUT", f"/vms/{vm}/replica", json={"to": to, "every": every})

    def replicas(self) -> list[dict[str, Any]]:
        return self.request("GET", "/replicas")

    def replica(self, vm: str) -> dict[str, Any]:
        return self.request("GET", f"/vms/{vm}/replica")

    def remove_replica(self, vm: str) -> dict[str, Any]:
        """The replica goes; its files on the partner by the returned job."""
        return self.request("DELETE", f"/vms/{vm}/replica")

    def failover_vm(self, vm: str, to: str | None = None) -> dict[str, Any]:
        """Start the VM from its newest replica (refused while it may still run on its own host)."""
        return self.request("POST", f"/vms/{vm}/failover", json={"to": to})

    def export_vm(
        self, vm: str, file: str | None = None, compress: bool = False, format: str = "tar"
    ) -> dict[str, Any]:
        """Write spec and flattened disks to a tar (``format="ova"``: an OVF 1.x OVA): at ``file``, an absolute
        path on the server host (the local admin only), or, with no ``file``, kept on the server for
        :meth:`download_export` (the finished job's result names the export's id)."""
        body: dict[str, Any] = {"file": file, "compress": compress}
        if format != "tar":
            body["format"] = format
        return self.request("POST", f"/vms/{vm}/export", json=body)

    def import_vm(
        self, file: str | None = None, name: str | None = None, upload: str | None = None, network: str | None = None
    ) -> dict[str, Any]:
        """From an upload id (:meth:`upload`), a plain name in the server's import directory, or a host path
        (the local admin only): a corral export, an OVA, or (the local admin only) a libvirt domain XML."""
        body: dict[str, Any] = {"file": file, "name": name, "upload": upload}
        if network is not None:
            body["network"] = network
        return self.request("POST", "/vms/import", json=body)

    def download_export(self, export_id: str, target: Path | str, progress: Transfer | None = None) -> int:
        """Stream an export made without a file to ``target`` (a new file, 0600; written beside it and renamed
        when complete), then delete it on the server. Returns the bytes written."""
        target = Path(target)
        partial = target.with_name(f".{target.name}.partial")
        done = 0
        try:
            with self._http.stream("GET", f"/exports/{export_id}", timeout=httpx.Timeout(600.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_problem(response.json())
                total = int(response.headers.get("content-length") or 0)
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.iter_bytes(TRANSFER_CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                if total and done != total:
                    raise CorralError(f"the export ended after {done} of {total} bytes", "download it again")
            if target.exists():
                raise CorralError(f"{target} already exists", "choose a new file name")
            os.replace(partial, target)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise self._not_running() from exc
        except httpx.HTTPError as exc:
            raise CorralError(f"the download of export {export_id[:12]} broke off: {exc}", "download it again") from exc
        finally:
            partial.unlink(missing_ok=True)
        self.request("DELETE", f"/exports/{export_id}")
        return done

    # -- clones and templates ---------------------------------------------------------------------------------

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

    def templates(self) -> list[dict[str, Any]]:
        return self.request("GET", "/templates")

    def create_template(self, name: str, source: str) -> dict[str, Any]:
        return self.request("POST", "/templates", json={"name": name, "source": source})

    def delete_template(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/templates/{name}")

    # -- images and volumes -----------------------------------------------------------------------------------

    def images(self) -> list[dict[str, Any]]:
        return self.request("GET", "/images")

    def build_image(
        self,
        recipe: str = "tiny",
        name: str | None = None,
        release: str | None = None,
        packages: list[str] | None = None,
        size: str | int | None = None,
    ) -> dict[str, Any]:
        body = {"recipe": recipe, "name": name, "release": release, "packages": packages or [], "size": size}
        return self.request("POST", "/images/build", json=body)

    def import_image(
        self,
        name: str,
        file: str | None = None,
        kernel: str | None = None,
        initrd: str | None = None,
        cmdline: str | None = None,
        cloud_init: bool = False,
        firmware: str | None = None,
        *,
        upload: str | None = None,
        kernel_upload: str | None = None,
        initrd_upload: str | None = None,
        disk_format: str | None = None,
    ) -> dict[str, Any]:
        """Each of the disk, kernel and initrd from an upload id (:meth:`upload`), or from a file: a plain name in
        the server's import directory, or a host path (the local admin only). ``disk_format``: raw or qcow2
        (None: qcow2 if the file starts with qcow2's magic, else raw)."""
        body = {
            "name": name,
            "file": file,
            "kernel": kernel,
            "initrd": initrd,
            "cmdline": cmdline,
            "cloud_init": cloud_init,
            "firmware": firmware,
            "upload": upload,
            "kernel_upload": kernel_upload,
            "initrd_upload": initrd_upload,
            "format": disk_format,
        }
        return self.request("POST", "/images/import", json={k: v for k, v in body.items() if v is not None})

    def upload(self, path: Path | str, progress: Transfer | None = None) -> dict[str, Any]:
        """Stream a local file to the server (never read whole into memory): the answer's ``id`` is what
        :meth:`import_image` and :meth:`import_vm` take. ``progress(sent, total)`` is called per chunk."""
        path = Path(path)
        with path.open("rb") as handle:
            total = os.fstat(handle.fileno()).st_size

            def chunks() -> Iterator[bytes]:
                sent = 0
                while chunk := handle.read(TRANSFER_CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(sent, total)

            headers = {"Content-Length": str(total), "Content-Type": "application/octet-stream"}
            try:
                return self.request("POST", "/uploads", content=chunks(), headers=headers, timeout=httpx.Timeout(600.0))
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                raise CorralError(
                    f"the server cut the upload of {path.name} off: {exc}",
                    "it may be larger than the server's max_upload_size or the project's disk quota",
                ) from exc

    def delete_upload(self, upload_id: str) -> None:
        self.request("DELETE", f"/uploads/{upload_id}")

    def delete_image(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/images/{name}")

    def volumes(self) -> list[dict[str, Any]]:
        return self.request("GET", "/volumes")

    def create_volume(self, name: str, size: str | int) -> dict[str, Any]:
        return self.request("POST", "/volumes", json={"name": name, "size": size})

    def resize_volume(self, name: str, size: str | int) -> dict[str, Any]:
        return self.request("POST", f"/volumes/{name}/resize", json={"size": size})

    def delete_volume(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/volumes/{name}")

    # -- networks ---------------------------------------------------------------------------------------------

    def networks(self) -> list[dict[str, Any]]:
        return self.request("GET", "/networks")

    def network(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/networks/{name}")

    def create_network(
        self,
        name: str,
        mode: str = "nat",
        subnet: str | None = None,
        uplink: str | None = None,
        dhcp: bool = True,
        vni: int | None = None,
        mtu: int | None = None,
    ) -> dict[str, Any]:
        body = {"name": name, "mode": mode, "subnet": subnet, "uplink": uplink, "dhcp": dhcp, "vni": vni, "mtu": mtu}
        return self.request("POST", "/networks", json={k: v for k, v in body.items() if v is not None})

    def delete_network(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/networks/{name}")

    def add_nic(self, vm: str, network: str, mac: str | None = None) -> dict[str, Any]:
        body = {"network": network, **({"mac": mac} if mac else {})}
        return self.request("POST", f"/vms/{vm}/nics", json=body)

    def remove_nic(self, vm: str, nic: str | int) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{vm}/nics/{nic}")

    def resize_vm(self, vm: str, **changes: Any) -> dict[str, Any]:
        """`vm set`: memory, cpus, cpu_limit, cpu_weight, max_memory, max_cpus, ha, ha_priority, min_memory (the
        floor of automatic ballooning); None values are left out."""
        return self.request("POST", f"/vms/{vm}/resize", json={k: v for k, v in changes.items() if v is not None})

    def add_disk(self, vm: str, size: str | int | None = None, volume: str | None = None) -> dict[str, Any]:
        body = {key: value for key, value in (("size", size), ("volume", volume)) if value is not None}
        return self.request("POST", f"/vms/{vm}/disks", json=body)

    def remove_disk(self, vm: str, volume: str) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{vm}/disks/{volume}")

    def add_port_forward(self, vm: str, host_port: int, guest_port: int, protocol: str = "tcp") -> dict[str, Any]:
        body = {"host_port": host_port, "guest_port": guest_port, "protocol": protocol}
        return self.request("POST", f"/vms/{vm}/port-forwards", json=body)

    def remove_port_forward(self, vm: str, host_port: int, protocol: str = "tcp") -> dict[str, Any]:
        body = {"host_port": host_port, "protocol": protocol}
        return self.request("POST", f"/vms/{vm}/port-forwards/remove", json=body)

    # -- projects, users, tokens, audit, events ---------------------------------------------------------------

    def projects(self) -> list[dict[str, Any]]:
        return self.request("GET", "/projects")

    def project_info(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/projects/{name}")

    def create_project(self, name: str, description: str = "", **quotas: int | str | None) -> dict[str, Any]:
        return self.request("POST", "/projects", json={"name": name, "description": description, **quotas})

    def update_project(self, name: str, **changes: int | str | None) -> dict[str, Any]:
        """Only the fields given change; a quota given as None is removed."""
        return self.request("PATCH", f"/projects/{name}", json=changes)

    def delete_project(self, name: str) -> None:
        self.request("DELETE", f"/projects/{name}")

    def users(self) -> list[dict[str, Any]]:
        return self.request("GET", "/users")

    def create_user(self, name: str, cluster_admin: bool = False) -> dict[str, Any]:
        return self.request("POST", "/users", json={"name": name, "cluster_admin": cluster_admin})

    def delete_user(self, name: str) -> None:
        self.request("DELETE", f"/users/{name}")

    def tokens(self, user: str | None = None, project: str | None = None) -> list[dict[str, Any]]:
        params = {key: value for key, value in (("user", user), ("of-project", project)) if value}
        return self.request("GET", "/tokens", params=params)

    def create_token(
        self, user: str, project: str, role: str, expires: str | None = None, description: str = ""
    ) -> dict[str, Any]:
        """A new token; its ``secret`` is in this answer only."""
        body = {"user": user, "project": project, "role": role, "expires": expires, "description": description}
        return self.request("POST", "/tokens", json=body)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.request("POST", f"/tokens/{token_id}/revoke")

    def audit(self, limit: int = 100, all_projects: bool = False) -> list[dict[str, Any]]:
        return self.request("GET", "/audit", params={"limit": limit, "all_projects": all_projects})

    def events(
        self,
        follow: bool = False,
        kind: str | None = None,
        resource: str | None = None,
        types: list[str] | None = None,
        after: int | None = None,
        limit: int = 100,
        all_projects: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Events as dicts, from GET /events (server-sent events); with ``follow``, until the caller stops."""
        import json

        params: dict[str, Any] = {"follow": follow, "limit": limit, "all_projects": all_projects}
        for key, value in (("kind", kind), ("resource", resource), ("after", after), ("type", types)):
            if value is not None:
                params[key] = value
        buffer = b""
        for chunk in self.stream("/events", params):
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                data = [line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:")]
                if data:
                    yield json.loads(b"\n".join(data))
