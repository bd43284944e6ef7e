"""Export to ONNX (fp32/INT8) and TorchScript with parity checks, the backends, and the "not an X-ray" check."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("onnxruntime")

from bonefrac import checkpoint  # noqa: E402
from bonefrac.backends import OnnxPredictor, check_radiograph, colourfulness, load_backend  # noqa: E402
from bonefrac.cli import main  # noqa: E402
from bonefrac.errors import BonefracError  # noqa: E402
from bonefrac.export import export  # noqa: E402
from bonefrac.io import read_image  # noqa: E402
from bonefrac.models import create  # noqa: E402
from bonefrac.predict import Ensemble, Predictor, load_predictor  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
SAMPLES = sorted((SAMPLE / "images").glob("*.webp"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    meta = {"arch": "resnet10t", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
            "positive_class": "fracture", "preprocess": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                         "channels": 3},
            "threshold": 0.4, "temperature": 1.3, "operating_points": None, "manifest_sha256": "test"}
    return checkpoint.save(tmp_path_factory.mktemp("model") / "ckpt", create("resnet10t", 2).eval(), meta)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    labels = pd.read_csv(SAMPLE / "labels.csv")
    rows = pd.DataFrame({"path": [str(SAMPLE / p) for p in labels.image],
                         "label": np.where(labels.fractured == 1, "fracture", "no_fracture"),
                         "split": ["val" if i % 4 == 0 else "train" for i in range(len(labels))]})
    path = tmp_path_factory.mktemp("data") / "manifest.csv"
    rows.to_csv(path, index=False)
    return path


def test_onnx_export_matches_pytorch_and_carries_its_metadata(ckpt, manifest, tmp_path):
    out = tmp_path / "m.onnx"
    report = export(ckpt, out, manifest=manifest)
    assert report["parity"]["max_abs_prob_diff"] <= 1e-3 and report["parity"]["n_images"] == 25
    assert report["val_metric"]["name"] == "auroc" and abs(report["val_metric"]["change"]) < 1e-3
    assert report["size_bytes"] == out.stat().st_size
    onnx_pred = load_backend(out, "cpu")
    assert isinstance(onnx_pred, OnnxPredictor)
    assert (onnx_pred.class_names, onnx_pred.threshold, onnx_pred.positive_index, onnx_pred.size) == \
        (["no_fracture", "fracture"], 0.4, 1, 64)
    assert onnx_pred.meta["export"]["parity"]["tolerance"] == 1e-3  # the report travels inside the file
    images = [read_image(p) for p in SAMPLES[:5]]
    ref = Predictor.from_checkpoint(ckpt, "cpu").predict_arrays(images)
    assert np.abs(onnx_pred.predict_arrays(images) - ref).max() < 1e-3  # dynamic batch: 5
    assert np.abs(onnx_pred.predict_arrays(images[:1]) - ref[:1]).max() < 1e-3  # and 1
    assert json.loads(Path(str(out) + ".json").read_text())["export"]["variant"] == "fp32"


@pytest.fixture(scope="module")
def ensembles(ckpt, tmp_path_factory):
    """Two ensemble directories in the format `bonefrac ensemble` writes (members inside, ensemble.json naming
    them by relative path): resnet10t (64 px, 3 channels, T 1.3) with test_efficientnet (1 channel, its own
    normalisation, T 0.7) at 64 px ("same") or at 48 px ("mixed", resized inside the exported graph)."""
    import shutil

    import torch

    torch.manual_seed(1)
    model = create("test_efficientnet", 2, 1).eval()
    with torch.no_grad():  # a random net answers ~0.5 for every image; make its answers differ by image
        model.get_classifier().weight.mul_(30)
    dirs = {}
    for name, size in (("same", 64), ("mixed", 48)):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(ckpt, root / "members" / "0_resnet10t")
        meta = {"arch": "test_efficientnet", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
                "positive_class": "fracture", "threshold": 0.6, "temperature": 0.7, "operating_points": None,
                "preprocess": {"size": size, "mean": [0.4], "std": [0.3], "channels": 1}, "manifest_sha256": "t2"}
        checkpoint.save(root / "members" / "1_test_efficientnet", model, meta)
        spec = {"format": "bonefrac-ensemble", "members": ["members/0_resnet10t", "members/1_test_efficientnet"],
                "class_names": ["no_fracture", "fracture"], "positive_index": 1, "weights": [0.35, 0.65],
                "threshold": 0.45, "operating_points": {"high_sensitivity": {"threshold": 0.2}}}
        (root / "ensemble.json").write_text(json.dumps(spec))
        dirs[name] = root
    return dirs


def test_ensemble_exports_as_one_graph_matching_the_pytorch_ensemble(ensembles, manifest, tmp_path):
    ens = load_predictor([str(ensembles["same"])], "cpu")
    assert isinstance(ens, Ensemble)
    out = tmp_path / "ens.onnx"
    report = export(ensembles["same"], out, manifest=manifest)
    assert report["parity"]["max_abs_prob_diff"] <= 1e-3 and report["parity"]["n_images"] == 25
    served = load_backend(out, "cpu")
    assert isinstance(served, OnnxPredictor) and served.size == 64 and served.temperature == 1.0
    assert (served.class_names, served.positive_index, served.threshold) == (["no_fracture", "fracture"], 1, 0.45)
    assert served.meta["weights"] == [0.35, 0.65]
    assert served.meta["operating_points"] == {"high_sensitivity": {"threshold": 0.2}}
    assert [(m["arch"], m["path"], m["temperature"]) for m in served.meta["members"]] == \
        [("resnet10t", "members/0_resnet10t", 1.3), ("test_efficientnet", "members/1_test_efficientnet", 0.7)]
    images = [read_image(p) for p in SAMPLES[:6]]
    ref, got = ens.predict_arrays(images), served.predict_arrays(images)
    assert np.abs(got - ref).max() < 1e-3 and np.abs(served.predict_arrays(images[:1]) - ref[:1]).max() < 1e-3
    assert np.ptp(ref[:, 1]) > 0.02  # the parity check is not trivially met by constant outputs
    for member in ens.members:  # the exported mix is the weighted one, not a member alone
        assert np.abs(got - member.predict_arrays(images)).max() > 5e-3


def test_mixed_size_ensemble_int8_and_torchscript(ensembles, tmp_path):
    src = ensembles["mixed"]
    report = export(src, tmp_path / "q.onnx", images=SAMPLE / "images", int8=True, n_calib=8, n_parity=8)
    assert report["variant"] == "int8" and report["parity"]["argmax_agreement"] >= 0.8
    served = load_backend(tmp_path / "q.onnx", "cpu")
    assert served.size == 64 and served.meta["weights"] == [0.35, 0.65]  # input at the largest member size
    # The 48 px member is resized inside the graph from the 64 px input, the PyTorch ensemble resizes the
    # original image: a small, real difference for image-sensitive members, hence the explicit tolerance.
    report = export(src, tmp_path / "e.pt", fmt="torchscript", images=SAMPLE / "images", n_parity=8,
                    tolerance=2e-2)
    assert 0 < report["parity"]["max_abs_prob_diff"] < 2e-2
    assert load_backend(tmp_path / "e.pt").threshold == 0.45


def test_int8_and_torchscript_exports(ckpt, manifest, tmp_path):
    report = export(ckpt, tmp_path / "q.onnx", manifest=manifest, int8=True)
    assert report["variant"] == "int8" and report["parity"]["argmax_agreement"] >= 0.8
    assert "val_metric" in report and report["size_bytes"] < (tmp_path / "q.onnx").stat().st_size * 2
    assert load_backend(tmp_path / "q.onnx", "cpu").version.endswith("onnx-int8")
    report = export(ckpt, tmp_path / "m.pt", fmt="torchscript", images=SAMPLE / "images", n_parity=8)
    assert report["parity"]["max_abs_prob_diff"] < 1e-4 and "val_metric" not in report
    assert load_backend(tmp_path / "m.pt").class_names == ["no_fracture", "fracture"]


def test_export_fails_loudly(ckpt, manifest, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(BonefracError, match="parity check FAILED"):
        export(ckpt, out, manifest=manifest, tolerance=-1.0)
    assert not out.exists()
    with pytest.raises(BonefracError, match="real images"):
        export(ckpt, out)
    with pytest.raises(BonefracError, match="not both"):
        export(ckpt, out, images=SAMPLE / "images", int8=True, fp16=True)
    if _has_cli():  # the CLI turns the same problem into exit code 2 and one line, not a traceback
        assert main(["export", str(ckpt), "--out", str(out)]) == 2


def _has_cli() -> bool:
    from bonefrac.cli import build_parser

    return "export" in build_parser()._subparsers._group_actions[0].choices


def test_cli_export(ckpt, tmp_path):
    if not _has_cli():
        pytest.skip("export subcommand not wired into the CLI")
    out = tmp_path / "c.onnx"
    assert main(["export", str(ckpt), "--images", str(SAMPLE / "images"), "--out", str(out)]) == 0
    assert out.is_file()


def test_real_radiographs_pass_the_xray_check():
    failed = [p.name for p in SAMPLES if not check_radiograph(read_image(p)).ok]
    assert not failed, failed


def test_blank_noise_and_photos_are_not_xrays():
    rng = np.random.default_rng(0)
    assert not check_radiograph(np.zeros((200, 200), np.uint8)).ok
    assert not check_radiograph(np.full((200, 200), 255, np.uint8)).ok
    assert not check_radiograph(rng.integers(0, 256, (256, 256), dtype=np.uint8)).ok
    assert "colour" in check_radiograph(read_image(SAMPLES[0]), colourfulness_value=40.0).reason


def test_natural_photos_are_not_xrays():
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "page", "text", "horse", "grass"):
        img = getattr(data, name)()
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 3:
            colour = colourfulness(img[..., :3].astype(np.float64))
            img = np.asarray(Image.fromarray(img[..., :3]).convert("L"))
        else:
            colour = 0.0
        assert not check_radiograph(img, colour).ok, name


def test_an_ensemble_directory_is_served_like_a_checkpoint(ensembles):
    from bonefrac.backends import load_backend
    from bonefrac.io import read_image
    from bonefrac.predict import Ensemble, load_predictor

    backend = load_backend(ensembles["same"], "cpu")
    assert isinstance(backend, Ensemble) and backend.threshold == 0.45
    image = read_image(SAMPLES[0])
    expected = load_predictor([str(ensembles["same"])], "cpu").predict_arrays([image])
    assert np.allclose(backend.predict_arrays([image]), expected)
