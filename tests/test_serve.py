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
from bonefrac.errors import ConfigError  # noqa: E402
from bonefrac.models import create  # noqa: E402
from bonefrac.serve.app import create_app  # noqa: E402
from bonefrac.serve.batcher import MicroBatcher  # noqa: E402
from bonefrac.serve.settings import Settings  # noqa: E402

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "data" / "sample" / "images").glob("*.webp"))


def tiny_checkpoint(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    meta = {"arch": "resnet10t", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
            "positive_class": "fracture", "preprocess": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                         "channels": 3},
            "threshold": 0.5, "temperature": 1.0, "operating_points": None, "manifest_sha256": "test"}
    return checkpoint.save(path, create("resnet10t", 2).eval(), meta)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "ckpt")


@pytest.fixture(scope="module")
def client(ckpt):
    with TestClient(create_app(Settings(model=str(ckpt), max_files=4, max_request_mb=2))) as c:
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


def test_ops_endpoints_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    text = client.get("/metrics").text
    for name in ("bonefrac_requests_total", "bonefrac_request_seconds_bucket", "bonefrac_batch_size_count",
                 "bonefrac_errors_total"):
        assert name in text
    assert "not a diagnosis" in client.get("/").text.lower() or "assistive" in client.get("/").text.lower()


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


def test_audit_log_survives_restart(ckpt, tmp_path):
    settings = Settings(model=str(ckpt), audit_db=str(tmp_path / "audit.sqlite"))
    with TestClient(create_app(settings)) as c:
        assert post(c, ("x.webp", SAMPLES[0].read_bytes())).status_code == 200
    with TestClient(create_app(settings)) as c:
        rows = c.get("/v1/audit").json()["rows"]
    assert len(rows) == 1 and rows[0]["model_version"].startswith("resnet10t") and len(rows[0]["image_sha256"]) == 64


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
