"""Every refusal is a JSON body `{"error": {"code": ..., "message": ...}}` with a 4xx status, never a 500 page.

`install(app, telemetry)` registers the handlers; routes raise `ApiError(status, code, message)`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """Raised while streaming a request body past the size cap (see guards.BodyLimitMiddleware)."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def __reduce__(self):
        # Raised in preprocessing worker processes and pickled back: rebuild from all four fields (the default
        # would call ApiError(message) only).
        return type(self), (self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) + " (send images as multipart/form-data field 'files')"


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
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps body-reading failures in a 400
            telemetry.error("request_too_large")
            return error_response(413, "request_too_large", "request body over the size limit")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        telemetry.error(code)
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: log the type and place only (never request content), answer without details.
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        telemetry.error("internal")
        return error_response(500, "internal", "internal error; the request was not processed")
