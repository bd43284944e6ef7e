"""POST /v1/predict (one or many images -> probabilities, refer flag), POST /v1/explain (one image -> Grad-CAM PNG
and headers naming the class it explains),
GET /v1/audit (recent audit rows, when the audit log is on).

Each upload waits for room in the server's budget of decoded pixels (budget.py) before it is decoded; explain keeps
its share until its overlay is drawn. A client that disconnects while its request waits for decoding or the model
has that work cancelled (its images never reach the model). Both routes audit what they answer, and withhold the
answer (503) when it cannot be recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from contextlib import AsyncExitStack
from functools import partial

import numpy as np
from PIL import Image
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from ...backends import DEFAULT_POINT, prediction_rows
from ..audit import AuditUnavailable
from ..budget import upload_pixels
from ..errors import ApiError, ClientGone, documented

log = logging.getLogger(__name__)
# The rate limit and API key are checked by guards.GuardMiddleware before the body is read (401 / 429 below).
router = APIRouter(prefix="/v1", responses=documented(401, 429, 500))
UPLOAD_ERRORS = documented(400, 413, 415, 422, 503)
EXPLAIN_MAX_SIDE = 2048  # pixels: longer side of the Grad-CAM overlay /v1/explain returns
PER_IMAGE_ERRORS = (413, 415, 422)  # statuses of ApiErrors about one file's content (preprocess.py)
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
FILES = File(..., description="image files (PNG, JPEG, WebP, BMP, TIFF or DICOM); the type is sniffed from content")


class ImageResult(BaseModel):
    filename: str
    sha256: str
    status: str  # "ok", "not_xray" or "error" (this file alone could not be read; error_code and message say why)
    prediction: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    refer: bool
    message: str | None = None
    error_code: str | None = None


class PredictResponse(BaseModel):
    model_version: str
    class_names: list[str]
    threshold: float | None
    # Binary models: the class `threshold` applies to (called when its probability >= threshold), and the named
    # operating point that chose it; shown with the probabilities so a call below 50 % is not a surprise.
    positive_class: str | None = None
    operating_point: str | None = None
    results: list[ImageResult]


def model_size(predictor) -> int | None:
    """The input size all members share (images are resized to it before batching), else None."""
    sizes = {getattr(m, "size", None) for m in getattr(predictor, "members", [predictor])}
    return sizes.pop() if len(sizes) == 1 else None


async def _decode_uploads(files: list[UploadFile], state, size: int | None, partial: bool = False,
                          held: AsyncExitStack | None = None) -> list[dict]:
    """The request's images decoded and checked, in order. With `partial`, a file that alone is bad (unreadable,
    unsupported, too large) comes back as {"filename", "sha256", "error": ApiError} while others are usable.
    With `held`, the images' pixels stay counted in the budget until that stack closes."""
    settings = state.settings
    if len(files) > settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} images in one request; the limit is {settings.max_files}")
    uploads = [(upload.filename or f"file {i + 1}", await upload.read()) for i, upload in enumerate(files)]
    # All images of a request at once (in a pool they run in parallel, as far as the pixel budget lets them).
    items = await asyncio.gather(*[_prepare(state, data, name, size, held) for name, data in uploads],
                                 return_exceptions=True)
    failed = [it for it in items if isinstance(it, BaseException)]
    if not failed:
        return items
    # One bad file among good ones becomes its own "error" result, as in `bonefrac predict`; a request with no
    # usable file, or a failure that is not the file's own (a stopped worker, a bug), is answered as an error:
    # the first such in request order.
    own = [isinstance(e, ApiError) and e.status in PER_IMAGE_ERRORS for e in failed]
    if not partial or len(failed) == len(items) or not all(own):
        raise next((e for e, mine in zip(failed, own) if not mine), failed[0])
    return [{"filename": name, "sha256": hashlib.sha256(data).hexdigest(), "error": it}
            if isinstance(it, BaseException) else it for (name, data), it in zip(uploads, items)]


