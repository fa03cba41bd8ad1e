"""The SDK's tenants and their trail: projects, users, tokens, the audit log and events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from corral.client.connection import Connection


class AccessApi(Connection):
    """Projects, users, tokens, audit and events."""

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
