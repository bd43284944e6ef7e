"""Service guards act before a request body is read, every response is counted, the audit log recovers, and the
image readers' debug output (metadata that can name a patient) stays out of the logs."""

import asyncio
import hashlib
import io
import logging
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bonefrac.serve.app import create_app  # noqa: E402
from bonefrac.serve.audit import AuditLog, AuditUnavailable  # noqa: E402
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


# --- the audit log: its own thread, one timeout per write, WAL after a rotation, explain audited --------------

ROW = {"sha256": "0" * 64, "status": "ok", "prediction": "fracture", "probabilities": {"fracture": 0.9}, "refer": False}


def test_audit_writes_and_reads_run_on_the_audit_log_s_own_thread(tmp_path, monkeypatch):
    """Not the default thread pool, which decodes uploads: a locked log stalled unrelated requests there."""
    names, record, recent = [], AuditLog.record, AuditLog.recent

    def spy(real):
        def call(self, *args, **kwargs):
            names.append(threading.current_thread().name)
            return real(self, *args, **kwargs)
        return call

    monkeypatch.setattr(AuditLog, "record", spy(record))
    monkeypatch.setattr(AuditLog, "recent", spy(recent))
    with TestClient(app(audit_db=str(tmp_path / "a.sqlite"), rate_limit=0, api_key="k"),
                    headers={"X-API-Key": "k"}) as c:
        assert c.post("/v1/predict", files=[("files", ("a.webp", SAMPLE.read_bytes()))]).status_code == 200
        assert len(c.get("/v1/audit").json()["rows"]) == 1
        audit = c.app.state.audit
    assert len(names) == 2 and all(n.startswith("bonefrac-audit") for n in names), names
    assert audit._executor is None  # ended at shutdown


def test_waiting_for_another_audit_write_counts_against_the_timeout(tmp_path):
    audit, outcome = AuditLog(tmp_path / "a.sqlite", timeout=0.2), []

    def write():
        try:
            audit.record("v", [ROW])
            outcome.append("written")
        except AuditUnavailable:
            outcome.append("unavailable")

    writer = threading.Thread(target=write, daemon=True)
    with audit._lock:  # another write of this process, stuck
        writer.start()
        writer.join(10)
    writer.join(10)
    assert outcome == ["unavailable"]


def test_audit_writes_queued_behind_a_locked_log_give_up_within_one_timeout(tmp_path):
    """Ten writes while another process holds the lock: each gives up `timeout` after it was asked for (0.4 s in
    all), not one timeout after another (4 s)."""
    db = tmp_path / "a.sqlite"
    audit = AuditLog(db, timeout=0.4)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def main():
        start = time.monotonic()
        outs = await asyncio.gather(*[audit.write("v", [ROW]) for _ in range(10)], return_exceptions=True)
        return outs, time.monotonic() - start

    try:
        outs, took = asyncio.run(main())
    finally:
        other.execute("ROLLBACK")
        other.close()
        audit.close()
    assert all(isinstance(o, AuditUnavailable) for o in outs), outs
    assert took < 2.0, took


def test_an_audit_log_removed_while_serving_comes_back_in_wal_mode(tmp_path):
    db = tmp_path / "audit.sqlite"
    audit = AuditLog(db)
    for f in tmp_path.glob("audit.sqlite*"):  # rotated away
        f.unlink()
    audit.record("v", [ROW])
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # readers do not block writes again
        assert con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1


def test_explain_is_audited_like_predict_and_withheld_when_it_cannot_be(tmp_path, monkeypatch):
    import bonefrac.serve.routes.predict as routes

    def explain_arrays(predictor, images, at_image_size=True):
        probs = predictor.predict_arrays(images)
        return np.zeros((1, 4, 4), np.float32), probs.argmax(1), probs

    monkeypatch.setattr(routes, "_explainer", lambda p: (explain_arrays, lambda img, cam: np.stack([img] * 3, -1)))
    buf = io.BytesIO()
    Image.fromarray(np.full((80, 60), 100, np.uint8)).save(buf, format="PNG")  # flat: the same p at any size
    files = [("files", ("a.png", buf.getvalue()))]
    db = tmp_path / "audit.sqlite"
    with TestClient(app(audit_db=str(db), rate_limit=0, api_key="k", xray_check=False),
                    headers={"X-API-Key": "k"}) as c:
        explained = c.post("/v1/explain", files=files)
        assert explained.status_code == 200
        assert c.post("/v1/predict", files=files).status_code == 200
        by_predict, by_explain = c.get("/v1/audit").json()["rows"]  # newest first
        c.app.state.audit.timeout = 0.2
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        withheld = c.post("/v1/explain", files=files)
        other.execute("ROLLBACK")
        other.close()
    assert by_explain["image_sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()
    assert by_explain["prediction"] == explained.headers["x-prediction"] and by_explain["threshold"] == 0.5
    probability = by_explain["probabilities"][explained.headers["x-explained-class"]]
    assert abs(probability - float(explained.headers["x-explained-probability"])) < 1e-5
    assert {k: v for k, v in by_explain.items() if k not in ("id", "time", "route")} == \
        {k: v for k, v in by_predict.items() if k not in ("id", "time", "route")}
    # the web page sends one upload to both routes: its two rows say which answered
    assert (by_explain["route"], by_predict["route"]) == ("explain", "predict")
    assert withheld.status_code == 503 and withheld.json()["error"]["code"] == "audit_unavailable"
    assert "x-prediction" not in withheld.headers