async def _prepare(state, data: bytes, name: str, size: int | None, held: AsyncExitStack | None) -> dict:
    """One upload, decoded once its pixels (read from its header, off the event loop) fit in the budget. They
    are given back when the decode ends, even if this request stopped waiting for it (the thread or worker goes
    on), or with `held` when that stack closes as well."""
    settings, budget = state.settings, state.pixels
    weight = await asyncio.to_thread(upload_pixels, data, name, settings.max_pixels)
    lease = await budget.acquire(weight)
    task = asyncio.ensure_future(state.preprocessor.prepare(data, name, settings.max_pixels, settings.xray_check,
                                                            size))
    if held is None:
        _release_when_done(task, budget, lease)
    else:
        held.callback(_release_when_done, task, budget, lease)
    return await asyncio.shield(task)


def _release_when_done(task: asyncio.Future, budget, lease: int) -> None:
    def release(done: asyncio.Future) -> None:
        budget.release(lease)
        if not done.cancelled():
            done.exception()  # seen here: a request that gave up never reads it

    if task.done():
        release(task)
    else:
        task.add_done_callback(release)


async def _while_connected(request: Request, work):
    """`work` (a coroutine) awaited, unless the client disconnects first: then the work is cancelled (a batcher
    submit drops its images unprocessed) and ClientGone raised. Polled, every DISCONNECT_POLL_S."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected while its request waited; its work is cancelled")
                raise ClientGone()
    finally:
        task.cancel()  # nothing when done; else (client gone, or this handler cancelled) the work stops too


async def _analyse(request: Request, files: list[UploadFile]) -> PredictResponse:
    state = request.app.state
    settings, predictor = state.settings, state.predictor
    size = model_size(predictor)
    async with AsyncExitStack() as held:
        # Members of other input sizes each resize the full image: it then waits for the model at full size, so
        # its pixels stay in the budget until the model is done with it (else they are given back after decoding).
        items = await _while_connected(request, _decode_uploads(files, state, size, partial=True,
                                                                held=held if size is None else None))
        xrays = [it for it in items if "error" not in it and (it["check"] is None or it["check"].ok)]
        probs = (await _while_connected(request, state.batcher.submit([it["gray"] for it in xrays])) if xrays
                 else np.zeros((0, 0)))
    for item, row in zip(xrays, probs):
        item["probs"] = row
    results = [_result(it, predictor, settings.refer_margin) for it in items]
    for r in results:
        state.telemetry.image(r.status)
        if r.error_code:  # counted with whole-request refusals too, so alerts on a code see both
            state.telemetry.error(r.error_code)
    if state.audit is not None:  # what the model assessed; unreadable uploads are not cases to review
        await _record(state.audit, predictor.version, [r for r in results if r.status != "error"],
                      predictor.threshold, "predict")
    return PredictResponse(model_version=predictor.version, class_names=predictor.class_names,
                           threshold=predictor.threshold, positive_class=positive_class(predictor),
                           operating_point=settings.operating_point or DEFAULT_POINT, results=results)


async def _record(audit, version: str, results: list[ImageResult], threshold: float | None, route: str) -> None:
    """Audit before answering: a prediction that could not be recorded is not handed out (503, retry)."""
    try:
        await audit.write(version, [r.model_dump() for r in results], threshold, route)
    except AuditUnavailable as exc:
        log.warning("audit write failed, prediction withheld: %s", exc)
        raise ApiError(503, "audit_unavailable", "the audit log could not be written; the prediction "
                       "was not recorded and is not returned; retry shortly", headers={"Retry-After": "5"}) from None


def _result(item: dict, predictor, margin: float) -> ImageResult:
    base = {"filename": item["filename"], "sha256": item["sha256"]}
    if "error" in item:
        return ImageResult(**base, status="error", refer=True, message=item["error"].message,
                           error_code=item["error"].code)
    if "probs" not in item:
        return ImageResult(**base, status="not_xray", refer=True, message=item["check"].reason)
    (fields,) = prediction_rows(item["probs"][None, :], predictor, margin)
    if fields["status"] != "ok":  # non-finite model output: the row says why (it has no prediction)
        return ImageResult(**base, **fields, error_code="internal")
    return ImageResult(**base, **fields,
                       message="low confidence: refer for expert review" if fields["refer"] else None)


@router.post("/predict", response_model=PredictResponse, summary="Classify one or many X-ray images",
             responses=UPLOAD_ERRORS)
async def predict(request: Request, files: list[UploadFile] = FILES) -> PredictResponse:
    """Per image: class probabilities, prediction, confidence, a refer flag (low confidence or not an X-ray)
    and the model version. Among several files, one that cannot be read gets status "error" (the others are
    answered); a request whose files all fail is a 4xx error. Assistive output for clinician review, not a
    diagnosis."""
    return await _analyse(request, files)


# What a /v1/explain map is: without these a map for a confident negative call (min-max scaled within the image,
# so always saturated somewhere) reads like a fracture locator. Exposed to browsers when CORS is on (app.py).
_EXPLAIN_HEADER_DOCS = {
    "X-Explained-Class": ("the class whose evidence the map shows (the predicted one); text headers are "
                          "percent-encoded UTF-8 where not printable ASCII, and '%' itself", "string"),
    "X-Explained-Probability": ("calibrated probability of that class", "number"),
    "X-Prediction": ("the class predicted for the image", "string"),
    "X-Positive-Class": ("binary models: the class the threshold applies to", "string"),
    "X-Threshold": ("the decision threshold, when the model has one", "number"),
    "X-Operating-Point": ("the operating point in use", "string"),
    "X-Model-Version": ("the model that answered", "string")}
EXPLAIN_HEADERS = tuple(_EXPLAIN_HEADER_DOCS)


@router.post("/explain", summary="Grad-CAM overlay of one image, as PNG, with headers naming the class it explains",
             responses={200: {"content": {"image/png": {}}, "headers": {
                 name: {"description": text, "schema": {"type": kind}}
                 for name, (text, kind) in _EXPLAIN_HEADER_DOCS.items()}},
                 **UPLOAD_ERRORS, **documented(501)})
async def explain(request: Request, files: list[UploadFile] = FILES) -> Response:
    """Exactly one image: the X-ray with a heatmap of the evidence for the class named in `X-Explained-Class`
    (the predicted class), whose calibrated probability is `X-Explained-Probability`. The map is scaled within
    the image (its hottest region is always saturated): it shows where, not how sure, and the map of a negative
    call is not a fracture locator. PyTorch checkpoints and ensemble directories only (an ensemble's map is its
    members' maps averaged, for the class the ensemble predicts). Several files are refused (422
    `one_image_only`)."""
    if len(files) > 1:  # the map, class and probability describe one image: never silently drop the others
        raise ApiError(422, "one_image_only", f"/v1/explain takes one image per request, got {len(files)}; "
                       "send them one at a time")
    state = request.app.state
    # The full-size image stays counted in the pixel budget until its overlay is drawn.
    async with AsyncExitStack() as held:
        items = await _while_connected(request, _decode_uploads(files, state, None, held=held))  # full size
        check = items[0]["check"]
        if check is not None and not check.ok:
            raise ApiError(422, "not_xray", f"{items[0]['filename']}: {check.reason}")
        png, headers = await _explain_one(state, items[0])
    return Response(png, media_type="image/png", headers={k: header_text(v) for k, v in headers.items()})


async def _explain_one(state, item: dict) -> tuple[bytes, dict]:
    """(the overlay PNG, the headers saying what it shows) for one decoded full-size X-ray; audited first."""
    predictor, settings = state.predictor, state.settings
    explain_arrays, overlay = _explainer(predictor)
    # Maps at the model's resolution: overlay stretches them to the display-size image (a full-size float map of
    # a large radiograph would cost hundreds of MB per request).
    maps, classes, probs = await state.batcher.run(partial(explain_arrays, at_image_size=False), predictor,
                                                   [item["gray"]])
    (row,) = prediction_rows(probs[:1], predictor, settings.refer_margin)
    if row["status"] != "ok":  # non-finite model output: the model's fault, not the upload's; no class to explain
        raise ApiError(500, "internal", f"{item['filename']}: {row['message']}")
    if state.audit is not None:  # a prediction like /v1/predict's: recorded, or not handed out
        await _record(state.audit, predictor.version, [_result({**item, "probs": probs[0]}, predictor,
                                                               settings.refer_margin)], predictor.threshold, "explain")
    names, explained = predictor.class_names, int(classes[0])
    headers = {"X-Explained-Class": names[explained], "X-Explained-Probability": f"{float(probs[0, explained]):.6f}",
               "X-Prediction": row["prediction"], "X-Model-Version": predictor.version,
               "X-Operating-Point": settings.operating_point or DEFAULT_POINT}
    positive = positive_class(predictor)
    if positive is not None:
        headers["X-Positive-Class"] = positive
    if predictor.threshold is not None:
        headers["X-Threshold"] = f"{float(predictor.threshold):g}"
    # Drawing and PNG-encoding a full-size X-ray takes seconds: off the event loop, so other requests go on.
    png = await asyncio.to_thread(lambda: _png(overlay(display_size(item["gray"]), maps[0])))
    return png, headers


def positive_class(predictor) -> str | None:
    """The class a binary model's threshold applies to (a positive call is p(class) >= threshold), else None."""
    pos, names = getattr(predictor, "positive_index", None), predictor.class_names
    if pos is None or predictor.threshold is None or len(names) != 2:
        return None
    return names[pos]


