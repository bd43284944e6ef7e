"""Service limits that keep one kind of load from sinking the rest: the budget of decoded pixels in flight, the
batcher's queue limit, work dropped for clients that left, a second start of one app, a bounded shutdown, and a
model's non-finite output answered as that image's error."""

import asyncio
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from bonefrac.serve.app import create_app, server_options  # noqa: E402
from bonefrac.serve.batcher import MicroBatcher  # noqa: E402
from bonefrac.serve.errors import ApiError  # noqa: E402
from bonefrac.serve.settings import Settings  # noqa: E402
from bonefrac.serve.synthetic import SyntheticPredictor  # noqa: E402


def make_app(predictor=None, **settings):
    base = dict(preprocess_workers=0, warmup=False, rate_limit=0, xray_check=False)
    return create_app(Settings(**{**base, **settings}), predictor=predictor or SyntheticPredictor(0, 0, 32))


def png(height, width, value=None, mode="L") -> bytes:
    rng = np.random.default_rng(height * 7 + width)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    arr = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def dicom(rows, cols, frames=1, deflated=False) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.zeros((frames, rows, cols), np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- 1. memory: no pixels for refused images, a budget of decoded pixels -----------------------------------


def test_an_image_refused_as_not_an_xray_keeps_no_pixels():
    from bonefrac.serve.preprocess import prepare

    flat = png(300, 300, value=128)  # the check refuses it, so it skips the resize
    for size in (64, None):
        item = prepare(flat, "flat.png", 60_000_000, True, size)
        assert not item["check"].ok and item["gray"] is None


def test_pixel_budget_is_first_come_first_served_caps_weights_and_survives_cancellation():
    from bonefrac.serve.budget import PixelBudget

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)

    async def main():
        budget = PixelBudget(10)
        first = await budget.acquire(6)
        big = asyncio.create_task(budget.acquire(6))
        small = asyncio.create_task(budget.acquire(3))  # would fit, but waits behind `big`
        await settle()
        assert not big.done() and not small.done() and budget.in_use == 6
        assert await budget.acquire(0) == 0  # refused from its header: holds nothing, waits for nothing
        budget.release(first)
        assert await big == 6 and await small == 3 and budget.in_use == 9
        huge = asyncio.create_task(budget.acquire(1000))  # over the whole budget: capped, then alone
        after = asyncio.create_task(budget.acquire(1))
        gives_up = asyncio.create_task(budget.acquire(1))
        await settle()
        gives_up.cancel()
        await settle()
        budget.release(6)
        budget.release(3)
        assert await huge == 10 and budget.in_use == 10 and not after.done()
        budget.release(10)
        assert await after == 1 and budget.in_use == 1 and gives_up.cancelled()
        budget.release(1)
        return budget

    budget = asyncio.run(main())
    assert budget.in_use == 0 and budget.peak == 10


def test_upload_pixels_come_from_headers_without_decoding(monkeypatch):
    import pydicom.filereader

    from bonefrac.serve.budget import upload_pixels

    assert upload_pixels(png(50, 100), "a.png", 10_000) == 5_000
    # Weighed by what decoding holds: RGBA 4 bytes a pixel (it was counted as grey, 1), 16-bit grey 2.
    assert upload_pixels(png(50, 100, mode="RGBA"), "a.png", 10_000) == 20_000
    wide = io.BytesIO()
    Image.fromarray(np.zeros((100, 50), np.uint16)).save(wide, format="PNG")
    assert upload_pixels(wide.getvalue(), "a.png", 10_000) == 10_000
    assert upload_pixels(png(200, 100), "a.png", 10_000) == 0  # over the limit: refused from its header
    assert upload_pixels(b"not an image at all", "a.png", 10_000) == 0  # refused as an unknown format
    assert upload_pixels(b"not an image at all", "a.dcm", 10_000) == 10_000  # unreadable header: the maximum
    assert upload_pixels(dicom(48, 64), "scan", 10_000) == 6_144  # 16 bits allocated
    assert upload_pixels(dicom(48, 64, frames=3), "scan", 10_000) == 18_432
    deflated = dicom(400, 500, frames=4, deflated=True)
    assert len(deflated) < 20_000  # 1.6 MB of pixels deflated

    def no_full_inflation(*args, **kwargs):
        raise AssertionError("the whole dataset was inflated to read its header")

    monkeypatch.setattr(pydicom.filereader.zlib, "decompress", no_full_inflation)
    assert upload_pixels(deflated, "scan", 1_000_000) == 1_600_000
    # Refused from the header by the decoder, so holding no budget (a 454-byte upload weighed as the whole budget
    # made every upload behind it wait): a frame over the limit, or more pixel data than may be inflated.
    assert upload_pixels(dicom(48, 64), "scan", 3_000) == 0
    assert upload_pixels(deflated, "scan", 10_000) == 0


