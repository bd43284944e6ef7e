"""Request guards: body-size cap (ASGI middleware), per-client rate limit and optional API key (dependencies)."""

from __future__ import annotations

import hmac
import time

from fastapi import Request

from .errors import ApiError, BodyTooLarge, error_response


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: from Content-Length up front, else while streaming, so an
    endless chunked upload is cut off without being buffered."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        mb = self.max_bytes / 1024 / 1024
        response = error_response(413, "request_too_large", f"request body over the {mb:g} MB limit",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


class RateLimiter:
    """Token bucket per client: `per_minute` requests, bursts up to a tenth of a minute's worth (min 5)."""

    def __init__(self, per_minute: int, max_clients: int = 10_000):
        self.rate = per_minute / 60.0
        self.burst = max(5.0, per_minute / 10.0)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds until the next token)."""
        if self.rate <= 0:
            return True, 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.max_clients and client not in self._buckets:
            self._buckets.clear()  # bounded memory; forgetting buckets only ever lets clients through
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return True, 0.0
        self._buckets[client] = (tokens, now)
        return False, (1.0 - tokens) / self.rate


def client_id(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def guard(request: Request) -> None:
    """FastAPI dependency for /v1/*: the rate limit, then the API key (when configured). The limit comes first so
    that wrong keys count too: guessing keys is throttled like any other traffic."""
    state = request.app.state
    ok, wait = state.rate_limiter.allow(client_id(request))
    if not ok:
        raise ApiError(429, "rate_limited", f"too many requests; retry in {wait:.1f} s",
                       headers={"Retry-After": str(max(1, round(wait)))})
    key = state.settings.api_key
    if key:
        given = request.headers.get("x-api-key") or _bearer(request.headers.get("authorization", ""))
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (header X-API-Key)",
                           headers={"WWW-Authenticate": "Bearer"})


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
