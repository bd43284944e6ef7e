"""The benchmark and shipping scripts' honesty checks, on the CPU with stubs where the real run needs a GPU, a
live server or minutes: explain_pointing and cpu_inference refuse images the model was trained on,
serve_robustness's over-size requests reach the size guard and a wrong answer fails the run, train_throughput's
fp32 baseline runs without TF32, infer_throughput times its baseline like every variant, ship_model keeps the
code version that trained the model."""

import importlib.util
import json
import shutil
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from bonefrac import __version__, checkpoint
from bonefrac.io import file_sha256

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHIPPED = ROOT / "models" / "fracatlas_effnet_lite"


def load(relative: str, monkeypatch):
    """A benchmark or script as a fresh module (its folder on sys.path for sibling imports such as live_server)."""
    path = ROOT / relative
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_{path.stem}_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seen_list(tmp_path, seen: dict) -> Path:
    """A folder holding only a checkpoint's seen list: what seen_by_model reads of a stub predictor's `path`."""
    folder = tmp_path / f"ckpt_{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    checkpoint.write_seen(folder, seen)
    return folder


def not_called(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran")
    return fail


# --- explain_pointing: Grad-CAM scored only on images the model never saw --------------------------------------


def pointing_inputs(tmp_path) -> tuple[Path, Path]:
    """A manifest with two fractured test images with boxes (sha256 "a..." and "b...") and their boxes file."""
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": ["/x/f1.png", "/x/f2.png", "/x/n1.png"], "label": ["fracture", "fracture", "no_fracture"],
                  "group": ["g1", "g2", "g3"], "split": ["test", "test", "test"],
                  "sha256": ["a" * 64, "b" * 64, "c" * 64], "width": 64, "height": 64}).to_csv(manifest, index=False)
    boxes = tmp_path / "boxes.csv"
    pd.DataFrame({"image": ["f1.png", "f2.png"], "x": [1.0, 2.0], "y": [1.0, 2.0], "w": [3.0, 3.0],
                  "h": [3.0, 3.0]}).to_csv(boxes, index=False)
    return manifest, boxes


def pointing_stubs(monkeypatch, module, ckpt: Path):
    predictor = SimpleNamespace(class_names=["no_fracture", "fracture"], positive_index=1, meta={}, path=ckpt)
    monkeypatch.setattr(module, "load_predictor", lambda models, device: predictor)


def test_explain_pointing_refuses_images_the_model_trained_on(tmp_path, monkeypatch, caplog):
    ep = load("benchmarks/explain_pointing.py", monkeypatch)
    manifest, boxes = pointing_inputs(tmp_path)
    pointing_stubs(monkeypatch, ep, seen_list(tmp_path, {"a" * 64: "train", "z" * 64: "val"}))
    monkeypatch.setattr(ep, "score_images", not_called("score_images"))
    argv = ["--model", "m", "--manifest", str(manifest), "--boxes", str(boxes), "--results", ""]
    assert ep.main(argv) == 2
    assert "1 of the 2 images of split test to score were in the model's training split" in caplog.text


def test_explain_pointing_scores_unseen_images_and_reports_the_check(tmp_path, monkeypatch, capsys):
    ep = load("benchmarks/explain_pointing.py", monkeypatch)
    manifest, boxes = pointing_inputs(tmp_path)
    pointing_stubs(monkeypatch, ep, seen_list(tmp_path, {"c" * 64: "train"}))  # a non-fractured image only
    scores = pd.DataFrame({"hit": [1, 0], "energy": [0.2, 0.1], "centre_hit": [0, 0], "centre_energy": [0.1, 0.1],
                           "box_share": [0.05, 0.05]})
    monkeypatch.setattr(ep, "score_images", lambda *a, **k: scores)
    argv = ["--model", "m", "--manifest", str(manifest), "--boxes", str(boxes), "--results", ""]
    assert ep.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["seen_by_model"] == {"train": 0, "val": 0, "of": 2}


@pytest.mark.parametrize("split", ["train", "all"])
def test_explain_pointing_offers_no_split_the_model_learnt(tmp_path, monkeypatch, split):
    ep = load("benchmarks/explain_pointing.py", monkeypatch)
    manifest, boxes = pointing_inputs(tmp_path)
    pointing_stubs(monkeypatch, ep, seen_list(tmp_path, {}))
    monkeypatch.setattr(ep, "score_images", not_called("score_images"))
    with pytest.raises(SystemExit) as exc:
        ep.main(["--model", "m", "--manifest", str(manifest), "--boxes", str(boxes), "--split", split,
                 "--results", ""])
    assert exc.value.code == 2


# --- cpu_inference: the split file belongs to the model, and its AUROC images are not training images ---------


