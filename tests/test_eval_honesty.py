"""Honest evaluation on small or degenerate sets: input checks, Brier/NLL, interval reliability, the report's
rendering of unreliable intervals, operating-point markers and empty plots. Pure functions on tiny arrays."""

import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from bonefrac import bootstrap as B
from bonefrac import evalreport as ER
from bonefrac import calibration as C
from bonefrac import metrics as M
from bonefrac import report as R

NAMES2 = ["no_fracture", "fracture"]
NAMES3 = ["comminuted_fracture", "no_fracture", "simple_fracture"]


def _separable(n_per_class: int):
    """n negatives then n positives, p(fracture) 0.1..0.45 and 0.55..0.9: every metric is 0 or 1 at 0.5."""
    y = np.r_[np.zeros(n_per_class, int), np.ones(n_per_class, int)]
    s = np.r_[np.linspace(0.1, 0.45, n_per_class), np.linspace(0.55, 0.9, n_per_class)]
    return y, np.c_[1 - s, s]


def _overlapping(n_per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n_per_class, int), np.ones(n_per_class, int)]
    s = 1 / (1 + np.exp(-(rng.normal(size=2 * n_per_class) + 1.2 * (2 * y - 1))))
    return y, np.c_[1 - s, s]


# ---------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_inputs_rejects_non_finite_probabilities(bad):
    y, p = _overlapping(20)
    p[3] = [bad, 0.5]
    with pytest.raises(ValueError, match="non-finite.*row 3"):
        M.check_inputs(y, p)
    with pytest.raises(ValueError, match="non-finite"):  # used to give AUROC 1.0 silently
        B.metrics_with_ci(y, p, NAMES2, n_boot=20)


def test_check_inputs_rejects_empty_input():
    with pytest.raises(ValueError, match="no rows"):
        M.check_inputs(np.zeros(0, int), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="no rows"):
        M.classification_metrics([], np.zeros((0, 2)), NAMES2)


# ---------------------------------------------------------------------------- Brier, NLL

def test_brier_and_nll_match_sklearn_binary():
    y, p = _overlapping(30, seed=2)
    assert C.brier_score(y, p) == pytest.approx(brier_score_loss(y, p[:, 1]))
    assert C.negative_log_likelihood(y, p) == pytest.approx(log_loss(y, p))


def test_brier_multiclass_is_the_sum_over_classes_by_hand():
    y = np.array([0, 2])
    p = np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    # row 0: 0.25 + 0.0625 + 0.0625 = 0.375; row 1: 0.04 + 0.04 + 0.16 = 0.24; mean 0.3075
    assert C.brier_score(y, p) == pytest.approx(0.3075)
    assert C.brier_score(y, p) == pytest.approx(brier_score_loss(y, p, labels=[0, 1, 2]))
    assert C.negative_log_likelihood(y, p) == pytest.approx(-(np.log(0.5) + np.log(0.6)) / 2)
    assert C.negative_log_likelihood(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))


def test_brier_and_nll_have_bootstrap_intervals_around_the_point():
    y, p = _overlapping(60, seed=3)
    ci = B.metrics_with_ci(y, p, NAMES2, n_boot=300, seed=0)
    assert ci["brier"]["value"] == pytest.approx(C.brier_score(y, p))
    assert ci["nll"]["value"] == pytest.approx(C.negative_log_likelihood(y, p))
    for key in ("brier", "nll"):
        assert ci[key]["low"] < ci[key]["value"] < ci[key]["high"] and ci[key]["reliable"]


def test_ece_of_a_perfectly_calibrated_model_on_14_images_is_far_from_zero():
    _, p = _separable(7)
    e0 = B.ece_if_calibrated(p, n_sim=400)
    assert 0.12 < e0 < 0.35  # the reviewer measured ~0.22 on 14 images; a large set gives ~0
    big = np.tile(p, (300, 1))
    assert B.ece_if_calibrated(big, n_sim=50) < 0.03


# ---------------------------------------------------------------------------- interval reliability

