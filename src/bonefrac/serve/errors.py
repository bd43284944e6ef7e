"""Every refusal is a JSON body `{"error": {"code": ..., "message": ...}}` with a 4xx status (503 when the service
cannot answer now, 500 'internal' for a failure that is not the client's), never an HTML error page.

`install(app, telemetry)` registers the handlers; routes raise `ApiError(status, code, message)`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str  # stable, for programs: "rate_limited", "not_xray", ...
    message: str  # for people: names the file and the problem


class ErrorBody(BaseModel):
    error: ErrorDetail


def documented(*statuses: int) -> dict:
    """OpenAPI `responses=` entries for these refusal statuses, each with the error body's schema and codes."""
    return {s: {"model": ErrorBody, "description": ", ".join(CODES[s])} for s in statuses}


# Every error code the service sends, by status (kept beside the handlers that send them; a test checks them).
CODES = {
    400: ["bad_request"],  # e.g. a malformed multipart body
    401: ["unauthorized"],
    403: ["audit_needs_key"],
    404: ["audit_off"],
    413: ["request_too_large", "too_many_files", "image_too_large"],
    415: ["unsupported_media_type"],
    422: ["invalid_request", "unreadable_image", "not_xray", "one_image_only"],  # the last: /v1/explain, 2+ files
    429: ["rate_limited"],
    # nginx's "client closed request": counted in /metrics, sent to nobody (the client left while waiting)
    499: ["client_disconnected"],
    500: ["internal"],
    501: ["not_implemented"],
    503: ["shutting_down", "preprocess_unavailable", "audit_unavailable", "overloaded"],
}


class BodyTooLarge(Exception):
    """Raised while streaming a request body past the size cap (see guards.BodyLimitMiddleware)."""


class ShuttingDown(Exception):
    """Raised by the batcher once it is stopped: the service is going down and takes no more model calls."""


class ClientGone(Exception):
    """The client disconnected while its request waited (routes/predict.py): its work was cancelled."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def __reduce__(self):
        # Raised in preprocessing worker processes and pickled back: rebuild from all four fields (the default
        # would call ApiError(message) only).
        return type(self), (self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    # nosniff here too: the internal-error answer is sent outside every middleware that would add it
    headers = {"X-Content-Type-Options": "nosniff", **(headers or {})}
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts, about_body = [], False
    for err in exc.errors()[:5]:
        loc = err.get("loc", ())
        about_body = about_body or (bool(loc) and loc[0] == "body")
        where = ".".join(str(p) for p in loc if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    hint = " (send images as multipart/form-data field 'files')" if about_body else ""
    return "invalid request: " + "; ".join(parts) + hint


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether `kind` is anywhere in exc's chain: Starlette and AnyIO wrap a body-reading failure in other
    exceptions (__cause__ / __context__) and in exception groups, at a depth that changes between versions."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:  # a chain can link back to an exception already seen
            continue
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]  # a BaseExceptionGroup's members
    return False


def install(app: FastAPI, telemetry) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        telemetry.error(exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        telemetry.error("invalid_request")
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if _caused_by(exc, BodyTooLarge):  # FastAPI turns body-reading failures into a 400
            telemetry.error("request_too_large")
            return error_response(413, "request_too_large", "request body over the size limit")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        telemetry.error(code)
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request: Request, exc: ShuttingDown):
        telemetry.error("shutting_down")
        return error_response(503, "shutting_down", "the service is shutting down; retry shortly",
                              {"Retry-After": "1", "Connection": "close"})

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        telemetry.error("client_disconnected")
        return error_response(499, "client_disconnected", "the client disconnected before the answer was ready")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: log the type and place only (never request content), answer without details.
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        telemetry.error("internal")
        return error_response(500, "internal", "internal error; the request was not processed")