def sample_split(tmp_path) -> tuple[Path, pd.DataFrame]:
    """A data_split.csv-style file over 8 sample images (4 train, 4 val, two of each label), and its rows."""
    labels = pd.read_csv(SAMPLE / "labels.csv")
    rows = pd.concat([labels[labels.fractured == k].head(4) for k in (0, 1)])
    split = pd.DataFrame({"image": [Path(p).name for p in rows.image],
                          "label": np.where(rows.fractured == 1, "fracture", "no_fracture"),
                          "group": [f"g{i}" for i in range(len(rows))], "split": ["train", "train", "val", "val"] * 2})
    file = tmp_path / "split.csv"
    split.to_csv(file, index=False)
    return file, split


def sha_of(name: str) -> str:
    return file_sha256(SAMPLE / "images" / name)


def cpu_stubs(monkeypatch, module, ckpt: Path, argv: list[str]):
    """Stop before the exports (minutes of work): the tests are about what happens before them."""
    monkeypatch.setattr(module, "export", not_called("export"))
    monkeypatch.setattr(module.Predictor, "from_checkpoint", lambda *a, **k: SimpleNamespace(path=ckpt, meta={}))
    monkeypatch.setattr(sys, "argv", ["cpu_inference.py", *argv])


def test_cpu_inference_needs_the_split_file_of_a_model_other_than_the_shipped_one(tmp_path, monkeypatch, capsys):
    ci = load("benchmarks/cpu_inference.py", monkeypatch)
    other = seen_list(tmp_path, {})
    cpu_stubs(monkeypatch, ci, other, ["--model", str(other), "--data", str(SAMPLE)])
    with pytest.raises(SystemExit) as exc:
        ci.main()
    assert exc.value.code == 2 and "needs --split-csv" in capsys.readouterr().err
    assert ci.split_file(str(SHIPPED), None) == ci.split_file(None, None) == SHIPPED / "data_split.csv"


def test_cpu_inference_refuses_auroc_images_the_model_trained_on(tmp_path, monkeypatch, caplog):
    ci = load("benchmarks/cpu_inference.py", monkeypatch)
    split_csv, split = sample_split(tmp_path)
    val_image = split[split.split == "val"].image.iloc[0]
    ckpt = seen_list(tmp_path, {sha_of(val_image): "train"})
    cpu_stubs(monkeypatch, ci, ckpt, ["--model", str(ckpt), "--data", str(SAMPLE), "--split-csv", str(split_csv),
                                      "--n-calib", "4"])
    assert ci.main() == 2
    assert "1 of the 4 AUROC images were in the model's training split" in caplog.text


def test_cpu_inference_says_when_its_auroc_is_on_the_selection_split(tmp_path, monkeypatch):
    ci = load("benchmarks/cpu_inference.py", monkeypatch)
    _, split = sample_split(tmp_path)
    paths = {s: [SAMPLE / "images" / n for n in split[split.split == s].image] for s in ("train", "val")}
    seen = {**{sha_of(p.name): "val" for p in paths["val"]}, **{sha_of(p.name): "train" for p in paths["train"]}}
    out = ci.check_unseen(SimpleNamespace(path=seen_list(tmp_path, seen), meta={}), paths["val"], paths["train"])
    assert out["val_seen_by_model"] == {"train": 0, "val": 4, "of": 4}
    assert out["calib_seen_by_model"] == {"train": 4, "val": 0, "of": 4}  # fine for INT8 calibration
    assert "selection (val) split" in out["val_auroc_on"] and "not a held-out" in out["val_auroc_on"]


# --- serve_robustness: each bad request gets the refusal it is built for ------------------------------------------