def test_decoded_pixels_in_flight_never_exceed_the_budget(monkeypatch):
    import bonefrac.serve.preprocess as preprocess

    real, lock, now, peak = preprocess.prepare, threading.Lock(), [0], [0]

    def slow_prepare(data, name, max_pixels, xray_check, size):  # counts what is being decoded at once
        pixels = int(np.prod(Image.open(io.BytesIO(data)).size))
        with lock:
            now[0] += pixels
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        with lock:
            now[0] -= pixels
        return real(data, name, max_pixels, xray_check, size)

    monkeypatch.setattr(preprocess, "prepare", slow_prepare)
    budget = 2 * 64 * 64 + 32 * 32
    images = [png(64, 64), png(32, 32), png(48, 40)]
    app = make_app(max_pixels=64 * 64, max_pixels_in_flight=budget)
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
        def post(i):
            return c.post("/v1/predict", files=[("files", (f"{j}.png", images[(i + j) % 3])) for j in range(3)])
        statuses = [r.status_code for r in pool.map(post, range(12))]
    assert statuses == [200] * 12  # all answered
    assert 0 < peak[0] <= budget and app.state.pixels.peak <= budget and app.state.pixels.in_use == 0


def test_explain_keeps_its_full_size_image_in_the_budget_until_drawn(monkeypatch):
    import bonefrac.serve.routes.predict as routes

    app, seen = make_app(), []

    def explain_arrays(predictor, images, at_image_size=True):
        seen.append(app.state.pixels.in_use)
        probs = predictor.predict_arrays(images)
        return np.zeros((1, 4, 4), np.float32), probs.argmax(1), probs

    def overlay(image, cam):
        seen.append(app.state.pixels.in_use)
        return np.stack([image] * 3, -1)

    monkeypatch.setattr(routes, "_explainer", lambda predictor: (explain_arrays, overlay))
    with TestClient(app) as c:
        resp = c.post("/v1/explain", files=[("files", ("a.png", png(300, 200)))])
    assert resp.status_code == 200, resp.text
    assert seen == [60_000, 60_000] and app.state.pixels.in_use == 0


def test_full_size_images_waiting_for_a_mixed_size_ensemble_stay_in_the_budget():
    """Members of other input sizes get the full image, which then waits in the batcher's queue: its pixels were
    given back after decoding, so the budget no longer bounded what the queue held."""
    class Mixed(SyntheticPredictor):
        def __init__(self):
            super().__init__(0, 0, 32)
            self.members = [SyntheticPredictor(0, 0, 32), SyntheticPredictor(0, 0, 48)]

        def predict_arrays(self, images):
            seen.append((app.state.pixels.in_use, [img.shape for img in images]))
            return super().predict_arrays(images)

    seen = []
    app = make_app(predictor=Mixed())
    with TestClient(app) as c:
        assert c.post("/v1/predict", files=[("files", ("a.png", png(300, 200)))]).status_code == 200
    assert seen == [(60_000, [(300, 200)])] and app.state.pixels.in_use == 0


# --- 5. a bounded queue; clients that leave take their images with them --------------------------------------


def test_the_batcher_refuses_images_past_its_queue_limit():
    gate, started, img = threading.Event(), threading.Event(), np.zeros((2, 2), np.uint8)

    def model(images):
        started.set()
        gate.wait(30)
        return np.zeros((len(images), 2), np.float32)

    async def queued(batcher, n):
        for _ in range(1000):
            if batcher._queue.qsize() == n:
                return
            await asyncio.sleep(0.005)

    async def main():
        b = MicroBatcher(model, max_batch=1, max_wait_ms=0, max_queue=3)
        await b.start()
        try:
            first = asyncio.create_task(b.submit([img]))
            await asyncio.to_thread(started.wait, 10)  # the model holds the first image; the queue is empty
            two = asyncio.create_task(b.submit([img, img]))
            await queued(b, 2)
            with pytest.raises(ApiError) as refused:
                await b.submit([img, img])
            assert refused.value.status == 503 and refused.value.code == "overloaded"
            assert refused.value.headers["Retry-After"] == "1"
            one = asyncio.create_task(b.submit([img]))  # 2 + 1 fit
            await queued(b, 3)
            two.cancel()  # its client left: its images no longer count
            again = asyncio.create_task(b.submit([img, img]))
            await asyncio.sleep(0)
            gate.set()
            assert [len(r) for r in await asyncio.gather(first, one, again)] == [1, 1, 2]
            assert len(await b.submit([img] * 5)) == 5  # over the limit, but into an empty queue
        finally:
            gate.set()
            await b.stop()

    asyncio.run(main())


