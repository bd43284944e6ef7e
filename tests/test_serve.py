"""The HTTP service on a tiny random model: predictions, bad input as 4xx JSON, limits, audit, batching."""

import asyncio
import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bonefrac import checkpoint  # noqa: E402
from bonefrac.errors import BonefracError, ConfigError  # noqa: E402
from bonefrac.models import create  # noqa: E402
from bonefrac.serve.app import create_app  # noqa: E402
from bonefrac.serve.batcher import MicroBatcher  # noqa: E402
from bonefrac.serve.settings import Settings  # noqa: E402

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "data" / "sample" / "images").glob("*.webp"))


def tiny_checkpoint(path: Path, **changes) -> Path:
    """A random two-class resnet10t checkpoint (64 px, threshold 0.5, no operating points); `changes` edit its JSON."""
    import torch

    torch.manual_seed(0)
    meta = {"arch": "resnet10t", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
            "positive_class": "fracture", "preprocess": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                         "channels": 3},
            "threshold": 0.5, "temperature": 1.0, "operating_points": None, "manifest_sha256": "test", **changes}
    return checkpoint.save(path, create("resnet10t", 2).eval(), meta)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "ckpt")


@pytest.fixture(scope="module")
def client(ckpt):
    # Two preprocessing processes: bad files below go through the pool and must still come back as 4xx JSON.
    with TestClient(create_app(Settings(model=str(ckpt), max_files=4, max_request_mb=2,
                                        preprocess_workers=2))) as c:
        yield c


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(gray: np.ndarray, patient="DOE^JOHN") -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=fm, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.Modality = patient, "123456", "DX"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (gray.astype(np.uint16) * 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_header_bomb(width=20_000, height=20_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def post(client, *files, path="/v1/predict", **kw):
    return client.post(path, files=[("files", f) for f in files], **kw)


def test_predict_one_and_many_including_dicom(client, caplog):
    from bonefrac.io import read_image

    caplog.set_level(logging.DEBUG)
    one = post(client, (SAMPLES[0].name, SAMPLES[0].read_bytes(), "image/webp"))
    assert one.status_code == 200, one.text
    body = one.json()
    r = body["results"][0]
    assert body["model_version"].startswith("resnet10t@") and r["status"] == "ok"
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-4 and r["prediction"] in body["class_names"]
    assert isinstance(r["refer"], bool) and len(r["sha256"]) == 64
    dcm = dicom_bytes(read_image(SAMPLES[1]))
    many = post(client, ("a.webp", SAMPLES[0].read_bytes()), ("scan", dcm, "application/octet-stream"),
                ("b.webp", SAMPLES[2].read_bytes()))
    assert many.status_code == 200, many.text
    assert [x["status"] for x in many.json()["results"]] == ["ok"] * 3
    assert many.json()["results"][0]["probabilities"] == r["probabilities"]  # batching does not change results
    assert "DOE" not in caplog.text and "123456" not in caplog.text


def test_not_an_xray_gets_a_clear_refusal(client):
    rng = np.random.default_rng(0)
    blank = png_bytes(np.full((300, 300), 128, np.uint8))
    noise = png_bytes(rng.integers(0, 256, (300, 300), dtype=np.uint8))
    yy, xx = np.mgrid[0:200, 0:300]
    colour = png_bytes(np.stack([xx % 256, yy, 255 - xx % 256], -1).astype(np.uint8))
    res = post(client, ("blank.png", blank), ("noise.png", noise), ("colour.png", colour)).json()["results"]
    for r in res:
        assert r["status"] == "not_xray" and r["prediction"] is None and r["refer"] is True
        assert r["message"].startswith("not an X-ray"), r


@pytest.mark.parametrize("name,data,status,code", [
    ("empty.png", b"", 422, "unreadable_image"),
    ("trunc.png", None, 422, "unreadable_image"),
    ("report.png", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n" * 10, 415, "unsupported_media_type"),
    ("bomb.png", png_header_bomb(), 413, "image_too_large"),
    ("bad.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 20, 422, "unreadable_image"),
])
def test_bad_files_are_4xx_json(client, name, data, status, code):
    if data is None:
        data = SAMPLES[0].read_bytes()
        data = png_bytes(np.asarray(Image.open(io.BytesIO(data)).convert("L")))[:500]
    resp = post(client, (name, data))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code and name in resp.json()["error"]["message"]


def test_a_bad_file_among_good_ones_gets_its_own_error_result(ckpt, tmp_path):
    pdf = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n" * 10
    settings = Settings(model=str(ckpt), audit_db=str(tmp_path / "audit.sqlite"), api_key="k")
    with TestClient(create_app(settings), headers={"X-API-Key": "k"}) as c:
        resp = post(c, ("x.webp", SAMPLES[0].read_bytes()), ("report.png", pdf), ("empty.png", b""))
        assert resp.status_code == 200, resp.text
        ok, pdf_row, empty_row = resp.json()["results"]
        assert ok["status"] == "ok" and ok["prediction"] in ("fracture", "no_fracture")
        assert (pdf_row["status"], pdf_row["error_code"]) == ("error", "unsupported_media_type")
        assert empty_row["error_code"] == "unreadable_image" and "empty.png" in empty_row["message"]
        assert pdf_row["refer"] is True and pdf_row["probabilities"] is None
        assert [r["status"] for r in c.get("/v1/audit").json()["rows"]] == ["ok"]  # errors are not cases
        metrics = c.get("/metrics").text  # counted as images and by error code, as whole-request refusals are
        assert 'outcome="error"} 2' in metrics and 'code="unsupported_media_type"} 1' in metrics
        everything_bad = post(c, ("report.png", pdf), ("empty.png", b""))  # nothing usable: still a 4xx
        assert everything_bad.status_code == 415 and "report.png" in everything_bad.json()["error"]["message"]


def test_bad_requests_are_4xx_json(client):
    cases = [
        (client.post("/v1/predict", json={"image": "x"}), 422),
        (client.post("/v1/predict"), 422),
        (client.post("/v1/predict", content=b"\xff" * 100, headers={"content-type": "multipart/form-data"}), 400),
        (post(client, *[("x.webp", SAMPLES[0].read_bytes())] * 5), 413),  # max_files=4
        (post(client, ("big.png", b"\0" * (3 * 1024 * 1024))), 413),       # max_request_mb=2
        (client.get("/v1/predict"), 405),
        (client.get("/nope"), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, (status, resp.text)
        assert set(resp.json()["error"]) == {"code", "message"}
    # the upload hint belongs to errors about the body, not to a bad query parameter elsewhere
    assert "multipart/form-data" in cases[0][0].json()["error"]["message"]
    bad_query = client.get("/v1/audit", params={"limit": -1})
    assert bad_query.status_code == 422 and "limit" in bad_query.json()["error"]["message"]
    assert "multipart" not in bad_query.json()["error"]["message"]


def test_ops_endpoints_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    text = client.get("/metrics").text
    for name in ("bonefrac_requests_total", "bonefrac_request_seconds_bucket", "bonefrac_batch_size_count",
                 "bonefrac_errors_total"):
        assert name in text
    assert "not a diagnosis" in client.get("/").text.lower() or "assistive" in client.get("/").text.lower()


# --- operating points -----------------------------------------------------------------------------------------

POINTS = {"default": 0.5, "screening": 0.02, "high_specificity": 0.9}


@pytest.fixture(scope="module")
def ckpt_with_points(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "points", operating_points=POINTS)


def test_the_model_decides_at_the_operating_point_chosen_at_start_up(ckpt_with_points, client):
    ready = client.get("/ready").json()  # no point named: the model's own threshold
    assert (ready["operating_point"], ready["threshold"]) == ("default", 0.5)
    settings = Settings.from_env({"BONEFRAC_OPERATING_POINT": "screening"}, model=str(ckpt_with_points),
                                 preprocess_workers=0)
    with TestClient(create_app(settings)) as c:
        ready = c.get("/ready").json()
        resp = post(c, *[(p.name, p.read_bytes()) for p in SAMPLES[:4]])
    assert (ready["operating_point"], ready["threshold"]) == ("screening", 0.02)
    assert resp.status_code == 200 and resp.json()["threshold"] == 0.02
    for r in resp.json()["results"]:  # the point decides, and the refer margin lies around it
        assert (r["prediction"] == "fracture") == (r["probabilities"]["fracture"] >= 0.02)
        assert r["refer"] == (abs(r["probabilities"]["fracture"] - 0.02) < 0.15)


def test_an_operating_point_the_model_lacks_stops_the_start_up(ckpt, ckpt_with_points, monkeypatch, caplog):
    import uvicorn

    from bonefrac.cli import main

    with pytest.raises(BonefracError, match=r"model resnet10t@[0-9a-f]{8} has no operating point 'screeening'; "
                                            r"available: default \(0\.5\), screening \(0\.02\), "
                                            r"high_specificity \(0\.9\)"):
        create_app(Settings(model=str(ckpt_with_points), operating_point="screeening"))
    with pytest.raises(BonefracError, match="resnet10t@[0-9a-f]{8} has no saved operating points"):
        create_app(Settings(model=str(ckpt), operating_point="screening"))
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))  # would serve until interrupted
    assert main(["serve", "--model", str(ckpt_with_points), "--operating-point", "screeening"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert not started and len(errors) == 1 and "screening (0.02)" in errors[0]
    monkeypatch.setenv("BONEFRAC_OPERATING_POINT", "high_specificity")
    assert main(["serve", "--model", str(ckpt_with_points)]) == 0
    assert main(["serve", "--model", str(ckpt_with_points), "--operating-point", "screening"]) == 0  # flag wins
    assert [app.state.predictor.threshold for app in started] == [0.9, 0.02]


def test_explain_returns_png_or_clear_501(client):
    resp = post(client, ("x.webp", SAMPLES[0].read_bytes()), path="/v1/explain")
    if resp.status_code == 501:
        assert resp.json()["error"]["code"] == "not_implemented"
    else:
        assert resp.status_code == 200 and resp.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_key_and_rate_limit(ckpt):
    settings = Settings(model=str(ckpt), api_key="s3cret", rate_limit=60)  # burst of 6
    with TestClient(create_app(settings)) as c:
        file = ("x.webp", SAMPLES[0].read_bytes())
        assert post(c, file).json()["error"]["code"] == "unauthorized"
        assert post(c, file, headers={"X-API-Key": "wrong"}).status_code == 401
        codes = [post(c, file, headers={"X-API-Key": "s3cret"}).status_code for _ in range(8)]
        assert codes[0] == 200 and 429 in codes
        assert c.get("/health").status_code == 200  # ops endpoints are neither keyed nor limited


def test_wrong_api_keys_are_rate_limited_too(ckpt):
    settings = Settings(model=str(ckpt), api_key="s3cret", rate_limit=60)  # burst of 6
    with TestClient(create_app(settings)) as c:
        file = ("x.webp", SAMPLES[0].read_bytes())
        codes = [post(c, file, headers={"X-API-Key": f"guess{i}"}).status_code for i in range(8)]
    assert codes[:6] == [401] * 6 and codes[6:] == [429, 429]  # key guessing is throttled


def test_audit_log_survives_restart(ckpt, tmp_path):
    settings = Settings(model=str(ckpt), audit_db=str(tmp_path / "audit.sqlite"), api_key="k")
    with TestClient(create_app(settings), headers={"X-API-Key": "k"}) as c:
        assert post(c, ("x.webp", SAMPLES[0].read_bytes())).status_code == 200
    with TestClient(create_app(settings), headers={"X-API-Key": "k"}) as c:
        rows = c.get("/v1/audit").json()["rows"]
    assert len(rows) == 1 and rows[0]["model_version"].startswith("resnet10t") and len(rows[0]["image_sha256"]) == 64


def test_the_audit_log_is_never_readable_without_an_api_key(ckpt, tmp_path):
    settings = Settings(model=str(ckpt), audit_db=str(tmp_path / "audit.sqlite"), preprocess_workers=0)
    with TestClient(create_app(settings)) as c:
        assert post(c, ("x.webp", SAMPLES[0].read_bytes())).status_code == 200  # predicting needs no key
        resp = c.get("/v1/audit")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "audit_needs_key"
    assert "rows" not in resp.json()


def test_audit_rows_keep_the_threshold_and_old_logs_gain_the_column(ckpt, tmp_path):
    """The model version names the files, not the operating point: the threshold that decided is stored beside it.
    A log written before the column existed keeps its rows and takes new ones."""
    import sqlite3

    db = tmp_path / "audit.sqlite"
    with sqlite3.connect(db) as old:
        old.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
                    "model_version TEXT NOT NULL, image_sha256 TEXT NOT NULL, status TEXT NOT NULL, prediction TEXT, "
                    "probabilities TEXT, refer INTEGER NOT NULL)")
        old.execute("INSERT INTO predictions (time, model_version, image_sha256, status, refer) "
                    "VALUES (0, 'old@00000000', 'x', 'ok', 0)")
    settings = Settings(model=str(ckpt), audit_db=str(db), preprocess_workers=0, api_key="k")
    with TestClient(create_app(settings), headers={"X-API-Key": "k"}) as c:
        answer = post(c, ("x.webp", SAMPLES[0].read_bytes())).json()
        rows = c.get("/v1/audit").json()["rows"]
    assert [r["model_version"] for r in rows][1] == "old@00000000" and rows[1]["threshold"] is None
    assert answer["threshold"] is not None and rows[0]["threshold"] == answer["threshold"]
    assert rows[0]["route"] == "predict" and rows[1]["route"] is None  # the route column was added too


def test_micro_batcher_groups_concurrent_requests():
    calls = []

    def fake(images):
        calls.append(len(images))
        return np.array([[float(img[0, 0]), 0.0] for img in images])

    async def main():
        b = MicroBatcher(fake, max_batch=8, max_wait_ms=50)
        await b.start()
        outs = await asyncio.gather(*[b.submit([np.full((2, 2), i, np.uint8)]) for i in range(20)])
        await b.stop()
        return outs

    outs = asyncio.run(main())
    assert [int(o[0, 0]) for o in outs] == list(range(20))  # each request gets its own rows back
    assert max(calls) == 8 and len(calls) < 20


def test_settings_from_env():
    s = Settings.from_env({"BONEFRAC_MAX_BATCH": "4", "BONEFRAC_CORS_ORIGINS": "http://a, http://b",
                           "BONEFRAC_XRAY_CHECK": "0", "BONEFRAC_API_KEY": "sup3r-secret"}, port=9000)
    assert (s.max_batch, s.cors_origins, s.xray_check, s.port) == (4, ("http://a", "http://b"), False, 9000)
    assert s.api_key == "sup3r-secret" and "sup3r-secret" not in repr(s)
    assert Settings.from_env({"BONEFRAC_PREPROCESS_WORKERS": "3"}).preprocess_workers == 3
    assert Settings.from_env({"BONEFRAC_PREPROCESS_WORKERS": "0"}, preprocess_workers=None).preprocess_workers == 0
    with pytest.raises(ConfigError, match="PREPROCESS_WORKERS"):
        Settings.from_env({"BONEFRAC_PREPROCESS_WORKERS": "-1"})


def test_device_setting_reaches_the_backend(ckpt, monkeypatch):
    assert Settings.from_env({}).device == "auto"  # default: the first CUDA GPU when present, else the CPU
    assert Settings.from_env({"BONEFRAC_DEVICE": "cuda:1"}).device == "cuda:1"
    assert Settings.from_env({"BONEFRAC_DEVICE": "cuda"}, device="cpu").device == "cpu"  # CLI flag wins
    with pytest.raises(ConfigError, match="BONEFRAC_DEVICE"):
        Settings.from_env({"BONEFRAC_DEVICE": "gpu0"})
    import bonefrac.backends

    seen = []
    real = bonefrac.backends.load_backend
    monkeypatch.setattr(bonefrac.backends, "load_backend",
                        lambda model, device="auto", **kw: seen.append(device) or real(model, device, **kw))
    create_app(Settings(model=str(ckpt), device="cpu"))
    assert seen == ["cpu"]


# --- preprocessing in worker processes ---------------------------------------------------------------------


def test_api_errors_survive_pickling():
    import pickle

    from bonefrac.serve.errors import ApiError

    err = pickle.loads(pickle.dumps(ApiError(413, "image_too_large", "x.png: too large", {"Retry-After": "1"})))
    assert (err.status, err.code, err.message, err.headers) == (413, "image_too_large", "x.png: too large",
                                                                {"Retry-After": "1"})


def test_process_pool_gives_the_same_results_as_threads(client, ckpt):
    from bonefrac.serve.preprocess import Preprocessor

    async def prepare_all(workers):
        pre = Preprocessor(workers)
        await pre.start()
        try:
            return await asyncio.gather(*[pre.prepare(p.read_bytes(), p.name, 60_000_000, True, 64)
                                          for p in SAMPLES])
        finally:
            await pre.stop()

    pooled, threaded = asyncio.run(prepare_all(2)), asyncio.run(prepare_all(0))
    assert len(pooled) == len(SAMPLES) == 100
    for a, b in zip(pooled, threaded):
        assert (a["filename"], a["sha256"], a["check"]) == (b["filename"], b["sha256"], b["check"])
        assert a["gray"].dtype == np.uint8 and np.array_equal(a["gray"], b["gray"])
    files = [(p.name, p.read_bytes()) for p in SAMPLES[:4]]
    with TestClient(create_app(Settings(model=str(ckpt), preprocess_workers=0))) as threads:
        assert post(threads, *files).json()["results"] == post(client, *files).json()["results"]
        resp = post(threads, ("report.png", b"%PDF-1.4\n" * 50))
        assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


def test_killed_worker_gives_503_then_the_pool_recovers(ckpt):
    import os
    import signal
    import time

    with TestClient(create_app(Settings(model=str(ckpt), preprocess_workers=1))) as c:
        file = ("x.webp", SAMPLES[0].read_bytes())
        assert post(c, file).status_code == 200
        pool = c.app.state.preprocessor._pool
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not pool._broken and time.monotonic() < deadline:  # the pool notices the death on its own thread
            time.sleep(0.05)
        resp = post(c, file)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "preprocess_unavailable"
        assert resp.headers["Retry-After"] == "1"
        assert c.app.state.preprocessor.restarts == 1 and c.app.state.preprocessor._pool is not pool
        assert post(c, file).status_code == 200
        assert c.get("/health").status_code == 200


# --- batcher fairness --------------------------------------------------------------------------------------


class FakeGpu:
    """Per call: 1 ms of Python holding the GIL, then 3 ms with it released (like a GPU forward)."""

    def __init__(self):
        self.calls = []  # (start, end) per call

    def __call__(self, images):
        import time

        start = time.perf_counter()
        while time.perf_counter() < start + 0.001:
            pass
        time.sleep(0.003)
        self.calls.append((start, time.perf_counter()))
        return np.array([[float(img[0, 0]), 0.0] for img in images])


def test_batcher_is_fifo_under_closed_loop_load():
    """32 closed-loop clients, batches of 8: in FIFO order a request waits for the call in progress and the full
    batches queued ahead of it, so at most 32 / 8 calls (5 with a margin) finish between submit and answer."""
    fake, clients, max_batch = FakeGpu(), 32, 8
    calls_waited = []

    async def client(b, cid):
        for _ in range(15):
            before = len(fake.calls)  # calls finished so far
            out = await b.submit([np.full((2, 2), cid, np.uint8)])
            assert int(out[0, 0]) == cid
            calls_waited.append(len(fake.calls) - before)

    async def main():
        b = MicroBatcher(fake, max_batch=max_batch, max_wait_ms=10)
        await b.start()
        await asyncio.gather(*[client(b, i) for i in range(clients)])
        await b.stop()

    asyncio.run(main())
    assert len(calls_waited) == clients * 15
    assert max(calls_waited) <= clients // max_batch + 1, sorted(calls_waited)[-10:]


# --- failure isolation, shutdown, event-loop blocking, chunked limit, audit lock --------------------------------


def prepared(path: Path, size=64) -> np.ndarray:
    """The array the model gets for this file (decoded, checked, resized), as the service prepares it."""
    from bonefrac.serve.preprocess import Preprocessor

    async def main():
        pre = Preprocessor(0)
        await pre.start()
        try:
            return (await pre.prepare(path.read_bytes(), path.name, 60_000_000, True, size))["gray"]
        finally:
            await pre.stop()

    return asyncio.run(main())


def test_micro_batcher_fails_only_the_request_the_model_fails_on():
    def fake(images):
        if any(img[0, 0] == 3 for img in images):
            raise ValueError("bad image")
        return np.array([[float(img[0, 0]), 0.0] for img in images])

    async def main():
        b = MicroBatcher(fake, max_batch=8, max_wait_ms=50)
        await b.start()
        outs = await asyncio.gather(*[b.submit([np.full((2, 2), i, np.uint8)]) for i in range(5)],
                                    return_exceptions=True)
        await b.stop()
        return outs

    outs = asyncio.run(main())
    assert isinstance(outs[3], ValueError)
    assert [int(o[0, 0]) for i, o in enumerate(outs) if i != 3] == [0, 1, 2, 4]


def test_bad_image_fails_only_its_own_request_in_a_shared_batch(ckpt):
    from concurrent.futures import ThreadPoolExecutor

    from bonefrac.backends import load_backend

    predictor = load_backend(str(ckpt), "cpu")
    bad, real, sizes = prepared(SAMPLES[4]), predictor.predict_arrays, []

    def predict_arrays(images):  # a model that cannot handle one particular image
        sizes.append(len(images))
        if any(np.array_equal(img, bad) for img in images):
            raise RuntimeError("model failed")
        return real(images)

    predictor.predict_arrays = predict_arrays
    # A long window, so the five concurrent requests land in one batch.
    settings = Settings(model=str(ckpt), max_batch=8, max_wait_ms=500, preprocess_workers=0)
    app = create_app(settings, predictor)
    with TestClient(app, raise_server_exceptions=False) as c, ThreadPoolExecutor(5) as pool:
        names = [SAMPLES[i] for i in (0, 1, 2, 3, 4)]
        resps = list(pool.map(lambda p: post(c, (p.name, p.read_bytes())), names))
    assert max(sizes) > 1  # they were batched together (else the test proves nothing)
    assert [r.status_code for r in resps] == [200, 200, 200, 200, 500], [r.text for r in resps]
    assert resps[4].json()["error"]["code"] == "internal"


def test_predict_after_shutdown_is_503_json(ckpt):
    with TestClient(create_app(Settings(model=str(ckpt), preprocess_workers=0))) as c:
        c.portal.call(c.app.state.batcher.stop)  # as at shutdown, while requests still come in
        resp = post(c, ("x.webp", SAMPLES[0].read_bytes()))
        ready = c.get("/ready")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503 and ready.json() == {"status": "stopping"}


def test_explain_draws_and_encodes_off_the_event_loop(client, monkeypatch):
    import bonefrac.explain
    import bonefrac.serve.routes.predict as routes

    on_loop = []

    def spy(fn):
        def wrapper(*args, **kw):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)  # the event loop's thread: every other request waits
            except RuntimeError:
                on_loop.append(False)
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(bonefrac.explain, "overlay", spy(bonefrac.explain.overlay))
    monkeypatch.setattr(routes, "_png", spy(routes._png))
    resp = post(client, ("x.webp", SAMPLES[0].read_bytes()), path="/v1/explain")
    assert resp.status_code == 200, resp.text
    assert on_loop == [False, False]


def test_chunked_upload_over_the_limit_is_413(client):
    def body():  # no Content-Length: the cap is enforced while streaming (max_request_mb=2)
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(48):
            yield b"\0" * 65536
        yield b"\r\n--x--\r\n"

    resp = client.post("/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"


def test_locked_audit_db_is_503_and_readers_do_not_block(ckpt, tmp_path):
    import sqlite3

    db = tmp_path / "audit.sqlite"
    file = ("x.webp", SAMPLES[0].read_bytes())
    with TestClient(create_app(Settings(model=str(ckpt), audit_db=str(db), preprocess_workers=0))) as c:
        c.app.state.audit.timeout = 0.2  # not the 10 s default: the test would wait that long
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN")
        other.execute("SELECT COUNT(*) FROM predictions").fetchall()  # a reader mid-transaction
        assert post(c, file).status_code == 200  # WAL: the write goes on beside the reader
        other.execute("COMMIT")
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        resp = post(c, file)
        other.execute("ROLLBACK")
        other.close()
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "audit_unavailable"
    assert "not recorded" in resp.json()["error"]["message"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_no_script_from_outside(client, page):
    """Air-gapped networks: every script and style sheet of the docs pages is served by the service itself."""
    import re

    html = client.get(page).text
    assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html) + re.findall(r'url: ?["\']([^"\']+)["\']', html)
    scripts = [a for a in assets if a.endswith((".js", ".css"))]
    assert scripts and not [a for a in assets if "//" in a]
    for url in scripts:
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 10_000, url


def test_openapi_documents_every_error_code_the_service_sends(client):
    """The schema's refusals match the code: each code raised in the service is listed under its status, and
    /v1/predict's 422 is the service's error body, not FastAPI's default validation schema."""
    import re

    from bonefrac.serve.errors import CODES

    sent = set()
    for path in (Path(__file__).resolve().parents[1] / "src" / "bonefrac" / "serve").rglob("*.py"):
        sent |= set(re.findall(r"(?:ApiError|error_response)\((\d{3}), \"([a-z_]+)\"", path.read_text()))
    listed = {(str(s), c) for s, codes in CODES.items() for c in codes}
    assert sent and sent <= listed, sent - listed
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/predict"]["post"]["responses"]
    for status in ("401", "413", "415", "422", "429", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "not_xray" in responses["422"]["description"]


# --- which model answered; explaining ensembles -------------------------------------------------------------


def test_model_version_tells_seeds_and_calibrations_apart_everywhere_it_is_shown(ckpt, tmp_path):
    """All of these were `resnet10t@test` (architecture + manifest hash): the audit log could not tell them apart."""
    import json
    import re
    import shutil

    import torch

    from bonefrac.predict import Predictor

    meta = checkpoint.read_meta(ckpt)
    torch.manual_seed(1)
    other_seed = checkpoint.save(tmp_path / "seed1", create("resnet10t", 2).eval(), meta)
    calibrated = shutil.copytree(ckpt, tmp_path / "calibrated")
    (calibrated / checkpoint.META_FILE).write_text(json.dumps({**meta, "temperature": 1.7, "threshold": 0.42}))
    moved = shutil.copytree(ckpt, tmp_path / "moved")
    versions = [Predictor.from_checkpoint(p, "cpu").version for p in (ckpt, other_seed, calibrated, moved)]
    assert all(re.fullmatch(r"resnet10t@[0-9a-f]{8}", v) for v in versions), versions
    assert len(set(versions[:3])) == 3 and versions[3] == versions[0]  # the same files: the same version
    settings = Settings(model=str(calibrated), audit_db=str(tmp_path / "audit.sqlite"), preprocess_workers=0,
                        api_key="k")
    with TestClient(create_app(settings), headers={"X-API-Key": "k"}) as c:
        ready = c.get("/ready").json()["model_version"]
        answered = post(c, ("x.webp", SAMPLES[0].read_bytes())).json()["model_version"]
        audited = c.get("/v1/audit").json()["rows"][0]["model_version"]
    assert ready == answered == audited == versions[2]


def _ensemble_dir(ckpt, root: Path) -> Path:
    """An ensemble directory as `bonefrac ensemble` writes it: `ckpt` and a hotter copy of it as members."""
    import json
    import shutil

    shutil.copytree(ckpt, root / "members" / "0_resnet10t")
    tiny_checkpoint(root / "members" / "1_resnet10t", temperature=2.0, threshold=0.45)
    spec = {"format": "bonefrac-ensemble", "members": ["members/0_resnet10t", "members/1_resnet10t"],
            "class_names": ["no_fracture", "fracture"], "positive_index": 1, "weights": [0.6, 0.4],
            "threshold": 0.48, "operating_points": None}
    (root / "ensemble.json").write_text(json.dumps(spec))
    return root


def test_explain_serves_an_ensemble_directory_as_the_cli_explains_it(ckpt, tmp_path):
    from bonefrac.explain import gradcam, overlay
    from bonefrac.io import read_image
    from bonefrac.predict import load_predictor

    ens = _ensemble_dir(ckpt, tmp_path / "ens")
    with TestClient(create_app(Settings(model=str(ens), preprocess_workers=0, warmup=False))) as c:
        resp = post(c, ("x.webp", SAMPLES[0].read_bytes()), path="/v1/explain")  # was a 501
    assert resp.status_code == 200, resp.text
    gray = read_image(SAMPLES[0])
    expected = overlay(gray, gradcam(load_predictor([str(ens)], "cpu"), [gray])[0])  # `bonefrac explain ens`
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(resp.content))), expected)


def test_explain_of_an_exported_model_is_a_501_that_says_so(ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from bonefrac.export import export

    export(ckpt, tmp_path / "m.onnx", images=SAMPLES[0].parent, n_parity=4)
    with TestClient(create_app(Settings(model=str(tmp_path / "m.onnx"), preprocess_workers=0))) as c:
        resp = post(c, ("x.webp", SAMPLES[0].read_bytes()), path="/v1/explain")
        version = c.get("/ready").json()["model_version"]
    assert resp.status_code == 501 and resp.json()["error"]["code"] == "not_implemented"
    message = resp.json()["error"]["message"]
    assert "checkpoint or ensemble directory" in message and "exported onnx model" in message
    assert version.startswith("resnet10t@") and version.endswith("+onnx-fp32") and "@test" not in version


# --- what an explanation map is; one image per explanation; the page's headers; request size ---------------


@pytest.mark.parametrize("threshold, called", [(1e-6, "fracture"), (0.999999, "no_fracture")])
def test_explain_names_the_class_its_map_shows_with_its_probability(tmp_path, monkeypatch, threshold, called):
    """A bare PNG let a confident negative call's map (scaled within the image, so always saturated) pass for a
    fracture locator: the headers say which class's evidence it is, how probable that class is, and the decision."""
    import bonefrac.explain

    shapes = []
    real_overlay = bonefrac.explain.overlay
    monkeypatch.setattr(bonefrac.explain, "overlay", lambda img, heat, *a: shapes.append(heat.shape)
                        or real_overlay(img, heat, *a))
    ckpt = tiny_checkpoint(tmp_path / "ckpt", threshold=threshold)
    file = ("x.webp", SAMPLES[0].read_bytes())
    with TestClient(create_app(Settings(model=str(ckpt), preprocess_workers=0, warmup=False))) as c:
        predicted = post(c, file).json()
        resp = post(c, file, path="/v1/explain")
    assert resp.status_code == 200 and resp.content[:8] == b"\x89PNG\r\n\x1a\n", resp.text
    h, r = resp.headers, predicted["results"][0]
    assert h["X-Explained-Class"] == h["X-Prediction"] == r["prediction"] == called
    assert float(h["X-Explained-Probability"]) == pytest.approx(r["probabilities"][called], abs=1e-5)
    assert float(h["X-Threshold"]) == threshold and h["X-Positive-Class"] == "fracture"
    assert h["X-Model-Version"] == predicted["model_version"] and h["X-Operating-Point"] == "default"
    assert predicted["positive_class"] == "fracture" and predicted["operating_point"] == "default"
    assert shapes == [(64, 64)]  # the map stays at the model's resolution; overlay stretches it while drawing


def test_explain_headers_are_readable_by_other_origins_when_cors_is_on(ckpt):
    settings = Settings(model=str(ckpt), preprocess_workers=0, warmup=False, cors_origins=("http://viewer",))
    with TestClient(create_app(settings)) as c:
        resp = post(c, ("x.webp", SAMPLES[0].read_bytes()), path="/v1/explain", headers={"Origin": "http://viewer"})
    assert resp.status_code == 200, resp.text
    exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert {"x-explained-class", "x-explained-probability", "x-prediction", "x-threshold",
            "x-model-version"} <= exposed


def test_explain_refuses_more_than_one_file(client):
    """It used to explain the first file and silently drop the rest."""
    resp = post(client, ("a.webp", SAMPLES[0].read_bytes()), ("b.webp", SAMPLES[1].read_bytes()), path="/v1/explain")
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "one_image_only" and "2" in resp.json()["error"]["message"]
    responses = client.get("/openapi.json").json()["paths"]["/v1/explain"]["post"]["responses"]
    assert "one_image_only" in responses["422"]["description"]


STRICT_CSP = ["default-src 'self'", "img-src 'self' blob: data:", "script-src 'self'", "style-src 'self'",
              "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"]


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css", "/static/index.html"])
def test_the_page_and_its_files_carry_a_strict_content_security_policy(client, path):
    resp = client.get(path)
    assert resp.status_code == 200
    policy = [d.strip() for d in resp.headers.get("content-security-policy", "").split(";")]
    assert sorted(policy) == sorted(STRICT_CSP), policy


def test_the_page_has_no_inline_code_and_the_docs_pages_keep_working(client):
    """The strict policy would block inline scripts, styles and handlers; Swagger UI needs its inline script, so
    /docs and /redoc are served without it."""
    import re

    html = client.get("/").text
    assert all(re.search(r"\ssrc=", tag) for tag in re.findall(r"<script\b[^>]*>", html, re.I))
    assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html, re.I)  # no script body
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", html, re.I)
    for page in ("/docs", "/redoc"):
        resp = client.get(page)
        assert resp.status_code == 200 and "frame-ancestors" not in resp.headers.get("content-security-policy", "")


def test_the_default_request_limit_takes_an_uncompressed_dr_dicom():
    """4300 x 3500 pixels x 2 bytes is ~30 MB: the 20 MB default refused typical digital radiographs."""
    from bonefrac.serve.guards import BodyLimitMiddleware

    body = 4300 * 3500 * 2 + 64 * 1024  # pixel data + header and multipart overhead
    assert Settings().max_request_bytes >= body
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    async def main():
        limit = BodyLimitMiddleware(app, Settings().max_request_bytes, telemetry=None)
        scope = {"type": "http", "path": "/v1/predict", "headers": [(b"content-length", str(body).encode())]}
        await limit(scope, None, None)

    asyncio.run(main())
    assert seen == ["/v1/predict"]  # passed on, not refused


@pytest.mark.parametrize("name", ["ñormal 骨", "50% displaced", "no_fracture", "fracture: simple"])
def test_explain_header_text_round_trips_any_class_name(name):
    """Header values are latin-1: other scripts are percent-encoded, and so is "%" itself, or a name that holds
    "%41" could not be told from an encoded "A"; printable ASCII names are sent as they are."""
    from urllib.parse import unquote

    from bonefrac.serve.routes.predict import header_text

    sent = header_text(name)
    assert sent.isascii() and unquote(sent) == name
    assert (sent == name) == (name.isascii() and "%" not in name)
