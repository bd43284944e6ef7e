"""`bonefrac predict` and the predictors behind it: progress, devices, ensemble.json, output pipes, flags."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bonefrac.predict as predict_mod
from bonefrac import backends
from bonefrac.cli import main
from bonefrac.cliargs import parse_args
from bonefrac.errors import BonefracError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fracatlas_effnet_lite"
IMAGES = sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))


class StubPredictor:
    """The predictor interface with a fixed fracture probability: for tests of what happens around the model."""

    class_names, positive_index, threshold, meta, version = ["no_fracture", "fracture"], 1, 0.5, {}, "stub@0"

    def __init__(self, p_fracture=0.7):
        self.p = p_fracture

    def predict_arrays(self, images):
        return np.tile([1 - self.p, self.p], (len(images), 1))


@pytest.fixture
def stub(monkeypatch):
    """`bonefrac predict` answering with StubPredictor (set its .p) instead of loading a model."""
    predictor = StubPredictor()
    monkeypatch.setattr(predict_mod, "load_predictor", lambda *a, **k: predictor)
    return predictor


# --- 1. progress bar -------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_predict_files_shows_one_progress_bar_over_all_files_on_a_terminal(monkeypatch, terminal):
    bars = []
    real = predict_mod.progress_bar

    def spy(total, desc, enabled):
        bars.append((total, enabled))
        return real(total, desc, False)  # drawn nowhere: the test only needs to see what was asked for

    monkeypatch.setattr(predict_mod, "progress_bar", spy)
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    files = [str(p) for p in IMAGES[:5]]
    rows = list(predict_mod.predict_files(StubPredictor(), files, batch_size=2, xray_check=False))
    assert len(rows) == 5
    assert (5, terminal) in bars  # one bar over all 5 files, not one per batch of 2
    assert not any(enabled for total, enabled in bars if total != 5)


# --- 5. --class-names ------------------------------------------------------------------------------------


def test_prepare_strips_class_names_and_refuses_empty_ones(monkeypatch, tmp_path, caplog):
    import bonefrac.manifest as manifest_mod

    seen = {}

    def fake_prepare(out, **kwargs):
        seen.update(kwargs)
        return {"n_images": 0, "n_groups": 0}

    monkeypatch.setattr(manifest_mod, "prepare", fake_prepare)
    base = ["prepare", str(tmp_path), "--out", str(tmp_path / "m"), "--class-names"]
    assert main([*base, "no_fracture, fracture "]) == 0
    assert seen["class_names"] == ["no_fracture", "fracture"]
    assert main([*base, "a,,b"]) == 2 and "empty name" in caplog.text


# --- 6. ONNX / TorchScript devices and precision ---------------------------------------------------------


def test_onnx_providers_follow_the_device(monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert backends.onnx_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert backends.onnx_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for device in ("cuda", "cuda:0", "gpu", "cuda:x", "xla"):
        with pytest.raises(BonefracError, match=f"device '{device}'"):
            backends.onnx_providers(device)
    caplog.set_level(logging.INFO, logger="bonefrac")
    assert backends.onnx_providers("auto") == ["CPUExecutionProvider"]
    assert "running on the CPU" in caplog.text


def test_a_named_gpu_onnx_runtime_could_not_start_is_an_error():
    class CpuOnlySession:  # what ONNX Runtime leaves when the CUDA provider fails to start
        def get_providers(self):
            return ["CPUExecutionProvider"]

    asked = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(BonefracError, match="could not start CUDAExecutionProvider"):
        backends._check_gpu_started(CpuOnlySession(), asked, "cuda")
    backends._check_gpu_started(CpuOnlySession(), asked, "auto")  # "auto" may fall back


def test_torchscript_auto_uses_the_gpu_like_checkpoints(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    meta = {"arch": "x", "class_names": ["a", "b"], "preprocess": {"size": 8}}
    where = {}

    def fake_load(path, map_location=None, _extra_files=None):
        where["device"] = torch.device(map_location)
        _extra_files["bonefrac.json"] = json.dumps(meta)
        return torch.nn.Identity()

    monkeypatch.setattr(torch.jit, "load", fake_load)
    # no GPU here to run the load-time check's blank image on (tested in test_export.py)
    monkeypatch.setattr(backends.TorchScriptPredictor, "_check_graph", lambda self, path: None)
    (tmp_path / "m.pt").write_bytes(b"stand-in")
    loaded = backends.load_backend(tmp_path / "m.pt", "auto")
    assert where["device"] == torch.device("cuda:0") and torch.device(loaded.device) == torch.device("cuda:0")


def test_exported_graphs_keep_float64_probabilities_so_a_score_at_the_threshold_stays_on_it():
    class Graph(backends._GraphPredictor):
        def __init__(self):  # no file: only the batching, temperature and softmax are under test
            self.size, self.batch_size, self.class_names, self.temperature = 16, 4, ["no", "yes"], 1.0

        def _logits(self, x):
            return np.tile(np.float32([0.0, -2.5566]), (len(x), 1))

    probs = Graph().predict_arrays([np.zeros((20, 20), np.uint8)] * 3)
    expected = predict_mod._softmax(np.array([[0.0, np.float32(-2.5566)]]))[0, 1]
    assert probs.dtype == np.float64 and probs[0, 1] == expected
    assert (predict_mod.decide(probs, 1, expected) == 1).all()  # float32 would put it just below the threshold


# --- 7. BONEFRAC_OPERATING_POINT with an unfitted average --------------------------------------------------


def test_an_ignored_environment_operating_point_is_a_warning_naming_the_threshold_used(monkeypatch, caplog, capsys):
    monkeypatch.setenv("BONEFRAC_OPERATING_POINT", "screening")
    threshold = json.loads((MODEL / "bonefrac.json").read_text())["threshold"]
    assert main(["predict", "--model", str(MODEL), "--model", str(MODEL), "--no-xray-check", str(IMAGES[0])]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == threshold
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("BONEFRAC_OPERATING_POINT=screening ignored" in m and f"{threshold:.4g}" in m for m in warned), warned


# --- 8. device names ---------------------------------------------------------------------------------------


def test_devices_this_machine_cannot_use_fail_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert predict_mod.resolve_device("cuda:1") == torch.device("cuda:1")
    assert predict_mod.resolve_device("cpu") == torch.device("cpu")
    for name, why in (("cuda:7", "2 CUDA device"), ("mps", "MPS"), ("xla", "unknown device"),
                      ("meta", "unknown device"), ("cuda:-1", "unknown device"), ("cuda:", "unknown device"),
                      ("auto:", "unknown device")):
        with pytest.raises(BonefracError, match=why):
            predict_mod.resolve_device(name)


def test_local_rank_is_read_only_for_a_gpu_and_must_be_a_number(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert predict_mod.resolve_device("auto") == torch.device("cpu")  # not needed without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BonefracError, match="LOCAL_RANK"):
        predict_mod.resolve_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert predict_mod.resolve_device("auto") == torch.device("cuda:1")


# --- 9. ensemble.json ----------------------------------------------------------------------------------------


def _ensemble(tmp_path, **spec) -> Path:
    folder = tmp_path / "ens"
    folder.mkdir(exist_ok=True)
    spec = {"format": "bonefrac-ensemble", "members": [str(MODEL), str(MODEL)],
            "class_names": ["no_fracture", "fracture"], **spec}
    (folder / "ensemble.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("spec, why", [
    ({"members": []}, "'members'"),
    ({"members": "m"}, "'members'"),
    ({"weights": [0.3]}, "'weights'"),
    ({"weights": [0.5, float("nan")]}, "'weights'"),
    ({"weights": [-0.5, 1.5]}, "'weights'"),
    ({"weights": [0, 0]}, "'weights'"),
    ({"threshold": 1.7}, "'threshold'"),
    ({"threshold": "0.2"}, "'threshold'"),
])
def test_a_faulty_ensemble_json_is_refused_naming_the_field(tmp_path, spec, why):
    with pytest.raises(BonefracError, match=why):
        predict_mod.load_predictor([str(_ensemble(tmp_path, **spec))], "cpu")


def test_a_broken_ensemble_member_is_named_not_the_ensemble_json(tmp_path):
    member = tmp_path / "member"
    member.mkdir()
    meta = json.loads((MODEL / "bonefrac.json").read_text())
    del meta["arch"]
    (member / "bonefrac.json").write_text(json.dumps(meta))
    os.symlink(MODEL / "model.safetensors", member / "model.safetensors")
    with pytest.raises(BonefracError, match="arch") as err:
        predict_mod.load_predictor([str(_ensemble(tmp_path, members=[str(member)]))], "cpu")
    assert str(member) in str(err.value) and "ensemble description" not in str(err.value)


# --- 10. output: closed pipes, strict encodings ---------------------------------------------------------------


def test_predict_into_a_closed_pipe_exits_quietly(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -n 1` once it has its line
    try:
        done = subprocess.run([sys.executable, "-m", "bonefrac", "predict", "--model", str(MODEL), "--device", "cpu",
                               "--no-xray-check", *map(str, IMAGES[:2])], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert done.returncode == 141


def test_csv_on_an_ascii_stdout_escapes_what_it_cannot_encode(monkeypatch, stub, tmp_path):
    image = tmp_path / "Müller_é.webp"
    shutil.copy(IMAGES[0], image)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["predict", "--model", "x", "--format", "csv", "--no-xray-check", str(image)]) == 0
    out.flush()
    assert "M\\xfcller_\\xe9.webp" in out.buffer.getvalue().decode("ascii")


# --- 11. flags, help, summary --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["predict", "-v", "a.png"], ["predict", "a.png", "--verbose"],
                                  ["-v", "predict", "a.png"], ["predict", "a.png", "--device", "cpu", "-v", "b.png"]])
def test_verbose_may_follow_the_command(argv):
    args = parse_args(argv)
    assert args.verbose and args.paths[0] == "a.png"


def test_predict_help_says_what_the_arguments_take(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "recursively" in text and "DICOM" in text and "cuda:N" in text and "default 32" in text


def test_non_finite_model_output_is_not_counted_as_unreadable(stub, caplog):
    stub.p = float("nan")
    assert main(["predict", "--model", "x", "--no-xray-check", *map(str, IMAGES[:2])]) == 2
    assert "0 unreadable, 0 not an X-ray, 2 with non-finite model output" in caplog.text


def test_a_site_wide_operating_point_is_ignored_for_a_multi_class_model(tmp_path, monkeypatch, capsys, caplog):
    """BONEFRAC_OPERATING_POINT set for a site's binary models used to stop every 3-class prediction; named on the
    command line it is still refused."""
    import timm

    from bonefrac import checkpoint

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    meta = {"arch": "resnet18", "class_names": ["comminuted", "no_fracture", "simple"], "positive_index": None,
            "threshold": None, "temperature": 1.0,
            "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3}}
    ckpt = checkpoint.save(tmp_path / "three", model, meta)
    monkeypatch.setenv("BONEFRAC_OPERATING_POINT", "screening")
    args = ["predict", "--model", str(ckpt), "--device", "cpu", "--no-xray-check", str(IMAGES[0]), str(IMAGES[1])]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"] and "BONEFRAC_OPERATING_POINT=screening ignored" in caplog.text
    assert main([*args, "--operating-point", "screening"]) == 2


def test_every_command_warns_about_a_misspelt_variable(monkeypatch, caplog, capsys):
    """BONEFRAC_OPERATING_PIONT left predict at the default point without a word (only serve warned)."""
    from bonefrac.cli import main

    monkeypatch.setenv("BONEFRAC_OPERATING_PIONT", "screening")
    sample = sorted((Path(__file__).resolve().parents[1] / "data" / "sample" / "images").iterdir())[0]
    assert main(["predict", str(sample)]) == 0
    assert "BONEFRAC_OPERATING_PIONT ignored (a typo?)" in caplog.text
