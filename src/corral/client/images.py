"""The SDK's templates, images (built, imported, uploaded) and volumes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from corral.client.connection import TRANSFER_CHUNK, Connection, Transfer
from corral.errors import CorralError


class ImagesApi(Connection):
    """Templates, images and volumes."""

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