def test_intervals_on_7_plus_7_images_are_marked_unreliable():
    y, p = _overlapping(7)
    ci = B.metrics_with_ci(y, p, NAMES2, groups=None, positive_index=1, threshold=0.5, n_boot=300)
    assert ci["groups_per_class"] == {"no_fracture": 7, "fracture": 7} and ci["n_groups"] == 14
    for key in ("accuracy", "auroc", "sensitivity", "specificity", "brier"):
        assert ci[key]["reliable"] is False and ci[key]["note"].startswith("n/a: 7 groups")
        assert ci[key]["low"] is not None  # the existing keys keep their meaning
    assert "fracture" in ci["sensitivity"]["note"] and "no_fracture" in ci["specificity"]["note"]
    assert any("fewer than 10 groups" in w for w in ci["warnings"])
    json.dumps(ci, allow_nan=False)


def test_a_single_group_gives_no_interval():
    y, p = _overlapping(20)
    ci = B.metrics_with_ci(y, p, NAMES2, groups=np.zeros(40), n_boot=100)
    assert ci["auroc"]["low"] == ci["auroc"]["high"] == ci["auroc"]["value"]  # what made it look confident
    assert ci["auroc"]["reliable"] is False and ci["auroc"]["note"] == "n/a: 1 group in all"
    assert ci["n_groups"] == 1 and "1 group(s)" in ci["warnings"][0]


def test_zero_width_interval_of_a_defined_metric_is_marked():
    y, p = _separable(40)
    ci = B.metrics_with_ci(y, p, NAMES2, n_boot=200)
    assert ci["sensitivity"]["value"] == ci["sensitivity"]["low"] == ci["sensitivity"]["high"] == 1.0
    assert ci["sensitivity"]["reliable"] is False and "zero width" in ci["sensitivity"]["note"]
    assert ci["brier"]["reliable"] is True  # not a proportion at 0 or 1: a real interval
    assert any("zero width" in w for w in ci["warnings"])


def test_interval_defined_on_few_resamples_is_flagged():
    # 3 classes, the third in 1 of 60 rows: a resample misses it a third of the time, leaving the macro AUROC
    # undefined.
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(29, int), 2]
    p = M.softmax(rng.normal(size=(60, 3)) + 2 * np.eye(3)[y])
    ci = B.metrics_with_ci(y, p, NAMES3, n_boot=400)
    assert ci["auroc"]["n_boot_valid"] < 0.9 * 400
    assert ci["auroc"]["reliable"] is False and "resamples defined" in ci["auroc"]["note"]
    assert ci["accuracy"]["reliable"] is False  # class 2 has 1 group
    assert ci["groups_per_class"]["simple_fracture"] == 1


