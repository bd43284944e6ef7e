"""Service guards act before a request body is read, every response is counted, the audit log recovers, and the
image readers' debug output (metadata that can name a patient) stays out of the logs."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bonefrac.serve.app import create_app  # noqa: E402
from bonefrac.serve.routes.predict import display_size  # noqa: E402
from bonefrac.serve.settings import Settings  # noqa: E402
from bonefrac.serve.synthetic import SyntheticPredictor  # noqa: E402

SAMPLE = sorted((Path(__file__).parents[1] / "data" / "sample" / "images").glob("*.webp"))[0]
MALFORMED = {"content": b"\xff" * 100, "headers": {"content-type": "multipart/form-data; boundary=x"}}


def app(**settings):
    base = dict(preprocess_workers=0, warmup=False, max_request_mb=1)
    return create_app(Settings(**{**base, **settings}), predictor=SyntheticPredictor(0, 0, 64))


def metric(text: str, line_start: str) -> int:
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_a_client_without_the_key_is_refused_before_its_upload_is_parsed():
    with TestClient(app(api_key="k", rate_limit=0)) as c:
        resp = c.post("/v1/predict", **MALFORMED)  # a body that would be a 400 if it were parsed
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        keyed = c.post("/v1/predict", content=MALFORMED["content"],
                       headers={**MALFORMED["headers"], "X-API-Key": "k"})
        assert keyed.status_code == 400  # with the key the body is read, and refused for what it is
        ok = c.post("/v1/predict", files=[("files", ("a.webp", SAMPLE.read_bytes()))],
                    headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.json()["results"][0]["status"] in ("ok", "not_xray")


def test_malformed_uploads_count_against_the_rate_limit():
    with TestClient(app(rate_limit=60)) as c:  # burst of 6
        codes = [c.post("/v1/predict", **MALFORMED).status_code for _ in range(8)]
        assert codes[:6] == [400] * 6 and codes[6:] == [429, 429]
        assert c.get("/health").status_code == 200  # ops endpoints are not limited


def test_metrics_count_oversized_bodies_and_internal_errors():
    class Broken(SyntheticPredictor):
        def predict_arrays(self, images):
            raise RuntimeError("a bug in the model code")

    settings = Settings(preprocess_workers=0, warmup=False, max_request_mb=1, rate_limit=0)
    with TestClient(create_app(settings, predictor=Broken(0, 0, 64)), raise_server_exceptions=False) as c:
        big = c.post("/v1/predict", content=b"x", headers={"content-length": str(5 << 20)})
        assert big.status_code == 413 and big.headers["x-content-type-options"] == "nosniff"
        broken = c.post("/v1/predict", files=[("files", ("a.webp", SAMPLE.read_bytes()))])
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal"
        assert broken.headers["x-content-type-options"] == "nosniff"
        text = c.get("/metrics").text
    assert metric(text, 'bonefrac_requests_total{route="unmatched",status="413"}') == 1
    assert metric(text, 'bonefrac_errors_total{code="request_too_large"}') == 1
    assert metric(text, 'bonefrac_requests_total{route="/v1/predict",status="500"}') == 1
    assert metric(text, 'bonefrac_errors_total{code="internal"}') == 1


def test_metrics_label_served_paths_by_their_route_and_unknown_paths_as_unmatched():
    """FastAPI's router sets scope["route"] for its own APIRoutes only: /openapi.json (a Starlette route) and the
    static mounts were counted as "unmatched", together with the 404s."""
    with TestClient(app()) as c:
        for path in ("/openapi.json", "/docs", "/static/app.js"):
            assert c.get(path).status_code == 200
        assert c.get("/static/no-such-file.js").status_code == 404  # the mount answered: its label, not the path
        assert c.get("/no/such/page").status_code == 404
        text = c.get("/metrics").text
    assert metric(text, 'bonefrac_requests_total{route="/openapi.json",status="200"}') == 1
    assert metric(text, 'bonefrac_requests_total{route="/docs",status="200"}') == 1
    assert metric(text, 'bonefrac_requests_total{route="/static",status="200"}') == 1
    assert metric(text, 'bonefrac_requests_total{route="/static",status="404"}') == 1
    assert metric(text, 'bonefrac_requests_total{route="unmatched",status="404"}') == 1
    assert metric(text, 'bonefrac_requests_total{route="unmatched",status="200"}') == 0
    assert "no-such" not in text  # requested paths never become labels


def test_every_response_has_nosniff_once():
    with TestClient(app()) as c:
        for resp in (c.get("/health"), c.get("/metrics"), c.get("/nowhere"), c.get("/v1/audit")):
            assert resp.headers.get_list("x-content-type-options") == ["nosniff"]


def test_audit_log_removed_while_serving_is_recreated(tmp_path):
    db = tmp_path / "audit.sqlite"
    file = ("a.webp", SAMPLE.read_bytes())
    with TestClient(app(audit_db=str(db), rate_limit=0, api_key="k"), headers={"X-API-Key": "k"}) as c:
        assert c.post("/v1/predict", files=[("files", file)]).status_code == 200
        for f in tmp_path.glob("audit.sqlite*"):  # rotated away by an administrator
            f.unlink()
        assert c.get("/v1/audit").json()["rows"] == []
        assert c.post("/v1/predict", files=[("files", file)]).status_code == 200
        assert len(c.get("/v1/audit").json()["rows"]) == 1


def test_an_unreadable_audit_log_is_503_not_500(tmp_path):
    db = tmp_path / "audit.sqlite"
    with TestClient(app(audit_db=str(db), rate_limit=0, api_key="k"), headers={"X-API-Key": "k"},
                    raise_server_exceptions=False) as c:
        db.write_bytes(b"this is not a database" * 100)  # overwritten while serving
        for f in tmp_path.glob("audit.sqlite-*"):
            f.unlink()
        resp = c.get("/v1/audit")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "audit_unavailable"


def test_image_metadata_stays_out_of_debug_logs(caplog):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(
        buf, format="TIFF", tiffinfo={270: "Patient DOE^JOHN 1970-01-01"})  # 270: ImageDescription
    with TestClient(app(rate_limit=0)) as c, caplog.at_level(logging.DEBUG):
        logging.getLogger().setLevel(logging.DEBUG)  # what `bonefrac -v serve` does
        assert c.post("/v1/predict", files=[("files", ("a.tif", buf.getvalue()))]).status_code == 200
    assert "DOE^JOHN" not in caplog.text


def test_explain_overlay_is_display_sized():
    big = np.zeros((5000, 3000), np.uint8)
    small = display_size(big, 2048)
    assert small.shape == (2048, 1229)
    same = np.zeros((100, 80), np.uint8)
    assert display_size(same, 2048) is same
