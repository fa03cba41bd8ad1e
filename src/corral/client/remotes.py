"""Remotes: named corral servers the CLI and SDK can talk to, like ``incus remote``.

They live in ``$XDG_CONFIG_HOME/corral/remotes.json`` (mode 0600: it holds tokens). Each remote keeps the server's
certificate as seen when it was added, and connections trust exactly that certificate (pinning): a self-signed
daemon is then as safe as one with a CA-issued certificate, and a different certificate later is refused. The
built-in remote ``local`` is the daemon's unix socket.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from corral.errors import AlreadyExists, Conflict, DaemonNotRunning, InvalidInput, NotFound

LOCAL = "local"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "remotes.json"


def load() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {"current": LOCAL, "remotes": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}", "fix or remove the file") from exc
    data.setdefault("current", LOCAL)
    data.setdefault("remotes", {})
    return data


def save(data: dict[str, Any]) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    temporary.replace(path)


def current() -> dict[str, Any] | None:
    """The remote `remote switch` chose, or None for the local socket."""
    data = load()
    name = data.get("current", LOCAL)
    if name == LOCAL:
        return None
    remote = data["remotes"].get(name)
    if remote is None:
        raise NotFound(f"the current remote {name!r} is not configured", "run `corral remote switch local`")
    return {"name": name, **remote}


def for_url(url: str) -> dict[str, Any] | None:
    """The configured remote with this URL (to reuse its pinned certificate when CORRAL_URL names it)."""
    for name, remote in load()["remotes"].items():
        if remote.get("url", "").rstrip("/") == url.rstrip("/"):
            return {"name": name, **remote}
    return None


def parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInput(f"invalid remote URL {url!r}", "write https://HOST:PORT, e.g. https://corral.lan:8443")
    return parts.hostname, parts.port or 443


def fetch_certificate(url: str, timeout: float = 10.0) -> str:
    """The PEM certificate the server presents (not verified: the caller pins it after showing its fingerprint)."""
    host, port = parse_url(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise DaemonNotRunning(
            f"cannot reach {url}: {exc}", "check the URL and that `corral serve --listen` runs"
        ) from exc
    if der is None:
        raise Conflict(f"{url} presented no certificate", "is it a corral daemon?")
    return ssl.DER_cert_to_PEM_cert(der)


def pinned_context(pem: str) -> ssl.SSLContext:
    """Trust exactly this certificate. Its name is not checked: the pin already identifies the server, and a
    self-signed certificate rarely names every address a client uses to reach the host."""
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = False
    return context


def add(name: str, url: str, token: str | None, certificate: str, fingerprint: str, project: str | None) -> None:
    from corral.spec.names import validate_name

    validate_name(name, "remote name")
    if name == LOCAL:
        raise InvalidInput("the remote name 'local' is reserved for this host's socket", "choose another name")
    data = load()
    if name in data["remotes"]:
        raise AlreadyExists(f"remote {name!r} already exists", f"remove it first: `corral remote remove {name}`")
    data["remotes"][name] = {
        "url": url.rstrip("/"),
        "token": token,
        "project": project,
        "fingerprint": fingerprint,
        "certificate": certificate,
    }
    save(data)


def remove(name: str) -> None:
    data = load()
    if name not in data["remotes"]:
        raise NotFound(f"remote {name!r} not found", "list remotes with `corral remote list`")
    del data["remotes"][name]
    if data.get("current") == name:
        data["current"] = LOCAL
    save(data)


def switch(name: str) -> None:
    data = load()
    if name != LOCAL and name not in data["remotes"]:
        raise NotFound(f"remote {name!r} not found", "list remotes with `corral remote list`")
    data["current"] = name
    save(data)