def test_enough_groups_and_spread_give_reliable_intervals():
    y, p = _overlapping(60, seed=1)
    ci = B.metrics_with_ci(y, p, NAMES2, groups=np.arange(120) // 2, n_boot=300)
    assert all(ci[k]["reliable"] and ci[k]["note"] is None for k in ("accuracy", "auroc", "sensitivity"))
    assert ci["warnings"] == [] and ci["n_groups"] == 60


def test_report_shows_unreliable_intervals_as_such(tmp_path):
    y, p = _overlapping(7)
    ci = B.metrics_with_ci(y, p, NAMES2, n_boot=200)
    sens = ci["sensitivity"]
    assert R._fmt(sens) == f"{R._fmt(sens['value'])} (n/a: 7 groups of fracture)"
    flagged = {"value": 0.8, "low": 0.6, "high": 0.9, "n_boot_valid": 700, "reliable": False,
               "note": "only 700 of 1000 resamples defined"}
    assert R.interval_text(flagged) == "0.6–0.9, unreliable: only 700 of 1000 resamples defined"
    name, items = ER._ci_section(ci)
    text = R.html_report(tmp_path / "r.html", title="t", sections=[(name, items)]).read_text()
    assert "n/a: 7 groups of fracture" in text and "Groups resampled: 14 (no_fracture: 7, fracture: 7)" in text
    assert f"{sens['low']:.4g}–{sens['high']:.4g}" not in text


# ---------------------------------------------------------------------------- plots

def _capture_axes(monkeypatch):
    """Replace report._save so that the axes of the next figure are kept for inspection."""
    kept = []

    def save(fig, path):
        kept.append(fig.axes[0])
        return path

    monkeypatch.setattr(R, "_save", save)
    return kept


@pytest.mark.parametrize("plot", [R.plot_roc, R.plot_pr])
def test_coinciding_operating_points_share_one_labelled_marker(plot, monkeypatch, tmp_path):
    y, p = _separable(10)
    # 0.5 and 0.52 both split the classes perfectly: same spot on both curves.
    points = {"default": 0.5, "screening": 0.52, "high_sensitivity": 0.05}
    kept = _capture_axes(monkeypatch)
    plot(y, p, NAMES2, tmp_path / "x.png", 1, points)
    labels = kept[0].get_legend_handles_labels()[1]
    assert "default (t=0.500), screening (t=0.520)" in labels
    assert not any(lab.startswith("screening") for lab in labels)


@pytest.mark.parametrize("plot", [R.plot_roc, R.plot_pr])
def test_an_empty_curve_plot_says_why(plot, monkeypatch, tmp_path):
    kept = _capture_axes(monkeypatch)
    plot(np.zeros(6, int), np.tile([0.7, 0.3], (6, 1)), NAMES2, tmp_path / "x.png", 1)
    assert any("one class" in t.get_text() for t in kept[0].texts)


# ---------------------------------------------------------------------------- report sections

def test_one_class_and_tta_warnings():
    warn = ER.set_warnings(np.zeros(5, int), NAMES2, 1, tta=True)
    assert warn[0].startswith("the test split has one class (no_fracture): AUROC and sensitivity are undefined")
    assert "--tta" in warn[1] and "without it" in warn[1]
    assert ER.set_warnings(np.array([0, 1]), NAMES2, 1, tta=False) == []
    assert "simple_fracture" in ER.set_warnings(np.array([0, 1]), NAMES3, None, tta=False)[0]


def test_k_class_headline_names_the_auroc_and_the_one_vs_rest_block_is_shown():
    result = {"class_names": NAMES3, "accuracy": 0.8, "auroc": 0.9, "n": 30,
              "one_vs_rest": {"positive_class": "simple_fracture", "auroc": 0.85, "sensitivity": 0.7,
                              "specificity": 0.9}}
    assert ER._headline(result) == {"accuracy": 0.8, "AUROC (macro one-vs-rest)": 0.9}
    heading, items = ER._one_vs_rest_section(result)
    assert "simple_fracture against the rest" in heading and items[-1]["sensitivity"] == 0.7


def test_binary_headline_names_the_positive_class_and_the_threshold_source():
    result = {"class_names": NAMES2, "positive_class": "fracture", "threshold": 0.14, "sensitivity": 1.0,
              "threshold_source": "0.5 fallback: the model has no validation-chosen threshold", "tta": True,
              "models": ["m"], "manifest": "x.csv", "split": "test", "auroc": 0.9}
    settings = ER._settings(result)
    assert settings["positive class"] == "fracture" and settings["test-time augmentation (--tta)"] == "on"
    assert settings["threshold"] == "p(fracture) >= 0.14: 0.5 fallback: the model has no validation-chosen threshold"
    assert ER._headline(result)["sensitivity (fracture)"] == 1.0 and "AUROC" in ER._headline(result)


def test_a_handful_of_resamples_is_not_called_a_95_percent_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 200), 0.01, 0.99)
    p = np.stack([1 - p, p], 1)
    few = B.metrics_with_ci(y, p, NAMES2, n_boot=3)
    assert few["sensitivity"]["reliable"] is False and "too few" in few["sensitivity"]["note"]
    enough = B.metrics_with_ci(y, p, NAMES2, n_boot=300)
    assert enough["sensitivity"]["reliable"] is True
