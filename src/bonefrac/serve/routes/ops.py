"""GET /health (process alive), GET /ready (model loaded, batcher running; the model, its operating point and
decision threshold), GET /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ...backends import DEFAULT_POINT

router = APIRouter()


@router.get("/health", summary="Liveness")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: the model is loaded and accepting work")
async def ready(request: Request):
    state = request.app.state
    if not state.batcher.running:  # 503 either way, so load balancers send no new work
        return JSONResponse({"status": "stopping" if state.batcher.stopped else "starting"}, status_code=503)
    predictor = state.predictor
    return {"status": "ready", "model_version": predictor.version, "class_names": predictor.class_names,
            "operating_point": state.settings.operating_point or DEFAULT_POINT, "threshold": predictor.threshold}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.app.state.telemetry.render(), media_type="text/plain; version=0.0.4")
