"""Every figure is a real PNG and the HTML report is one offline, self-contained file."""

import sys

import numpy as np
import pytest

from bonefrac import bootstrap as B
from bonefrac import metrics as M
from bonefrac import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024


def _case(n=120, k=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    return y, M.softmax(logits)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    y2, p2 = _case()
    y3, p3 = _case(k=3, seed=1)
    names2, names3 = ["no_fracture", "fracture"], ["comminuted_fracture", "no_fracture", "simple_fracture"]
    ops = M.operating_points(y2 == 1, p2[:, 1])
    csv = out / "metrics.csv"
    csv.write_text("epoch,train_loss,val_loss,val_auroc,val_macro_f1,lr\n"
                   + "".join(f"{e},{1 / (e + 1)},{1.2 / (e + 1)},{0.6 + e / 50},{0.5 + e / 60},{1e-3 * 0.8 ** e}\n"
                             for e in range(10)))
    images = [np.random.default_rng(i).integers(0, 256, (64, 48), dtype=np.uint8) for i in range(5)]
    images.append(np.zeros((40, 40, 3), np.uint8))  # an RGB heatmap overlay
    cm = M.classification_metrics(y3, p3, names3)["confusion_matrix"]
    return {
        "cm": R.plot_confusion_matrix(cm, names3, out / "cm.png"),
        "cm_norm": R.plot_confusion_matrix(cm, names3, out / "cm_norm.png", normalize=True),
        "roc2": R.plot_roc(y2, p2, names2, out / "roc2.png", operating_points=ops),
        "roc3": R.plot_roc(y3, p3, names3, out / "roc3.png"),
        "pr2": R.plot_pr(y2, p2, names2, out / "pr2.png", operating_points=ops),
        "pr3": R.plot_pr(y3, p3, names3, out / "pr3.png"),
        "rel": R.plot_reliability(y3, p3, out / "sub" / "rel.png"),
        "dist": R.plot_score_distributions({"internal": p2[:, 1], "external": p2[:60, 1] ** 2}, out / "dist.png"),
        "curves": R.plot_training_curves(csv, out / "curves.png"),
        "grid": R.image_grid(images, [f"img {i}" for i in range(6)], out / "grid.png", ncols=3),
    }


@pytest.mark.parametrize("name", ["cm", "cm_norm", "roc2", "roc3", "pr2", "pr3", "rel", "dist", "curves", "grid"])
def test_plot_writes_png(pngs, name):
    _assert_png(pngs[name])


def test_plots_survive_degenerate_input(tmp_path):
    # One class only, an empty grid, a metrics.csv with just a header: still a figure, no crash.
    y = np.zeros(10, int)
    p = np.tile([0.7, 0.3], (10, 1))
    _assert_png(R.plot_roc(y, p, ["no_fracture", "fracture"], tmp_path / "roc.png"))
    _assert_png(R.image_grid([], None, tmp_path / "grid.png"))
    (tmp_path / "m.csv").write_text("epoch,train_loss,val_loss,lr\n")
    _assert_png(R.plot_training_curves(tmp_path / "m.csv", tmp_path / "curves.png"))


def test_html_report_is_self_contained(pngs, tmp_path):
    y, p = _case()
    ci = B.metrics_with_ci(y, p, ["no_fracture", "fracture"], None, 1, 0.5, 300, 0)
    sections = [
        ("Summary", ["Test split <b>not</b> bold & escaped.", {"accuracy": 0.91234, "n": 120, "auroc": None}]),
        ("Intervals", [{k: v for k, v in ci.items() if isinstance(v, dict)}]),
        ("Per class", [[{"class": "fracture", "recall": 0.8}, {"class": "no_fracture", "recall": 0.9}]]),
        ("Figures", [pngs["roc2"], str(pngs["cm"]), tmp_path / "missing.png"]),
    ]
    out = R.html_report(tmp_path / "r" / "report.html", title="Eval <test>", sections=sections)
    text = out.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 2
    assert "http://" not in text and "https://" not in text
    assert "bonefrac is an assistive research tool, not a diagnostic device." in text
    assert "&lt;b&gt;not&lt;/b&gt; bold &amp; escaped." in text and "Eval &lt;test&gt;" in text
    assert "<table>" in text and "0.9123" in text and "missing.png" in text
    lo, hi = ci["accuracy"]["low"], ci["accuracy"]["high"]
    assert f"({lo:.4g}–{hi:.4g})" in text


def test_import_does_not_load_matplotlib():
    # Checked in a fresh interpreter so other tests' imports do not interfere.
    import subprocess

    code = "import sys, bonefrac.report, bonefrac.metrics; print('matplotlib' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(__import__("pathlib").Path(R.__file__).parents[1])})
    assert res.stdout.strip() == "False"
