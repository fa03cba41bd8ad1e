"""The SDK's copies of a VM: snapshots, backups and their schedules, replicas, exports and imports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from corral.client.connection import TRANSFER_CHUNK, Connection, Transfer
from corral.errors import CorralError, error_from_problem


class BackupsApi(Connection):
    """Snapshots, backups, replication, export and import."""

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
