"""The error hierarchy, and the one place that turns any exception into the API's JSON error body.

Body (API.md): {"error", "code", "message", "details", "docs_url", "request_id"}.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from appliance.api.request_id import ensure_request_id

log = logging.getLogger("appliance.errors")

DOCS_URL = "/docs"


class ApplianceError(Exception):
    """Base of every error the API reports on purpose. Subclasses set status and code."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    default_message: ClassVar[str] = "Internal server error."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details or {}
        self.retry_after = retry_after
        self.headers = headers or {}
        super().__init__(self.message)


class BadRequest(ApplianceError):
    status_code, code, default_message = 400, "BAD_REQUEST", "Invalid request parameters."


class InvalidJSON(ApplianceError):
    status_code, code, default_message = 400, "INVALID_JSON", "The request body is not valid JSON."


class Unauthorized(ApplianceError):
    status_code, code, default_message = 401, "UNAUTHORIZED", "Missing or invalid API key."


class InsufficientBalance(ApplianceError):
    status_code, code, default_message = 402, "INSUFFICIENT_BALANCE", "Token quota exhausted."


class Forbidden(ApplianceError):
    status_code, code, default_message = 403, "FORBIDDEN", "The API key lacks the scope."


class NotFound(ApplianceError):
    status_code, code, default_message = 404, "NOT_FOUND", "Not found."


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class MethodNotAllowed(ApplianceError):
    status_code, code, default_message = 405, "METHOD_NOT_ALLOWED", "Method not allowed."


class Conflict(ApplianceError):
    status_code, code, default_message = 409, "CONFLICT", "Conflict."


class PayloadTooLarge(ApplianceError):
    status_code, code, default_message = 413, "PAYLOAD_TOO_LARGE", "Request body too large."


class JobStorageExceeded(PayloadTooLarge):
    code = "JOB_STORAGE_EXCEEDED"


class ValidationFailed(ApplianceError):
    status_code, code, default_message = 422, "VALIDATION_ERROR", "Invalid request body."


class BatchNotSupported(ValidationFailed):
    code = "BATCH_NOT_SUPPORTED"
    default_message = "One request processes one input; batch payloads are not supported here."


class InputTooLong(ValidationFailed):
    code = "INPUT_TOO_LONG"


class WrongTask(ValidationFailed):
    code = "MODEL_TASK_MISMATCH"


class RateLimited(ApplianceError):
    status_code, code, default_message = 429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded."


class TooManyJobs(ApplianceError):
    status_code, code, default_message = 429, "TOO_MANY_JOBS", "This key keeps too many jobs."


class ExportUnavailable(ApplianceError):
    status_code, code, default_message = 501, "EXPORT_UNAVAILABLE", "Cannot export checkpoints."


class Overloaded(ApplianceError):
    status_code, code, default_message = 503, "OVERLOADED", "The server is overloaded; retry."


class InsufficientStorage(ApplianceError):
    status_code, code, default_message = 507, "INSUFFICIENT_STORAGE", "The disk is nearly full."


class BackendUnavailable(ApplianceError):
    """Cluster mode: Redis or PostgreSQL cannot be reached for a decision this request needs."""

    status_code, code, default_message = (
        503,
        "BACKEND_UNAVAILABLE",
        "A shared state backend is unreachable; retry.",
    )


class ModelUnavailable(ApplianceError):
    status_code, code, default_message = 503, "MODEL_UNAVAILABLE", "The model is not available."


def error_name(code: str) -> str:
    return code.lower().replace("_", "-")


def error_body(
    code: str, message: str, *, details: dict[str, Any] | None, request_id: str | None
) -> dict[str, Any]:
    return {
        "error": error_name(code),
        "code": code,
        "message": message,
        "details": details or {},
        "docs_url": DOCS_URL,
        "request_id": request_id,
    }


# litestar's own exceptions (unknown route, wrong method, body limit, bad JSON) by status.
_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMIT_EXCEEDED",
    503: "SERVICE_UNAVAILABLE",
}


def _from_litestar(exc: HTTPException) -> ApplianceError:
    if isinstance(exc, ValidationException):
        text = str(exc.detail)
        # litestar raises the same class for undecodable JSON and for a body of the wrong shape.
        if "decod" in text.lower() or "malformed" in text.lower():
            return InvalidJSON()
        details: dict[str, Any] = {}
        if isinstance(exc.extra, list) and exc.extra:
            details["errors"] = exc.extra
            first = exc.extra[0]
            if isinstance(first, dict) and (first.get("message"), first.get("key")) == (
                "'data'",
                "data",
            ):
                # litestar's KeyError for a request without a body: say so, not "'data'"
                text = "The request has no body: send a JSON object."
            elif isinstance(first, dict) and first.get("message"):
                text = str(first["message"])
                if first.get("key") and first["key"] != "data":
                    text = f"`{first['key']}`: {text}"
                    details["field"] = first["key"]
        return ValidationFailed(text, details=details)
    if exc.status_code == 400 and (
        isinstance(exc.__cause__, SerializationException) or "json" in str(exc.detail).lower()
    ):
        # The body's decoding failed (truncated, broken UTF-8, malformed: msgspec's message).
        return InvalidJSON(f"The request body is not valid JSON: {exc.detail}")
    error = ApplianceError(str(exc.detail))
    error.status_code = exc.status_code  # type: ignore[misc]
    error.code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")  # type: ignore[misc]
    # litestar's router puts the path's real methods in `allow` on its 405 (RFC 9110 wants it).
    if exc.headers and "allow" in {k.lower() for k in exc.headers}:
        allow = next(v for k, v in exc.headers.items() if k.lower() == "allow")
        methods = [m.strip() for m in allow.split(",")]
        if "GET" in methods and "HEAD" not in methods:  # appliance.api.head answers it
            allow = ", ".join([*methods, "HEAD"])
        error.headers = {"Allow": allow}
    if exc.status_code == 413:
        error.message = "Request body too large."
    return error


def request_id_of(request: Request[Any, Any, Any]) -> str:
    return ensure_request_id(request.scope)


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The single mapping from exceptions to the JSON error body."""
    request_id = request_id_of(request)
    if isinstance(exc, HTTPException):
        exc = _from_litestar(exc)
    elif isinstance(exc, RecursionError) and "deserializ" in str(exc):
        # msgspec's JSON decoder (litestar's request.json) raises this for bodies nested past
        # its depth limit: the client's input, not a server fault.
        exc = InvalidJSON("The request body is not valid JSON: nested too deep.")
    if not isinstance(exc, ApplianceError):
        log.exception("unhandled error (request %s)", request_id, exc_info=exc)
        exc = ApplianceError()
    # Unknown routes never reach the request-id middleware, so the header is set here too.
    headers = {"X-Request-ID": request_id, **exc.headers}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return Response(
        error_body(exc.code, exc.message, details=exc.details, request_id=request_id),
        status_code=exc.status_code,
        headers=headers,
        media_type="application/json",
    )
