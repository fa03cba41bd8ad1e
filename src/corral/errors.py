"""One exception hierarchy for every layer.

Each error carries a message for the user and a hint that names the fix. The CLI turns one into a single line and
an exit code; the API turns one into an RFC 9457 problem body with ``http_status``. Keeping the mapping on the
class means a new error type never needs a change in either front end.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error a user can be shown."""

    http_status = 500
    code = "internal"
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def to_problem(self) -> dict[str, object]:
        """The RFC 9457 problem body the API returns for this error."""
        body: dict[str, object] = {
            "type": f"urn:corral:error:{self.code}",
            "title": self.code.replace("-", " "),
            "status": self.http_status,
            "detail": self.message,
        }
        if self.hint:
            body["hint"] = self.hint
        return body


class InvalidInput(CorralError):
    http_status = 422
    code = "invalid-input"
    exit_code = 2


class NotFound(CorralError):
    http_status = 404
    code = "not-found"


class AlreadyExists(CorralError):
    http_status = 409
    code = "already-exists"


class Conflict(CorralError):
    """The request is valid but the resource's current state forbids it."""

    http_status = 409
    code = "conflict"


class InsufficientResources(CorralError):
    http_status = 409
    code = "insufficient-resources"


class Unauthorized(CorralError):
    """No credentials, or credentials that are unknown, expired or revoked."""

    http_status = 401
    code = "unauthorized"
    exit_code = 4


class Forbidden(CorralError):
    """The caller is known but its role in the project does not allow the verb."""

    http_status = 403
    code = "forbidden"
    exit_code = 4


class QuotaExceeded(CorralError):
    """The request would take a project over one of its quotas; nothing was made."""

    http_status = 409
    code = "quota-exceeded"


class DaemonNotRunning(CorralError):
    http_status = 503
    code = "daemon-not-running"
    exit_code = 3


class EngineError(CorralError):
    """QEMU or qemu-img failed; the message carries what it said."""

    http_status = 500
    code = "engine-error"


class GuestAgentError(CorralError):
    http_status = 502
    code = "guest-agent-error"


class JobFailed(CorralError):
    http_status = 500
    code = "job-failed"


class Timeout(CorralError):
    http_status = 504
    code = "timeout"


class BodyTooLarge(CorralError):
    """A request body over its route's limit: refused before (or while) it arrives; nothing was changed."""

    http_status = 413
    code = "body-too-large"


class BodyTimeout(CorralError):
    """A request body that stopped arriving: the connection is closed rather than held."""

    http_status = 408
    code = "body-timeout"


class TooManyRequests(CorralError):
    """A caller over its share of long-lived requests (waits, streams, consoles)."""

    http_status = 429
    code = "too-many-requests"


ERRORS_BY_CODE: dict[str, type[CorralError]] = {
    cls.code: cls
    for cls in (
        CorralError,
        InvalidInput,
        NotFound,
        AlreadyExists,
        Conflict,
        InsufficientResources,
        Unauthorized,
        Forbidden,
        QuotaExceeded,
        DaemonNotRunning,
        EngineError,
        GuestAgentError,
        JobFailed,
        Timeout,
        BodyTooLarge,
        BodyTimeout,
        TooManyRequests,
    )
}


def error_from_problem(body: dict[str, object]) -> CorralError:
    """Rebuild the typed error from a problem body, so SDK users can catch ``NotFound`` and friends."""
    code = str(body.get("type", "")).rsplit(":", 1)[-1]
    cls = ERRORS_BY_CODE.get(code, CorralError)
    hint = body.get("hint")
    return cls(str(body.get("detail", "unknown error")), str(hint) if hint else None)