_HEADER_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")


def header_text(value: str) -> str:
    """A header value as sent: printable ASCII as it is, anything else (and "%" itself, so that decoding is never
    ambiguous) percent-encoded as UTF-8; clients decode it with decodeURIComponent / urllib.parse.unquote.
    HTTP header values are latin-1, so a class named in another script could not be sent as it is."""
    from urllib.parse import quote

    return quote(value, safe=_HEADER_SAFE)


def display_size(gray: np.ndarray, max_side: int = EXPLAIN_MAX_SIDE) -> np.ndarray:
    """`gray` shrunk (aspect kept) so its longer side is at most `max_side`: the overlay is for a screen, and a
    full-size 60 M pixel overlay would cost gigabytes per request."""
    scale = max_side / max(gray.shape)
    if scale >= 1:
        return gray
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BOX))


def _explainer(predictor):
    # An ensemble is explained as `bonefrac explain` does it: its members' maps, for its own class.
    members = getattr(predictor, "members", None) or [predictor]
    if any(getattr(m, "model", None) is None for m in members):
        backend = getattr(predictor, "backend", None)
        runs = f"an exported {backend} model" if backend else "a model without PyTorch weights"
        raise ApiError(501, "not_implemented", f"explanations need a PyTorch checkpoint or ensemble directory; this "
                       f"service runs {runs} (serve the checkpoint or ensemble directory it was exported from to "
                       "enable /v1/explain)")
    try:
        from ...explain import explain_arrays, overlay
    except ImportError:
        raise ApiError(501, "not_implemented", "Grad-CAM is not available in this installation") from None
    return explain_arrays, overlay


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@router.get("/audit", summary="Recent audit-log rows (image hashes, probabilities, refer flags); needs an API key",
            responses=documented(403, 404, 422, 503))
async def audit(request: Request, limit: int = Query(100, ge=1, le=1000), refer_only: bool = False) -> dict:
    if request.app.state.audit is None:
        raise ApiError(404, "audit_off", "the audit log is off (set BONEFRAC_AUDIT_DB to turn it on)")
    if not request.app.state.settings.api_key:  # the log is every case the service saw: never open to anyone
        raise ApiError(403, "audit_needs_key", "reading the audit log over HTTP needs BONEFRAC_API_KEY set on the "
                       "server (and the key in X-API-Key); the log itself is the SQLite file BONEFRAC_AUDIT_DB")
    try:
        rows = await request.app.state.audit.read(limit, refer_only)
    except AuditUnavailable as exc:
        log.warning("audit read failed: %s", exc)
        raise ApiError(503, "audit_unavailable", "the audit log could not be read; retry shortly",
                       headers={"Retry-After": "5"}) from None
    return {"rows": rows}