async def asgi_post(app, body: bytes, headers: list, gone: asyncio.Event | None = None) -> int:
    """POST /v1/predict straight through ASGI; after the body, the client disconnects once `gone` is set."""
    sent, out = False, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message):
        out.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    await app(scope, receive, send)
    return out[0]["status"]


def test_a_client_that_disconnects_has_its_images_dropped_unprocessed():
    gate, started, calls = threading.Event(), threading.Event(), []

    class Blocking(SyntheticPredictor):
        def predict_arrays(self, images):
            calls.append(len(images))
            started.set()
            gate.wait(30)
            return super().predict_arrays(images)

    app = make_app(Blocking(0, 0, 32), max_batch=1)
    request = httpx.Request("POST", "http://testserver/v1/predict", files=[("files", ("a.png", png(40, 40)))])
    body, headers = request.read(), [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]

    async def main():
        async with app.router.lifespan_context(app):
            try:
                first = asyncio.create_task(asgi_post(app, body, headers))
                await asyncio.to_thread(started.wait, 10)  # the model is busy with the first request
                gone = asyncio.Event()
                second = asyncio.create_task(asgi_post(app, body, headers, gone))
                for _ in range(1000):
                    if app.state.batcher._queue.qsize():
                        break
                    await asyncio.sleep(0.005)
                gone.set()
                left = await asyncio.wait_for(second, 5)  # answered while the model is still busy
                gate.set()
                return await first, left, await asgi_post(app, body, headers)
            finally:
                gate.set()

    assert asyncio.run(main()) == (200, 499, 200)
    assert calls == [1, 1]  # the first and third requests' images; the second's never reached the model
    assert 'bonefrac_errors_total{code="client_disconnected"} 1' in app.state.telemetry.render()


# --- 6. started twice; 7. a bounded shutdown --------------------------------------------------------------------


def test_the_same_app_serves_again_after_a_second_start():
    app = make_app()
    for _ in range(2):
        with TestClient(app) as c:
            assert c.get("/ready").status_code == 200
            assert c.post("/v1/predict", files=[("files", ("a.png", png(40, 40)))]).status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shutdown_cancels_a_stalled_upload_after_the_timeout():
    uvicorn = pytest.importorskip("uvicorn")
    settings = Settings(port=_free_port(), preprocess_workers=0, warmup=False, shutdown_timeout_s=1)
    assert server_options(settings)["timeout_graceful_shutdown"] == 1
    assert server_options(Settings())["timeout_graceful_shutdown"] == 30
    app = create_app(settings, predictor=SyntheticPredictor(0, 0, 32))
    server = uvicorn.Server(uvicorn.Config(app, **{**server_options(settings), "log_level": "critical"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    sock = None
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        sock = socket.create_connection(("127.0.0.1", settings.port), timeout=10)
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=B\r\n\r\n5\r\n--B\r\n\r\n")  # then nothing
        for _ in range(600):
            if server.server_state.tasks:  # the request is being handled (waiting for the rest of its body)
                break
            time.sleep(0.05)
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "the server still waits for the stalled upload"
    finally:
        if sock is not None:
            sock.close()
        server.should_exit = True
        thread.join(20)


def test_memory_freed_by_a_large_decode_is_handed_back(monkeypatch):
    """glibc kept each decoding thread's largest decode in its arena: resident memory grew with every thread."""
    import platform

    import bonefrac.serve.preprocess as preprocess

    calls = []
    real = preprocess.release_freed_memory
    monkeypatch.setattr(preprocess, "release_freed_memory", lambda: calls.append(1))
    preprocess.prepare(png(2048, 2048, value=0), "large.png", 60_000_000, True, 64)
    assert calls == [1]
    preprocess.prepare(png(64, 64), "small.png", 60_000_000, False, 64)
    assert calls == [1]  # not after every small image
    if platform.libc_ver()[0] == "glibc":
        assert preprocess._malloc_trim() is not None
    real()  # and it runs


def test_non_finite_model_output_is_that_image_s_error_result_not_a_crash():
    """prediction_rows says why (a "message"); _result added its own and raised TypeError: a 500 for the request."""
    class Broken(SyntheticPredictor):
        def predict_arrays(self, images):
            return np.full((len(images), 2), np.nan, np.float32)

    with TestClient(make_app(Broken(0, 0, 32)), raise_server_exceptions=False) as c:
        resp = c.post("/v1/predict", files=[("files", ("a.png", png(40, 40)))])
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    assert (result["status"], result["error_code"], result["refer"]) == ("error", "internal", True)
    assert "non-finite" in result["message"] and result["prediction"] is None
