"""End to end on the embedded sample: prepare -> train -> evaluate -> predict, resume, and bad input."""

import contextlib
import csv
import io
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonefrac import checkpoint
from bonefrac.cli import main
from bonefrac.cliargs import parse_args
from bonefrac.manifest import load_manifest
from bonefrac.models import FlippedDgradConv2d
from conftest import interrupt_second_epoch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FAST = ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "train.epochs=2", "--set", "data.size=128",
        "--set", "train.watchdog_s=0"]


@pytest.fixture(scope="module")
def manifest(sample_manifest):
    return sample_manifest


@pytest.fixture(scope="module")
def run(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--manifest", str(manifest), "--out", str(out), *FAST]) == 0
    return out


def test_train_writes_self_describing_checkpoints(run, manifest):
    for name in ("best", "last"):
        assert (run / name / "model.safetensors").is_file()
    meta = checkpoint.read_meta(run / "best")
    assert meta["class_names"] == ["no_fracture", "fracture"]
    assert meta["positive_class"] == "fracture"
    assert meta["preprocess"]["size"] == 128 and len(meta["preprocess"]["mean"]) == 3
    assert meta["config"]["train"]["epochs"] == 2
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["temperature"] > 0
    assert set(meta["operating_points"]) == {"default", "screening", "high_sensitivity", "high_specificity"}
    assert meta["manifest_sha256"] and meta["code_version"]
    rows = pd.read_csv(run / "metrics.csv")
    assert list(rows.epoch) == [1, 2] and {"train_loss", "val_loss", "val_auroc", "lr"} <= set(rows.columns)
    assert any((run / "tb").iterdir())


def test_evaluate_reports_on_test_only(run, manifest, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(run / "best"), "--manifest", str(manifest), "--out", str(out),
                 "--bootstrap", "200"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    test_rows = load_manifest(manifest).query("split == 'test'")
    assert m["n"] == len(test_rows)
    for key in ("accuracy", "balanced_accuracy", "auroc", "per_class", "macro_avg", "weighted_avg",
                "confusion_matrix", "sensitivity", "specificity", "ci"):
        assert key in m, key
    assert np.array(m["confusion_matrix"]).sum() == len(test_rows)
    preds = pd.read_csv(out / "predictions.csv")
    assert set(preds.path) == set(test_rows.path) and preds.loss.is_monotonic_decreasing
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64" in (out / "report.html").read_text()


def test_predict_reports_bad_files_and_keeps_going(run, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for src in sorted((SAMPLE / "images").glob("*.webp"))[:3]:
        shutil.copy(src, images / src.name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(images / "blank.png")  # readable, not an X-ray
    assert main(["predict", "--model", str(run / "best"), str(images), str(tmp_path / "missing.jpg")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and [Path(r["path"]).name for r in rows][-1] == "missing.jpg"  # input order
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == {"broken.png", "missing.jpg"}
    assert all(r["refer"] is True for r in rows if r["status"] == "error")  # was absent: filters on refer missed them
    refused = [r for r in rows if r["status"] == "not_xray"]
    assert [Path(r["path"]).name for r in refused] == ["blank.png"] and "not an X-ray" in refused[0]["message"]
    assert "prediction" not in refused[0] and refused[0]["refer"] is True
    good = [r for r in rows if r["status"] == "ok"]
    assert len(good) == 3
    for r in good:
        assert r["prediction"] in ("no_fracture", "fracture") and isinstance(r["refer"], bool)
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert r["confidence"] == r["probabilities"][r["prediction"]]  # the threshold decides, not the argmax
    assert main(["predict", "--model", str(run / "best"), "--format", "csv", str(images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,status,prediction,confidence,refer,p_no_fracture,p_fracture") and len(lines) == 6
    assert main(["predict", "--model", str(run / "best"), "--no-xray-check", str(images / "blank.png")]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


def test_predict_fails_when_nothing_could_be_predicted(run, tmp_path, capsys, caplog):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["predict", "--model", str(run / "best"), str(tmp_path / "broken.png")]) == 2
    assert "no prediction made" in caplog.text and "Traceback" not in caplog.text
    for argv in (["--batch-size", "0"], ["--device", "gpu"]):
        with pytest.raises(SystemExit) if argv[0] == "--batch-size" else contextlib.nullcontext():
            code = main(["predict", "--model", str(run / "best"), *argv, str(SAMPLE / "images")])
            assert code == 2 and "unknown device 'gpu'" in caplog.text


def test_predict_at_a_saved_operating_point(run, capsys, caplog):
    meta = checkpoint.read_meta(run / "best")
    points, files = meta["operating_points"], [str(p) for p in sorted((SAMPLE / "images").glob("*.webp"))[:24]]
    assert points["high_sensitivity"] != meta["threshold"]  # else the flag could be ignored unnoticed
    caplog.set_level(logging.INFO, logger="bonefrac")

    def predict(*flags):
        assert main(["predict", "--model", str(run / "best"), "--no-xray-check", *flags, *files]) == 0
        return capsys.readouterr().out

    default = [json.loads(line) for line in predict().splitlines()]
    chosen = [json.loads(line) for line in predict("--operating-point", "high_sensitivity").splitlines()]
    assert {r["threshold"] for r in default} == {meta["threshold"]}
    assert {r["threshold"] for r in chosen} == {points["high_sensitivity"]}
    assert "operating point 'high_sensitivity'" in caplog.text
    for rows, t in ((default, meta["threshold"]), (chosen, points["high_sensitivity"])):
        for r in rows:  # the threshold in the row is the one that decided (rows round probabilities to 1e-6)
            p = r["probabilities"]["fracture"]
            assert abs(p - t) < 1e-6 or (r["prediction"] == "fracture") == (p >= t), (r, t)
    positives = [sum(r["prediction"] == "fracture" for r in rows) for rows in (default, chosen)]
    if points["high_sensitivity"] <= meta["threshold"]:  # the usual case: the 0.95-sensitivity point lies lower
        assert positives[1] >= positives[0]
    csv_rows = list(csv.reader(io.StringIO(predict("--operating-point", "screening", "--format", "csv"))))
    assert csv_rows[0][-2:] == ["threshold", "message"] and len(csv_rows) == len(files) + 1
    assert {float(row[-2]) for row in csv_rows[1:]} == {points["screening"]}
    assert predict("--operating-point", "default") == predict()  # "default" is the model's own threshold


def test_predict_reads_the_operating_point_from_the_environment_like_serve(run, capsys, monkeypatch, caplog):
    image = str(sorted((SAMPLE / "images").glob("*.webp"))[0])
    meta = checkpoint.read_meta(run / "best")
    monkeypatch.setenv("BONEFRAC_OPERATING_POINT", "high_sensitivity")
    caplog.set_level(logging.INFO, logger="bonefrac")
    assert main(["predict", "--model", str(run / "best"), "--no-xray-check", image]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == meta["operating_points"]["high_sensitivity"]
    assert "from BONEFRAC_OPERATING_POINT" in caplog.text  # was silently ignored
    assert main(["predict", "--model", str(run / "best"), "--no-xray-check", "--operating-point", "default",
                 image]) == 0  # the flag still wins
    assert json.loads(capsys.readouterr().out)["threshold"] == meta["threshold"]
    best = str(run / "best")  # an unfitted average has no saved points: the variable is set for serve, not this
    assert main(["predict", "--model", best, "--model", best, "--no-xray-check", image]) == 0
    assert "BONEFRAC_OPERATING_POINT=high_sensitivity ignored" in caplog.text


def test_explain_decides_at_the_operating_point_predict_uses(run, tmp_path, capsys, monkeypatch):
    files = [str(p) for p in sorted((SAMPLE / "images").glob("*.webp"))[:24]]

    def predicted(*flags):
        assert main(["predict", "--model", str(run / "best"), "--no-xray-check", *flags, *files]) == 0
        return [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]

    def explained(out, *flags):
        assert main(["explain", str(run / "best"), *files, "--out", str(tmp_path / out), *flags]) == 0
        return list(pd.read_csv(tmp_path / out / "explain.csv").explained_class)

    point = "high_sensitivity"
    assert predicted("--operating-point", point) != predicted()  # else this test could not tell the points apart
    assert explained("flag", "--operating-point", point) == predicted("--operating-point", point)
    assert explained("tta", "--tta", "--operating-point", point) == predicted("--tta", "--operating-point", point)
    monkeypatch.setenv("BONEFRAC_OPERATING_POINT", point)  # read as predict and serve read it
    assert explained("env") == predicted()


def test_explain_refuses_what_predict_refuses(run, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(sorted((SAMPLE / "images").glob("*.webp"))[0], images / "xray.webp")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(images / "blank.png")  # readable, not an X-ray

    def explain(out, *flags):
        assert main(["explain", str(run / "best"), str(images), "--out", str(tmp_path / out), *flags]) == 0
        rows = pd.read_csv(tmp_path / out / "explain.csv", keep_default_na=False)
        return {Path(r.path).name: r for r in rows.itertuples()}

    rows = explain("checked")
    assert rows["blank.png"].error.startswith("not an X-ray") and not rows["blank.png"].heatmap  # was explained
    assert rows["broken.png"].error and rows["xray.webp"].heatmap and not rows["xray.webp"].error
    assert sorted(p.name for p in (tmp_path / "checked").glob("*.png")) == [rows["xray.webp"].heatmap]
    assert explain("unchecked", "--no-xray-check")["blank.png"].heatmap  # as `predict --no-xray-check`


def test_predict_on_a_folder_without_images_says_so(run, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(run / "best"), str(tmp_path / "empty")]) == 2
    assert f"no image files found in {tmp_path / 'empty'}" in caplog.text


def test_predict_csv_spells_booleans_as_the_json_lines_do(capsys):
    from bonefrac.backends import csv_writer

    write = csv_writer(["no_fracture", "fracture"])
    rows = [{"path": "a.png", "status": "ok", "prediction": "fracture", "confidence": 0.9, "refer": False,
             "probabilities": {"no_fracture": 0.1, "fracture": 0.9}, "threshold": 0.5},
            {"path": "b.png", "status": "not_xray", "refer": True, "message": "not an X-ray: blank"},
            {"path": "c.png", "status": "error", "error": "unreadable"}]
    for row in rows:
        write(row)
    written = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["refer"] for r in written] == ["false", "true", ""]  # was False, True: Python's spelling
    assert [json.loads(r["refer"]) for r in written[:2]] == [False, True]


def test_predict_at_an_unknown_operating_point_lists_the_saved_ones(run, caplog):
    image = str(sorted((SAMPLE / "images").glob("*.webp"))[0])
    assert main(["predict", "--model", str(run / "best"), "--operating-point", "screenig", image]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no operating point 'screenig'" in errors[0] and "Traceback" not in caplog.text
    assert all(f"{name} (" in errors[0] for name in checkpoint.read_meta(run / "best")["operating_points"])
    caplog.clear()
    # Several checkpoints average with equal weights: no saved point belongs to that mix.
    best = str(run / "best")
    assert main(["predict", "--model", best, "--model", best, "--operating-point", "screening", image]) == 2
    assert "bonefrac ensemble" in caplog.text


def test_predict_with_an_exported_file_as_default_model_says_what_is_needed(tmp_path, monkeypatch, caplog):
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    monkeypatch.setenv("BONEFRAC_MODEL", str(tmp_path / "m.onnx"))
    assert main(["predict", str(SAMPLE / "images")]) == 2
    assert "checkpoint or ensemble directory" in caplog.text


def test_flip_depthwise_grad_switch_reaches_the_model(manifest, tmp_path, caplog):
    """Wiring only: the gradients themselves are checked against cuDNN's/autograd's in test_models (Adam turns
    rounding-level gradient differences into lr-sized weight differences, so whole runs are not compared)."""
    out = tmp_path / "flipped"
    with caplog.at_level("INFO"):
        assert main(["train", "--manifest", str(manifest), "--out", str(out), *FAST,
                     "--set", "train.flip_depthwise_grad=true", "--set", "train.epochs=1"]) == 0
    assert re.search(r"flipped-filter input gradient for [1-9]\d* depthwise", caplog.text)
    model, meta = checkpoint.load(out / "last")  # saved and loaded as a plain timm model
    assert not any(isinstance(m, FlippedDgradConv2d) for m in model.modules())
    assert meta["config"]["train"]["flip_depthwise_grad"] is True
    assert np.isfinite(pd.read_csv(out / "metrics.csv").train_loss).all()


def test_resume_continues_to_the_same_result(manifest, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(["train", "--manifest", str(manifest), "--out", str(straight), *FAST]) == 0

    killed = tmp_path / "killed"
    undo = interrupt_second_epoch(monkeypatch)
    assert main(["train", "--manifest", str(manifest), "--out", str(killed), *FAST]) == 130
    assert checkpoint.read_meta(killed / "last")["epoch"] == 1
    undo()
    assert main(["train", "--manifest", str(manifest), "--out", str(killed), *FAST]) == 2  # refuses to overwrite
    assert main(["train", "--manifest", str(manifest), "--out", str(killed), "--resume", *FAST]) == 0
    a, _ = checkpoint.load(straight / "last")
    b, _ = checkpoint.load(killed / "last")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert np.allclose(x.numpy(), y.numpy(), atol=1e-6), name
    assert list(pd.read_csv(killed / "metrics.csv").epoch) == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["prepare", "/no/such/folder", "--out", "OUT"], "no/such/folder"),
    (["train", "--manifest", "/no/such/manifest.csv", "--out", "OUT"], "manifest"),
    (["evaluate", "/no/such/ckpt", "--manifest", "M", "--out", "OUT"], "no such checkpoint"),
    (["train", "--manifest", "M", "--out", "OUT", "--set", "train.nope=1"], "nope"),
])
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys, caplog):
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("M", str(tmp_path / "m.csv")) if a in ("OUT", "M")
            else a for a in argv]
    assert main(argv) == 2
    text = caplog.text + capsys.readouterr().err
    assert message in text and "Traceback" not in text


def test_predict_without_a_model_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BONEFRAC_MODEL", str(tmp_path / "nothing"))
    assert main(["predict", str(SAMPLE / "images")]) == 2
    assert "--model" in caplog.text


def test_shipped_model_is_the_default_and_holds_up_on_the_held_out_sample(capsys, monkeypatch):
    from bonefrac.metrics import classification_metrics
    from bonefrac.predict import DEFAULT_MODEL_NAME

    shipped = ROOT / "models" / DEFAULT_MODEL_NAME
    if not (shipped / "bonefrac.json").is_file():
        pytest.skip("no shipped model in this checkout")
    monkeypatch.delenv("BONEFRAC_MODEL", raising=False)
    assert main(["predict", str(SAMPLE / "images")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    labels = pd.read_csv(SAMPLE / "labels.csv")
    truth = dict(zip(labels.image.map(lambda p: Path(p).name), labels.fractured))
    assert len(rows) == 100 and not any("error" in r for r in rows)
    y = np.array([truth[Path(r["path"]).name] for r in rows])
    probs = np.array([[r["probabilities"]["no_fracture"], r["probabilities"]["fracture"]] for r in rows])
    # The sample lies in the shipped model's test split (data/sample/README.md): these are held-out images.
    # Its FracAtlas test AUROC is 0.94 (MODEL_CARD.md); a broken file or preprocessing change falls far below.
    assert classification_metrics(y, probs, ["no_fracture", "fracture"], 1)["auroc"] > 0.85


def test_external_test_set_gets_a_domain_shift_summary(run, manifest, tmp_path):
    external = tmp_path / "external"
    # An "external" set: the sample prepared with --split-all test (every image becomes a test image).
    assert main(["prepare", "--labels", str(SAMPLE / "labels.csv"), "--label-col", "fractured",
                 "--class-names", "no_fracture,fracture", "--out", str(external), "--split-all", "test",
                 "--workers", "1"]) == 0
    ext = load_manifest(external / "manifest.csv")
    assert len(ext) == 100 and set(ext.split) == {"test"}
    internal = tmp_path / "internal"
    assert main(["evaluate", str(run / "best"), "--manifest", str(manifest), "--out", str(internal),
                 "--bootstrap", "0"]) == 0
    out = tmp_path / "ext_eval"
    assert main(["evaluate", str(run / "best"), "--manifest", str(external / "manifest.csv"), "--out", str(out),
                 "--bootstrap", "0", "--reference", str(internal / "metrics.json")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ref = json.loads((internal / "metrics.json").read_text())
    shift = m["domain_shift"]
    assert shift["metric_diff"]["auroc"] == pytest.approx(m["auroc"] - ref["auroc"])
    assert shift["scores_a"]["n"] == ref["n"] and shift["scores_b"]["n"] == 100
    assert 0.0 <= shift["ks_statistic"] <= 1.0
    assert (out / "score_shift.png").read_bytes()[:4] == b"\x89PNG"


def test_non_finite_model_output_stops_evaluate_with_a_clear_error(run, manifest, tmp_path, monkeypatch, caplog):
    import bonefrac.evaluate as evaluate_mod

    def broken(predictor, rows, cache_dir):
        probs = np.full((len(rows), 2), 0.5)
        probs[3] = np.nan
        return probs

    monkeypatch.setattr(evaluate_mod, "predict_manifest", broken)
    assert main(["evaluate", str(run / "best"), "--manifest", str(manifest), "--out", str(tmp_path / "e"),
                 "--bootstrap", "0"]) == 2
    assert "non-finite probabilities (NaN/inf) for 1 image(s)" in caplog.text and "Traceback" not in caplog.text


def test_file_names_that_are_not_utf8_are_written_escaped(run, tmp_path, capsys):
    import os

    src = sorted((Path(__file__).resolve().parents[1] / "data" / "sample" / "images").glob("*.webp"))[0]
    odd = tmp_path / os.fsdecode(b"caf\xe9, \"x\".webp")  # a Latin-1 name, with a comma and quotes
    shutil.copy(src, odd)
    assert main(["predict", "--model", str(run / "best"), str(odd), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["path"].endswith('caf\\xe9, "x".webp') and rows[0]["status"] == "ok"
    rows = main(["explain", str(run / "best"), str(odd), "--out", str(tmp_path / "cam")])
    assert rows == 0
    written = pd.read_csv(tmp_path / "cam" / "explain.csv")
    assert written.path[0].endswith('caf\\xe9, "x".webp') and written.heatmap[0].endswith(".png")


def test_image_and_checkpoint_names_may_follow_options(run, tmp_path, capsys):
    # argparse fills a list positional once: `explain CKPT --out DIR a b` used to stop at "unrecognized arguments"
    imgs = sorted(str(p) for p in (SAMPLE / "images").glob("*.webp"))[:3]
    assert main(["explain", str(run / "best"), imgs[0], "--out", str(tmp_path / "cam"), *imgs[1:]]) == 0
    assert len(pd.read_csv(tmp_path / "cam" / "explain.csv")) == 3
    assert main(["predict", imgs[0], "--model", str(run / "best"), *imgs[1:], "--format", "csv"]) == 0
    assert capsys.readouterr().out.count(".webp") == 3
    args = parse_args(["evaluate", "a", "--manifest", "m.csv", "b", "--out", "o"])
    assert args.model == ["a", "b"] and args.out == "o"
    for argv in (["explain", "ck", "--out", "o", "a.png", "--bogus"], ["--tta", "predict", "a.png", "b.png"]):
        with pytest.raises(SystemExit):  # unknown options are still refused, before the command too
            parse_args(argv)


def test_evaluate_uses_the_default_model_when_none_is_named(run, manifest, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BONEFRAC_MODEL", str(run / "best"))
    assert main(["evaluate", "--manifest", str(manifest), "--out", str(tmp_path / "ev"), "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["models"] == [str(run / "best")]
    caplog.clear()  # evaluating the split the model was chosen on is asked for: no hint of a redrawn split
    assert main(["evaluate", "--manifest", str(manifest), "--split", "val", "--out", str(tmp_path / "v"),
                 "--bootstrap", "0"]) == 0
    assert "chosen on its own val split" in caplog.text and "drawn again" not in caplog.text


def test_a_model_file_instead_of_a_checkpoint_folder_is_named_as_such(tmp_path, caplog):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    img = str(sorted((SAMPLE / "images").glob("*.webp"))[0])
    assert main(["predict", "--model", str(onnx), img]) == 2
    assert "model.onnx is a file" in caplog.text and "bonefrac serve" in caplog.text


def test_explain_fails_like_predict_when_nothing_could_be_explained(run, tmp_path, caplog):
    """It exited 0 with only "explained 0 of 2 images"; the reasons were in explain.csv alone."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(bad / "notes.png")  # readable, not an X-ray
    out = tmp_path / "o"
    assert main(["explain", str(run / "best"), str(bad / "zero.png"), str(bad / "notes.png"), "--out", str(out)]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("zero.png" in w and "no heatmap" in w for w in warnings), warnings
    assert any("notes.png" in w and "not an X-ray" in w for w in warnings), warnings
    assert "2 of 2 inputs got no explanation: 1 unreadable, 1 not an X-ray" in caplog.text
    assert "no explanation made for any of the 2 input(s)" in caplog.text and "Traceback" not in caplog.text
    assert len(pd.read_csv(out / "explain.csv")) == 2  # the reasons are still written there
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(run / "best"), str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert f"no image files found in {tmp_path / 'empty'}" in caplog.text


def test_every_subcommand_the_parser_knows_has_a_command_to_run():
    from bonefrac.cli import COMMANDS
    from bonefrac.cliargs import build_parser

    assert set(COMMANDS) == set(build_parser().command_parsers)
