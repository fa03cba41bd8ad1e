"""The SDK's connection to one daemon: where it is, the token and project, TLS, and errors as exceptions.
The resource methods (client/vms.py, ...) all go through `Connection.request`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import httpx

from corral.errors import (
    CorralError,
    DaemonNotRunning,
    Timeout,
    Unauthorized,
    error_from_problem,
)
from corral.paths import default_home

Progress = Callable[[dict[str, Any]], None]
Transfer = Callable[[int, int], None]  # (bytes so far, total bytes; 0 if unknown)
TRANSFER_CHUNK = 1 << 20


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class Connection:
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
        insecure = truthy(os.environ.get("CORRAL_INSECURE")) if insecure is None else insecure
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

    def __enter__(self) -> Self:
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