def test_serve_robustness_corpus_gets_the_answers_it_expects_with_the_caps_it_is_sized_for(monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bonefrac.serve.app import create_app
    from bonefrac.serve.settings import Settings
    from bonefrac.serve.synthetic import SyntheticPredictor

    sr = load("benchmarks/serve_robustness.py", monkeypatch)
    settings = Settings(preprocess_workers=0, warmup=False, rate_limit=0, xray_check=False, max_request_mb=2,
                        max_files=5)
    cases = sr.corpus(sr.seeds(), settings)
    with TestClient(create_app(settings, predictor=SyntheticPredictor(0, 0, 32))) as client:
        answers = {}
        for name, kwargs, _ in cases:
            response = client.post("/v1/predict", **kwargs)
            answers[name] = (response.status_code, response.json()["error"]["code"])
    assert answers["huge multipart body"] == answers["chunked body, no length"] == (413, "request_too_large")
    assert sr.mismatches(answers, {name: want for name, _, want in cases}) == {}


def test_serve_robustness_fails_on_an_unexpected_answer_even_without_5xx(monkeypatch):
    sr = load("benchmarks/serve_robustness.py", monkeypatch)
    expected = {"huge multipart body": (413, "request_too_large"), "no boundary": (400, "bad_request")}
    answers = {"huge multipart body": (415, "unsupported_media_type"), "no boundary": (400, "bad_request")}
    problems = sr.mismatches(answers, expected)
    assert problems == {"huge multipart body": {"expected": [413, "request_too_large"],
                                                "got": [415, "unsupported_media_type"]}}
    report = {"corpus": {"huge multipart body": 415, "no boundary": 400}, "corpus_mismatches": problems,
              "fuzz_status_counts": {"422": 3}, "healthy_after": True, "predicts_after": True}
    assert sr.verdict(report) == {"n_5xx": 0, "transport_errors": 0, "passed": False}
    assert sr.verdict({**report, "corpus_mismatches": {}})["passed"]


# --- train_throughput: the fp32 baseline runs without TF32 -------------------------------------------------------


@pytest.fixture
def tf32_defaults():
    """PyTorch's default TF32 flags (matmul off, cuDNN on) for the test, the process's own after it (monkeypatch
    cannot: the matmul flag is a property of torch.backends.cuda.matmul, which it would try to delete)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


def test_train_throughput_seed_baseline_runs_with_pytorchs_defaults_and_the_flags_come_back(tmp_path, monkeypatch,
                                                                                          tf32_defaults):
    tt = load("benchmarks/train_throughput.py", monkeypatch)
    flags = {}

    def recording(name, value):
        def stub(*args, **kwargs):
            flags[name] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            return value
        return stub

    monkeypatch.setattr(tt.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tt.torch.cuda, "get_device_name", lambda *a: "stub GPU")
    monkeypatch.setattr(tt, "distributed_setup", lambda: (0, 1))
    monkeypatch.setattr(tt, "build_cache", lambda *a, **k: np.zeros((4, 8, 8), np.uint8))
    monkeypatch.setattr(tt, "matmul_tflops", lambda: 100.0)
    monkeypatch.setattr(tt, "train_flops_per_image", lambda arch, size: 1e9)
    monkeypatch.setattr(tt, "seed_style", recording("seed_style", 10.0))
    monkeypatch.setattr(tt, "bonefrac_pipeline", recording("bonefrac", 50.0))
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--images", str(tmp_path), "--archs", "stub",
                                      "--seed-steps", "1", "--steps", "1"])
    tt.main()
    # the pipeline's TF32 matmuls used to leak into the seed loop, which a stock script runs without them
    assert flags == {"seed_style": (False, True), "bonefrac": (True, True)}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)


# --- infer_throughput: the eager baseline timed like every variant ------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def cuda(self, device=None):  # a CPU stand-in for the GPU model
        return self

    def forward(self, x):
        return self.conv(x)


def test_infer_throughput_times_eager_with_every_rep_and_keeps_the_numbers_at_reps_1(monkeypatch):
    it = load("benchmarks/infer_throughput.py", monkeypatch)
    reps_seen = []
    monkeypatch.setattr(it, "create", lambda arch, n: TinyNet())
    monkeypatch.setattr(it.torch, "rand", lambda *shape, device=None: torch.zeros(*shape))
    monkeypatch.setattr(it, "timed", lambda fn, x, reps, profile_to=None: reps_seen.append(reps) or 10.0 * reps)
    monkeypatch.setattr(it, "run_variant", lambda variant, model, x, reps, *a: 20.0 * reps)
    row = it.bench_arch("stub", 8, 2, 1, ["eager", "default"])
    assert reps_seen == [1]
    assert row["eager_fp32_img_s"] == 10.0 and row["ratio_default"] == 2.0
    assert it.ratio(5.0, 0.0) is None


def test_infer_throughput_refuses_fewer_than_one_rep(monkeypatch, capsys):
    it = load("benchmarks/infer_throughput.py", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["infer_throughput.py", "--reps", "0"])
    with pytest.raises(SystemExit) as exc:
        it.main()
    assert exc.value.code == 2 and "--reps must be at least 1" in capsys.readouterr().err


# --- ship_model: the trained checkpoint's code version survives shipping ------------------------------------------


@pytest.mark.parametrize("trained", ["0.0.9+trained", None])
def test_ship_model_keeps_the_code_version_that_trained_the_model(tmp_path, monkeypatch, trained):
    sm = load("scripts/ship_model.py", monkeypatch)
    run = shutil.copytree(SHIPPED, tmp_path / "run")
    meta = json.loads((run / checkpoint.META_FILE).read_text())
    meta.pop("code_version")
    if trained:
        meta["code_version"] = trained
    (run / checkpoint.META_FILE).write_text(json.dumps(meta))
    sm.ship(str(run), str(tmp_path / "shipped"))
    shipped = json.loads((tmp_path / "shipped" / checkpoint.META_FILE).read_text())
    assert shipped["code_version"] == (trained or "unknown") and shipped["shipped_with"] == __version__
    assert shipped["format_version"] == checkpoint.FORMAT_VERSION and shipped["weights_dtype"] == "float16"
