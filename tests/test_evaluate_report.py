"""On a model trained for one epoch on the embedded sample: explain, calibrate, ensembles (fitted in evaluate and
as a directory) and the HTML report, rendered by headless Chromium."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonefrac import checkpoint
from bonefrac.cli import main
from bonefrac.errors import BonefracError
from bonefrac.predict import Ensemble, load_predictor

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def manifest(sample_manifest):
    return sample_manifest


@pytest.fixture(scope="module")
def ckpt(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--manifest", str(manifest), "--out", str(out), "--config", str(ROOT / "configs/demo.yaml"),
                 "--set", "train.epochs=1", "--set", "data.size=128", "--set", "train.watchdog_s=0"]) == 0
    return out / "best"


@pytest.fixture(scope="module")
def second(ckpt, tmp_path_factory):
    """A second, differently calibrated member: same weights, three times the temperature."""
    out = tmp_path_factory.mktemp("second") / "ckpt"
    shutil.copytree(ckpt, out)
    meta = checkpoint.read_meta(out)
    meta["temperature"] *= 3
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    return out


def test_explain_writes_an_overlay_per_image(ckpt, tmp_path):
    images = sorted((SAMPLE / "images").iterdir())[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "cams"
    assert main(["explain", str(ckpt), *map(str, images), str(bad), "--out", str(out), "--class", "fracture",
                 "--batch-size", "2"]) == 0
    table = pd.read_csv(out / "explain.csv", dtype=str, keep_default_na=False)
    assert len(table) == 4 and (table.error != "").sum() == 1
    good = table[table.error == ""]
    assert set(good.explained_class) == {"fracture"}
    for name, src in zip(good.heatmap, images):
        from PIL import Image
        with Image.open(out / name) as png, Image.open(src) as orig:
            assert png.mode == "RGB" and png.size == orig.size
    assert main(["explain", str(ckpt), str(images[0]), "--out", str(out), "--class", "nonsense"]) == 2


def test_calibrate_refits_the_temperature_on_val(ckpt, manifest, tmp_path):
    fitted_in_training = checkpoint.read_meta(ckpt)
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    meta = checkpoint.read_meta(copy)
    meta.update(temperature=7.0, threshold=None, operating_points=None)
    (copy / checkpoint.META_FILE).write_text(json.dumps(meta))
    assert main(["calibrate", str(copy), "--manifest", str(manifest)]) == 0
    new = checkpoint.read_meta(copy)
    # Same model, same val split: the fit made during training comes back.
    assert new["temperature"] == pytest.approx(fitted_in_training["temperature"], rel=1e-3)
    assert new["threshold"] == pytest.approx(fitted_in_training["threshold"], abs=1e-4)
    assert set(new["operating_points"]) == {"default", "screening", "high_sensitivity", "high_specificity"}
    assert new["calibrated_on"]["split"] == "val" and new["arch"] == meta["arch"]
    assert load_predictor([str(copy)], "cpu").temperature == pytest.approx(new["temperature"])


def test_ensemble_directory_round_trip(ckpt, second, manifest, tmp_path):
    out = tmp_path / "ens"
    assert main(["ensemble", str(ckpt), str(second), "--manifest", str(manifest), "--out", str(out)]) == 0
    spec = json.loads((out / "ensemble.json").read_text())
    assert len(spec["members"]) == 2 and all(not Path(m).is_absolute() for m in spec["members"])
    assert sum(spec["weights"]) == pytest.approx(1.0) and 0 <= spec["threshold"] <= 1
    assert spec["class_names"] == ["no_fracture", "fracture"]
    moved = shutil.copytree(out, tmp_path / "moved")  # members travel with the directory
    ens = load_predictor([str(moved)], "cpu")
    assert isinstance(ens, Ensemble) and ens.threshold == spec["threshold"]
    np.testing.assert_allclose(ens.weights, spec["weights"])
    assert ens.meta["operating_points"] == spec["operating_points"]
    img = np.full((80, 60), 100, np.uint8)
    assert ens.predict_arrays([img]).sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BonefracError):
        load_predictor([str(moved), str(ckpt)], "cpu")
    ev = tmp_path / "eval"
    assert main(["evaluate", str(moved), "--manifest", str(manifest), "--out", str(ev), "--bootstrap", "0"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["ensemble"]["weights"] == pytest.approx(spec["weights"]) and m["threshold"] == spec["threshold"]


def test_an_ensemble_directory_can_be_the_default_model(ckpt, second, manifest, tmp_path, monkeypatch):
    out = tmp_path / "ens"
    assert main(["ensemble", str(ckpt), str(second), "--manifest", str(manifest), "--out", str(out)]) == 0
    monkeypatch.setenv("BONEFRAC_MODEL", str(out))
    default = load_predictor(None, "cpu")
    assert isinstance(default, Ensemble) and len(default.members) == 2
    assert default.threshold == json.loads((out / "ensemble.json").read_text())["threshold"]


def test_evaluate_fits_weights_for_several_models(ckpt, second, manifest, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(ckpt), "--model", str(second), "--manifest", str(manifest), "--out", str(out),
                 "--bootstrap", "50"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    fit = m["ensemble"]
    assert len(fit["weights"]) == 2 and sum(fit["weights"]) == pytest.approx(1.0)
    assert fit["fitted_on"] and fit["val_n"] > 0 and m["threshold"] == pytest.approx(fit["threshold"])
    assert fit["val_ensemble_log_loss"] <= min(fit["val_member_log_loss"]) + 1e-6


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_chromium(ckpt, manifest, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(ckpt), "--manifest", str(manifest), "--out", str(out), "--bootstrap", "100"]) == 0
    html = (out / "report.html").read_text()
    for heading in ("Data", "95 % bootstrap intervals", "Operating points", "Curves", "Calibration",
                    "Confusion matrix", "Grad-CAM"):
        assert heading in html, heading
    assert (out / "gradcam.png").is_file() and "http://" not in html and "https://" not in html
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed but CI=true; .ci/run must install it")
        pytest.skip("chromium not installed")
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,3000",
                        (out / "report.html").as_uri()], check=False, timeout=120, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 10_000
    from PIL import Image
    with Image.open(shot) as png:
        pixels = np.asarray(png.convert("L"), dtype=float)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.02  # text and figures, not a blank page


def test_predictor_softmax_is_float64_like_the_threshold_search():
    from bonefrac.metrics import softmax
    from bonefrac.predict import _softmax

    logits = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    probs = _softmax(logits)
    assert probs.dtype == np.float64
    np.testing.assert_array_equal(probs, softmax(logits))  # a score equal to a val threshold stays equal
