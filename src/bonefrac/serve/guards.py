"""Request guards, all pure ASGI middleware so they act before a request body is read: the body-size cap, and
for /v1/* the per-client rate limit and the optional API key; plus the outermost layer that counts every
response (telemetry) and sets the nosniff header, refusals and internal errors included."""

from __future__ import annotations

import hmac
import time

from starlette.routing import Mount

from .errors import ApiError, BodyTooLarge, error_response


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: from Content-Length up front, else while streaming, so an
    endless chunked upload is cut off without being buffered."""

    def __init__(self, app, max_bytes: int, telemetry):
        self.app, self.max_bytes, self.telemetry = app, max_bytes, telemetry

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
        self.telemetry.error("request_too_large")
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


class GuardMiddleware:
    """For /v1/*: the rate limit, then the API key (when configured), before the body is read, so a client
    without the key or over its limit cannot make the server parse an upload. The limit comes first so that
    wrong keys count too: guessing keys is throttled like any other traffic."""

    def __init__(self, app, limiter: RateLimiter, api_key: str | None, telemetry):
        self.app, self.limiter, self.api_key, self.telemetry = app, limiter, api_key, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            refusal = self.check(dict(scope.get("headers") or []), scope.get("client"))
            if refusal is not None:
                self.telemetry.error(refusal.code)
                response = error_response(refusal.status, refusal.code, refusal.message, refusal.headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, headers: dict[bytes, bytes], client) -> ApiError | None:
        """The refusal for a request with these (lower-case) headers from `client` (host, port), or None."""
        ok, wait = self.limiter.allow(client[0] if client else "unknown")
        if not ok:
            return ApiError(429, "rate_limited", f"too many requests; retry in {wait:.1f} s",
                            headers={"Retry-After": str(max(1, round(wait)))})
        if self.api_key:
            given = (headers.get(b"x-api-key", b"").decode("latin-1")
                     or _bearer(headers.get(b"authorization", b"").decode("latin-1")))
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return ApiError(401, "unauthorized", "missing or wrong API key (header X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})
        return None


class ObserveMiddleware:
    """Outermost: counts every response by route and status with its latency (refusals by the other guards and
    internal errors too) and adds `X-Content-Type-Options: nosniff`."""

    def __init__(self, app, telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:  # an exception here becomes the 500 that the server's error layer sends: count it as one
            self.telemetry.request(route_label(scope), status, time.perf_counter() - start)


def route_label(scope) -> str:
    """The metrics label of a handled request: the path template of the route or mount that served it (a mount by
    its prefix, e.g. "/static"), or "unmatched" when none did (404s from the router, refusals before routing). Never
    the requested path itself, so the label set stays bounded whatever clients ask for."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "unmatched")
    # FastAPI's router sets scope["route"] for its own APIRoutes only: Starlette routes (FastAPI's /openapi.json)
    # and mounts (/static, the offline docs' files) leave just their endpoint, which names the route that matched.
    endpoint, router = scope.get("endpoint"), scope.get("router")
    if endpoint is None or router is None:
        return "unmatched"
    for candidate in getattr(router, "routes", ()):
        if getattr(candidate, "endpoint", None) is endpoint or (
                isinstance(candidate, Mount) and candidate.app is endpoint):
            return candidate.path
    return "unmatched"


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
