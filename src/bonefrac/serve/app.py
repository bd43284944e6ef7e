"""`create_app(settings, predictor=None)` -> the FastAPI app; `run(settings)` serves it with uvicorn.

The app owns all its state (predictor, batcher, telemetry, rate limiter, audit log, the budget of decoded pixels)
on `app.state`; nothing is global, so tests and benchmarks can build several apps side by side, and one app can be
started again after it stopped (a second lifespan).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from .. import __version__
from ..io import quiet_image_metadata_logs
from .audit import AuditLog
from .batcher import MicroBatcher
from .budget import PixelBudget
from .errors import install as install_error_handlers
from .guards import BodyLimitMiddleware, GuardMiddleware, ObserveMiddleware, RateLimiter
from .preprocess import Preprocessor
from .routes import ops, page, predict
from .routes.page import STATIC_DIR, PageFiles
from .settings import Settings
from .telemetry import Telemetry

log = logging.getLogger(__name__)
NOTICE = "Assistive research tool, not a diagnostic device: every output needs review by a qualified clinician."


def create_app(settings: Settings | None = None, predictor=None) -> FastAPI:
    """The service for `settings` (default: from the environment); `predictor` overrides settings.model.

    Raises BonefracError before serving anything when the model cannot be loaded or lacks the operating point
    that settings.operating_point names (a given `predictor` is moved to that point in place)."""
    from ..backends import DEFAULT_POINT, load_backend, use_operating_point

    settings = settings or Settings.from_env()
    quiet_image_metadata_logs()  # also when served without the CLI (an ASGI server's app factory)
    predictor = predictor or load_backend(settings.model, settings.device)
    use_operating_point(predictor, settings.operating_point)  # a name the model lacks stops the start-up here
    telemetry = Telemetry()
    batcher = MicroBatcher(predictor.predict_arrays, settings.max_batch, settings.max_wait_ms, telemetry.batch,
                           max_queue=settings.max_queue)
    preprocessor = Preprocessor(settings.preprocess_workers)
    audit = AuditLog(settings.audit_db) if settings.audit_db else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await preprocessor.start()
        await batcher.start()
        if settings.warmup:
            await _warm_up(batcher, predictor, settings.max_batch)
        log.info("serving %s on %s (operating point %s, threshold %s; max batch %d, max wait %g ms, "
                 "%d preprocessing processes)", predictor.version, getattr(predictor, "device", settings.device),
                 settings.operating_point or DEFAULT_POINT, predictor.threshold, settings.max_batch,
                 settings.max_wait_ms, preprocessor.workers)
        try:
            yield
        finally:
            await batcher.stop()
            await preprocessor.stop()
            if audit is not None:
                audit.close()

    # fastapi-offline serves /docs and /redoc from files in the package: FastAPI's own pages load their scripts
    # from a CDN, which air-gapped hospital networks cannot reach.
    app = FastAPIOffline(title="bonefrac", version=__version__, lifespan=lifespan, description=NOTICE)
    app.state.settings, app.state.predictor, app.state.batcher = settings, predictor, batcher
    app.state.preprocessor, app.state.pixels = preprocessor, PixelBudget(settings.max_pixels_in_flight)
    app.state.telemetry, app.state.rate_limiter = telemetry, RateLimiter(settings.rate_limit)
    app.state.audit = audit
    install_error_handlers(app, telemetry)
    _add_middleware(app, settings, telemetry)
    for module in (predict, ops, page):
        app.include_router(module.router)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
    return app


def _on_accelerator(predictor) -> bool:
    for member in getattr(predictor, "members", [predictor]):
        session = getattr(member, "session", None)  # ONNX Runtime: the first provider is the one in use
        if session is not None and session.get_providers()[0] != "CPUExecutionProvider":
            return True
        if session is None and not str(getattr(member, "device", "cpu")).startswith("cpu"):
            return True
    return False


async def _warm_up(batcher: MicroBatcher, predictor, max_batch: int) -> None:
    """One model call per batch size before the service reports ready. On a GPU a new input shape's first call
    selects and builds its kernels (cuDNN plans, memory pools) and is much slower than later ones; micro-batching
    produces every size 1..max_batch, and each size's first call would stall every request queued behind it.
    Skipped on the CPU, where first calls measured no slower (and 1..16 images of a large model take long)."""
    if not _on_accelerator(predictor):
        return
    side = predict.model_size(predictor) or 64
    start = time.perf_counter()
    for n in range(1, max_batch + 1):
        await batcher.run(predictor.predict_arrays, [np.zeros((side, side), np.uint8)] * n)
    log.info("warmed up batch sizes 1..%d in %.1f s", max_batch, time.perf_counter() - start)


def _add_middleware(app: FastAPI, settings: Settings, telemetry: Telemetry) -> None:
    """Outermost first: telemetry and headers, CORS (answers preflights itself), the body cap, then the rate limit
    and API key; Starlette wraps the last one added around the others."""
    app.add_middleware(GuardMiddleware, limiter=app.state.rate_limiter, api_key=settings.api_key, telemetry=telemetry)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, telemetry=telemetry)
    if settings.cors_origins:  # off by default: the page is served from the same origin
        from fastapi.middleware.cors import CORSMiddleware

        # Exposed: a page on another origin must be able to read what an explanation map is (predict.py).
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["X-API-Key", "Authorization"],
                           expose_headers=list(predict.EXPLAIN_HEADERS))
    app.add_middleware(ObserveMiddleware, telemetry=telemetry)


def run(settings: Settings) -> None:
    """Serve until interrupted (uvicorn; access logs hold method, path and status only)."""
    import uvicorn

    uvicorn.run(create_app(settings), **server_options(settings))


def server_options(settings: Settings) -> dict:
    """uvicorn's keyword arguments for `settings` (address, whose X-Forwarded-For names the client, and how long
    a shutdown waits for requests in progress: without a limit one stalled upload kept the server up forever)."""
    return dict(host=settings.host, port=settings.port, log_level="info", proxy_headers=True,
                forwarded_allow_ips=",".join(settings.trusted_proxies),
                timeout_graceful_shutdown=settings.shutdown_timeout_s)
