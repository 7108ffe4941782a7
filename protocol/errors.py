"""One exception type per protocol error code, and the `error` reply built from it."""

from __future__ import annotations

from typing import Any, ClassVar


class ProtocolError(Exception):
    """A fault that becomes an `error` reply with `code` and a human `message`."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")

    def to_body(self, request_id: int | str | None = None) -> dict[str, Any]:
        return {**error_body(self.code, self.message, request_id), **self.extra()}

    def extra(self) -> dict[str, Any]:
        """Fields the `error` reply carries beside code and message."""
        return {}


class BadRequest(ProtocolError):
    code = "bad_request"


class TooLarge(ProtocolError):
    code = "too_large"


class Unauthenticated(ProtocolError):
    code = "unauthenticated"


class AuthFailed(ProtocolError):
    code = "auth_failed"


class Forbidden(ProtocolError):
    code = "forbidden"


class NotFound(ProtocolError):
    code = "not_found"


class LimitReached(ProtocolError):
    code = "limit_reached"


class Busy(ProtocolError):
    code = "busy"


class Overloaded(ProtocolError):
    code = "overloaded"


class RateLimited(ProtocolError):
    """Too many attempts, or a budget spent: `retry_after_s` says when to try again."""

    code = "rate_limited"

    def __init__(self, message: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)

    def extra(self) -> dict[str, Any]:
        return {"retry_after_s": self.retry_after_s}


class InternalError(ProtocolError):
    code = "internal"


class Unavailable(ProtocolError):
    """A model cannot be loaded now (memory, a file llama.cpp refused); the message says why."""

    code = "unavailable"


ERROR_TYPES: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        TooLarge,
        Unauthenticated,
        AuthFailed,
        Forbidden,
        NotFound,
        LimitReached,
        Busy,
        Overloaded,
        InternalError,
        Unavailable,
        RateLimited,
    )
}

ERROR_CODES: frozenset[str] = frozenset(ERROR_TYPES)


def error_body(code: str, message: str, request_id: int | str | None = None) -> dict[str, Any]:
    """The `error` reply; `id` appears only when the request carried a valid one."""
    body: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if request_id is not None:
        body["id"] = request_id
    return body


def error_from_body(body: dict[str, Any]) -> ProtocolError:
    """Turn an `error` reply back into its exception (client side)."""
    code = str(body.get("code", "internal"))
    cls = ERROR_TYPES.get(code, InternalError)
    exc = cls(str(body.get("message", code)))
    retry = body.get("retry_after_s")
    if isinstance(exc, RateLimited) and isinstance(retry, (int, float)) and retry >= 0:
        exc.retry_after_s = float(retry)
    if cls is InternalError and code != "internal":
        exc.message = f"{code}: {exc.message}"
    return exc
