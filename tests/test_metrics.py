"""Metrics checked against values worked out by hand on tiny arrays."""

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bonefrac import bootstrap as B
from bonefrac import calibration as C
from bonefrac import metrics as M
from bonefrac.errors import ConfigError

# ---------------------------------------------------------------------------- binary reference case
# classes ["no_fracture", "fracture"] -> positive = fracture (index 1)
# y      : 1    1    1    1    0    0    0    0
# p(frac): 0.9  0.8  0.4  0.3  0.6  0.2  0.1  0.25
# At t=0.5 predicted fracture: 0.9, 0.8 (true pos) and 0.6 (false pos)
#   TP=2 FN=2 FP=1 TN=3 ; confusion (rows true no_fracture, fracture) = [[3, 1], [2, 2]]
#   accuracy 5/8; sensitivity 2/4; specificity 3/4; ppv 2/3; npv 3/5
#   fracture:    precision 2/3, recall 1/2, f1 = 2*(1/3)/(7/6) = 4/7
#   no_fracture: precision 3/5, recall 3/4, f1 = 2*(9/20)/(27/20) = 2/3
#   macro (= weighted, supports 4 and 4): precision 19/30, recall 5/8, f1 (4/7 + 2/3)/2 = 13/21
# AUROC by concordant pairs (16 pairs): 0.9 beats 4, 0.8 beats 4, 0.4 beats 3 (not 0.6),
#   0.3 beats 3 (0.2, 0.1, 0.25) -> 14/16 = 0.875
# ROC points (threshold: tpr, fpr, J): 0.9: .25,0,.25  0.8: .5,0,.5  0.6: .5,.25,.25  0.4: .75,.25,.5
#   0.3: 1,.25,.75  0.25: 1,.5,.5  0.2: 1,.75,.25  0.1: 1,1,0  -> Youden threshold 0.3
Y2 = np.array([1, 1, 1, 1, 0, 0, 0, 0])
S2 = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.2, 0.1, 0.25])
P2 = np.c_[1 - S2, S2]
NAMES2 = ["no_fracture", "fracture"]


def test_binary_metrics_by_hand():
    m = M.classification_metrics(Y2, P2, NAMES2)
    assert m["n"] == 8 and m["positive_class"] == "fracture" and m["threshold"] == 0.5
    assert m["confusion_matrix"] == [[3, 1], [2, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(3 / 5)
    assert m["auroc"] == pytest.approx(0.875)
    frac, neg = m["per_class"]["fracture"], m["per_class"]["no_fracture"]
    assert (frac["precision"], frac["recall"], frac["f1"], frac["support"]) == pytest.approx((2 / 3, 0.5, 4 / 7, 4))
    assert (neg["precision"], neg["recall"], neg["f1"]) == pytest.approx((0.6, 0.75, 2 / 3))
    assert m["macro_avg"] == pytest.approx({"precision": 19 / 30, "recall": 5 / 8, "f1": 13 / 21})
    assert m["weighted_avg"] == pytest.approx(m["macro_avg"])


def test_binary_metrics_at_other_threshold():
    # t=0.3: predicted fracture 0.9 0.8 0.4 0.3 (all 4 positives) and 0.6 -> TP=4 FN=0 FP=1 TN=3
    m = M.classification_metrics(Y2, P2, NAMES2, threshold=0.3)
    assert m["confusion_matrix"] == [[3, 1], [0, 4]]
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == pytest.approx((1.0, 0.75, 0.8, 1.0))
    assert M.threshold_metrics(Y2, S2, 0.3) == pytest.approx(
        {"sensitivity": 1.0, "specificity": 0.75, "ppv": 0.8, "npv": 1.0, "threshold": 0.3})


def test_positive_index_flips_the_binary_view():
    # Treating no_fracture as positive swaps sensitivity/specificity and ppv/npv; AUROC is unchanged.
    m = M.classification_metrics(Y2, P2, NAMES2, positive_index=0, threshold=0.5)
    assert m["positive_class"] == "no_fracture"
    assert (m["sensitivity"], m["specificity"]) == pytest.approx((0.75, 0.5))
    assert m["auroc"] == pytest.approx(0.875)


# ---------------------------------------------------------------------------- 3-class reference case
# y    : 0 0 0 1 1 1 1 2 2 2     pred : 0 0 1 1 1 1 2 2 0 0
# confusion = [[2,1,0],[0,3,1],[2,0,1]]; column sums 4 4 2; accuracy 6/10
# precision 2/4, 3/4, 1/2 ; recall 2/3, 3/4, 1/3 ; f1 4/7, 3/4, 2/5
# macro: precision 7/12, recall 7/12, f1 (4/7 + 3/4 + 2/5)/3 = 241/420
# weighted (supports 3,4,3): precision (1.5+3+1.5)/10 = .6, recall .6, f1 (12/7 + 3 + 1.2)/10 = 207/350
# probabilities: 0.6 on the predicted class, 0.2 elsewhere. One-vs-rest AUROC (ties count 1/2):
#   class 0: pos .6 .6 .2, neg five .2 two .6 -> (6 + 6 + 2.5)/21 = 14.5/21
#   class 1: pos .6 .6 .6 .2, neg five .2 one .6 -> (5.5*3 + 2.5)/24 = 19/24
#   class 2: pos .6 .2 .2, neg six .2 one .6 -> (6.5 + 3 + 3)/21 = 12.5/21 ; macro = 349/504
Y3 = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
PRED3 = np.array([0, 0, 1, 1, 1, 1, 2, 2, 0, 0])
P3 = np.full((10, 3), 0.2)
P3[np.arange(10), PRED3] = 0.6
NAMES3 = ["comminuted_fracture", "no_fracture", "simple_fracture"]


def test_three_class_metrics_by_hand():
    m = M.classification_metrics(Y3, P3, NAMES3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 1], [2, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["macro_avg"] == pytest.approx({"precision": 7 / 12, "recall": 7 / 12, "f1": 241 / 420})
    assert m["weighted_avg"] == pytest.approx({"precision": 0.6, "recall": 0.6, "f1": 207 / 350})
    assert m["per_class"]["simple_fracture"] == pytest.approx(
        {"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert m["auroc"] == pytest.approx(349 / 504)
    assert "sensitivity" not in m and "positive_class" not in m


def test_auroc_none_when_class_absent_and_no_warnings():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero division must not warn
        m = M.classification_metrics(y, probs, NAMES3)
    assert m["auroc"] is None
    # never predicted: precision undefined (None, not 0); present, so recall and F1 are 0
    assert m["per_class"]["no_fracture"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 2}
    # absent from the set and never predicted: nothing is defined
    assert m["per_class"]["simple_fracture"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["balanced_accuracy"] == pytest.approx(0.5)  # mean recall over the two present classes
    json.dumps(m, allow_nan=False)


def test_positive_class_index():
    assert M.positive_class_index(["no_fracture", "fracture"]) == 1
    assert M.positive_class_index(["fracture", "no_fracture"]) == 0
    assert M.positive_class_index(["Abnormal", "Normal"]) == 0
    assert M.positive_class_index(["fractured", "not_fractured"]) == 0
    assert M.positive_class_index(["Healthy", "broken"]) == 1
    assert M.positive_class_index(["1", "0"]) == 0
    assert M.positive_class_index(["non-fracture", "fracture"]) == 1
    assert M.positive_class_index(["nondisplaced_fracture", "negative"]) == 0  # "non" only as a whole word
    assert M.positive_class_index(["cat", "dog"]) == 1  # nothing looks negative: the second
    assert M.positive_class_index(["cat", "dog"], override="cat") == 0
    assert M.positive_class_index(NAMES3) is None
    with pytest.raises(ConfigError):
        M.positive_class_index(["cat", "dog"], override="bird")


def test_selection_score():
    assert M.default_selection_metric(2) == "auroc" and M.default_selection_metric(3) == "macro_f1"
    assert M.selection_score("auroc", Y2, P2) == pytest.approx(0.875)
    assert M.selection_score("accuracy", Y2, P2) == pytest.approx(5 / 8)
    assert M.selection_score("macro_f1", Y2, P2) == pytest.approx(13 / 21)
    assert M.selection_score("balanced_accuracy", Y3, P3) == pytest.approx(7 / 12)
    assert M.selection_score("macro_f1", Y3, P3) == pytest.approx(241 / 420)
    nll = -np.mean(np.log(np.where(Y2 == 1, S2, 1 - S2)))
    assert M.selection_score("loss", Y2, P2) == pytest.approx(-nll)
    assert np.isnan(M.selection_score("auroc", np.zeros(8, int), P2))
    with pytest.raises(ConfigError):
        M.selection_score("f2", Y2, P2)


def test_thresholds_and_operating_points():
    assert M.youden_threshold(Y2, S2) == pytest.approx(0.3)
    # sensitivity reaches 1/2 first at 0.8, 0.95 first at 0.3
    assert M.threshold_for_sensitivity(Y2, S2, 0.5) == pytest.approx(0.8)
    assert M.threshold_for_sensitivity(Y2, S2, 0.95) == pytest.approx(0.3)
    # specificity >= 0.95 means no false positive: 0.8 is the lowest such threshold;
    # specificity >= 0.75 (fpr <= 1/4) holds down to 0.3
    assert M.threshold_for_specificity(Y2, S2, 0.95) == pytest.approx(0.8)
    assert M.threshold_for_specificity(Y2, S2, 0.75) == pytest.approx(0.3)
    ops = M.operating_points(Y2, S2)
    # screening (sensitivity >= 0.90) needs all four positives: 0.3. At target 0.5 two would suffice (0.8), but
    # screening is never less sensitive than the default, which already reaches it: 0.3.
    assert ops == pytest.approx({"default": 0.3, "high_sensitivity": 0.3, "high_specificity": 0.8, "screening": 0.3})
    assert M.operating_points(Y2, S2, screening_sensitivity=0.5)["screening"] == pytest.approx(0.3)
    json.dumps(ops, allow_nan=False)


def test_screening_point_is_never_less_sensitive_than_the_default():
    # 19 positives spread over 0.55-0.99 and one at 0.30; 38 negatives at 0.01-0.40, two at 0.60 and 0.62.
    # Youden: 0.55 (sens 19/20, spec 38/40); the highest threshold with sensitivity >= 0.90 is higher (18/20).
    y = np.r_[np.ones(20), np.zeros(40)].astype(int)
    s = np.r_[np.linspace(0.55, 0.99, 19), 0.30, np.linspace(0.01, 0.40, 38), 0.60, 0.62]
    assert M.threshold_for_sensitivity(y, s, 0.90) > 0.56
    ops = M.operating_points(y, s)
    assert ops["default"] == pytest.approx(0.55)
    assert ops["screening"] == pytest.approx(0.55)  # not the 0.90 point: sensitivity 0.90 < the default's 0.95
    sens = {k: M.threshold_metrics(y, s, t)["sensitivity"] for k, t in ops.items()}
    assert sens["screening"] >= sens["default"]


def test_saturated_top_score_gives_a_usable_threshold_just_above_one():
    from bonefrac.checkpoint import MAX_THRESHOLD, is_threshold

    y, s = np.array([0, 1, 1, 0]), np.array([1.0, 1.0, 0.7, 0.2])
    t = M.threshold_for_specificity(y, s, 1.0)
    assert t == MAX_THRESHOLD and M.threshold_metrics(y, s, t)["specificity"] == 1.0  # 1.0 would call them
    assert is_threshold(t)  # predict/serve accept it (they refused it: "not a threshold from 0 to 1")


def test_threshold_above_every_score_is_finite():
    # The top score is a negative, so full specificity needs a threshold above every score.
    y, s = np.array([0, 1, 0]), np.array([0.9, 0.5, 0.1])
    t = M.threshold_for_specificity(y, s, 1.0)
    assert np.isfinite(t) and t > 0.9
    assert M.threshold_metrics(y, s, t)["specificity"] == 1.0


def test_threshold_with_one_class_falls_back():
    assert M.youden_threshold(np.ones(4), np.linspace(0, 1, 4)) == 0.5


# ---------------------------------------------------------------------------- calibration

def test_ece_by_hand():
    # 5 bins of width 0.2, top-label confidence:
    #   0.90 correct -> bin (.8,1]: acc 1, conf .9, gap .1, share 1/4
    #   0.70 wrong, 0.70 correct -> bin (.6,.8]: acc .5, conf .7, gap .2, share 2/4
    #   0.55 wrong -> bin (.4,.6]: acc 0, conf .55, gap .55, share 1/4
    # ECE = .025 + .1 + .1375 = .2625
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0])
    assert C.expected_calibration_error(y, probs, n_bins=5) == pytest.approx(0.2625)
    curve = C.reliability_curve(y, probs, n_bins=5)
    assert curve["count"].tolist() == [0, 0, 1, 2, 1]
    assert curve["accuracy"][2:] == pytest.approx([0.0, 0.5, 1.0])
    assert curve["confidence"][2:] == pytest.approx([0.55, 0.7, 0.9])
    assert np.isnan(curve["accuracy"][0])


def test_softmax_and_temperature_recovery():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2.0, size=(20000, 3))
    probs = M.softmax(true_logits)
    assert probs.sum(axis=1) == pytest.approx(np.ones(len(probs)))
    y = (rng.random(len(probs))[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    # An over-confident model: its logits are the true ones times 2.5, so T = 2.5 undoes it.
    t = C.fit_temperature(true_logits * 2.5, y)
    assert t == pytest.approx(2.5, rel=0.08)
    assert M.softmax(true_logits * 2.5, t) == pytest.approx(M.softmax(true_logits), abs=0.03)


def test_temperature_fit_on_a_perfectly_classified_val_set_keeps_one(caplog):
    # Every image right: the NLL keeps falling as T -> 0, which would turn every probability into 0 or 1 and every
    # threshold into 1.0.
    logits = np.array([[2.0, -1.0], [1.5, 0.0], [-0.5, 1.0], [0.0, 3.0]])
    y = np.array([0, 0, 1, 1])
    with caplog.at_level("WARNING"):
        assert C.fit_temperature(logits, y) == 1.0
    assert "classified correctly" in caplog.text
    # A model that needs more than the bound is not "separable": it gets the bound, not 1 (which is further off).
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    weak = np.c_[np.zeros(400), (2 * y - 1) * 0.3 + rng.normal(0, 1, 400)] * 40  # ranks well, far too confident
    caplog.clear()
    with caplog.at_level("WARNING"):
        t = C.fit_temperature(weak, y)
    assert t == pytest.approx(20.0, rel=1e-3) and "ran into its bound" in caplog.text


# ---------------------------------------------------------------------------- bootstrap

def _acc(y, probs):
    return float(np.mean(probs.argmax(1) == y))


def _random_case(n, seed=0, k=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    return y, M.softmax(logits)


def test_bootstrap_repeatable_and_contains_point():
    y, p = _random_case(200)
    a = B.bootstrap_ci(_acc, y, p, n_boot=300, seed=3)
    b = B.bootstrap_ci(_acc, y, p, n_boot=300, seed=3)
    c = B.bootstrap_ci(_acc, y, p, n_boot=300, seed=4)
    assert a == b and a != c
    assert a["low"] <= a["value"] <= a["high"] and a["n_boot_valid"] == 300
    assert a["value"] == pytest.approx(_acc(y, p))


def test_bootstrap_resamples_whole_groups():
    y, p = _random_case(60, seed=5)
    reps = 3
    y_dup, p_dup = np.repeat(y, reps), np.repeat(p, reps, axis=0)
    groups = np.repeat([f"g{i:03d}" for i in range(60)], reps)  # sorted names keep the base order
    by_group = B.bootstrap_ci(_acc, y_dup, p_dup, groups=groups, n_boot=500, seed=0)
    base = B.bootstrap_ci(_acc, y, p, n_boot=500, seed=0)
    by_row = B.bootstrap_ci(_acc, y_dup, p_dup, n_boot=500, seed=0)
    # Drawing a group brings all 3 copies, so it is the bootstrap of the 60 distinct rows...
    assert (by_group["low"], by_group["high"]) == pytest.approx((base["low"], base["high"]))
    # ...while resampling the 180 rows pretends to have 3x the data and is too narrow.
    assert by_group["high"] - by_group["low"] > by_row["high"] - by_row["low"]


def test_bootstrap_draws_keep_groups_whole():
    sizes = [1, 2, 3, 4]
    ids = np.repeat(np.arange(4), sizes)
    probs = np.c_[ids / 10, 1 - ids / 10]  # column 0 encodes the group id
    y = np.zeros(len(ids), int)

    def check(_, pr):
        counts = np.bincount(np.rint(pr[:, 0] * 10).astype(int), minlength=4)
        assert all(c % s == 0 for c, s in zip(counts, sizes, strict=True))
        return 1.0

    assert B.bootstrap_ci(check, y, probs, groups=ids, n_boot=200)["n_boot_valid"] == 200


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0] * 9 + [1])
    p = np.c_[np.linspace(0.9, 0.1, 10), np.linspace(0.1, 0.9, 10)]
    out = B.bootstrap_ci(lambda a, b: roc_auc_score(a, b[:, 1]), y, p, n_boot=200)
    assert 0 < out["n_boot_valid"] < 200  # resamples without the lone positive are skipped


def test_metrics_with_ci_matches_point_and_bootstrap():
    y, p = _random_case(300, seed=7)
    groups = np.arange(300) // 2
    ci = B.metrics_with_ci(y, p, NAMES2, groups=groups, positive_index=1, threshold=0.5, n_boot=400, seed=1)
    point = M.classification_metrics(y, p, NAMES2, positive_index=1, threshold=0.5)
    for key in ("accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity", "ppv", "npv"):
        assert ci[key]["value"] == pytest.approx(point[key])
        assert ci[key]["low"] <= ci[key]["value"] <= ci[key]["high"]
    assert ci["macro_f1"]["value"] == pytest.approx(point["macro_avg"]["f1"])
    # The vectorised path uses exactly the resamples of bootstrap_ci with the same seed.
    generic = B.bootstrap_ci(_acc, y, p, groups=groups, n_boot=400, seed=1)
    assert (ci["accuracy"]["low"], ci["accuracy"]["high"]) == pytest.approx((generic["low"], generic["high"]))
    auc = B.bootstrap_ci(lambda a, b: roc_auc_score(a, b[:, 1]), y, p, groups=groups, n_boot=400, seed=1)
    assert (ci["auroc"]["low"], ci["auroc"]["high"]) == pytest.approx((auc["low"], auc["high"]))
    json.dumps(ci, allow_nan=False)


def test_cm_metrics_per_class_by_hand():
    cm = np.array([[[2, 1, 0], [0, 3, 0], [0, 0, 0]]])  # rows true, columns predicted; class 2 never seen
    out = M.cm_metrics(cm, None)
    assert out["precision"][0][:2].tolist() == pytest.approx([2 / 2, 3 / 4])
    assert out["f1"][0][:2].tolist() == pytest.approx([2 * 2 / (3 + 2), 2 * 3 / (3 + 4)])
    assert out["recall"][0][:2].tolist() == pytest.approx([2 / 3, 1.0])
    assert np.isnan([out[k][0][2] for k in ("precision", "recall", "f1")]).all()  # nothing to say about class 2
    assert out["macro_f1"][0] == pytest.approx((4 / 5 + 6 / 7) / 2)  # over the two present classes


def test_a_class_absent_from_the_set_does_not_drag_the_macro_averages():
    names = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 1])
    probs = np.eye(3)[y] * 0.8 + 0.1  # every prediction right; class c absent
    m = M.classification_metrics(y, probs, names)
    assert m["macro_avg"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})
    assert m["weighted_avg"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})
    # one rare class in 40: resamples that miss it must not pull the macro-F1 interval below 1
    y = np.array([0] * 20 + [1] * 19 + [2])
    ci = B.metrics_with_ci(y, np.eye(3)[y] * 0.8 + 0.1, names, n_boot=200, seed=0)
    assert ci["macro_f1"]["low"] == ci["macro_f1"]["high"] == 1.0


def test_undefined_values_are_none_in_points_and_intervals_alike():
    y = np.array([0] * 18 + [1, 1])
    s = np.array([0.1] * 18 + [0.9, 0.2])  # one of the two positives found, no false positives
    probs = np.stack([1 - s, s], axis=1)
    ci = B.metrics_with_ci(y, probs, NAMES2, positive_index=1, threshold=0.5, n_boot=300, seed=0)
    # per-class precision of the positive class is the PPV: same value, same interval
    assert (ci["per_class_precision"]["fracture"]["low"], ci["per_class_precision"]["fracture"]["high"]) == \
        (ci["ppv"]["low"], ci["ppv"]["high"]) == (1.0, 1.0)
    none_predicted = M.threshold_metrics(y, s, 0.95)
    assert none_predicted["ppv"] is None and none_predicted["sensitivity"] == 0.0
    no_positives = M.classification_metrics(np.zeros(5, int), np.full((5, 2), 0.5), NAMES2, 1, 0.5)
    assert no_positives["sensitivity"] is None and no_positives["per_class"]["fracture"]["recall"] is None
    json.dumps(no_positives, allow_nan=False)


def test_youden_ties_go_to_the_highest_threshold():
    # J = 1/3 at t = 0.9 (tpr 1/3, fpr 0) and at t = 0.5 (tpr 1, fpr 2/3): rounding differs, the rule must not
    assert M.youden_threshold([1, 0, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]) == pytest.approx(0.9)


def test_metrics_with_ci_multiclass():
    y, p = _random_case(150, seed=2, k=3)
    ci = B.metrics_with_ci(y, p, NAMES3, groups=None, positive_index=None, threshold=None, n_boot=200, seed=0)
    point = M.classification_metrics(y, p, NAMES3)
    assert ci["auroc"]["value"] == pytest.approx(point["auroc"])
    for metric in ("precision", "recall", "f1"):
        assert set(ci[f"per_class_{metric}"]) == set(NAMES3)
        for name in NAMES3:
            iv = ci[f"per_class_{metric}"][name]
            assert iv["value"] == pytest.approx(point["per_class"][name][metric])
            assert iv["low"] <= iv["value"] <= iv["high"]
    assert "sensitivity" not in ci
    json.dumps(ci, allow_nan=False)


# ---------------------------------------------------------------------------- ensembles, shift, errors

def test_ensemble_weights_favour_better_model():
    y, good = _random_case(500, seed=11)
    rng = np.random.default_rng(12)
    noise = M.softmax(rng.normal(size=(500, 2)))
    w = M.fit_ensemble_weights([noise, good], y)
    assert w.shape == (2,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w[1] > 0.8
    avg = M.average_probs([noise, good], w)
    assert avg.sum(axis=1) == pytest.approx(np.ones(500))
    assert M.average_probs([noise, good]) == pytest.approx((noise + good) / 2)


def test_domain_shift_summary():
    ma = M.classification_metrics(Y2, P2, NAMES2)
    mb = M.classification_metrics(Y2, P2, NAMES2, threshold=0.3)
    rng = np.random.default_rng(0)
    out = M.domain_shift_summary(ma, mb, rng.uniform(0, 0.5, 300), rng.uniform(0.5, 1, 300))
    assert out["metric_diff"]["sensitivity"] == pytest.approx(0.5)
    assert out["metric_diff"]["auroc"] == pytest.approx(0.0)
    assert out["ks_statistic"] == pytest.approx(1.0)
    assert out["scores_a"]["n"] == 300 and out["scores_b"]["median"] > 0.5
    json.dumps(out, allow_nan=False)


def test_ranked_errors_and_per_sample_loss():
    # True fracture rows 2 (p=.4) and 3 (p=.3) are missed: most confident miss is row 3 (0.7 on no_fracture).
    errors = M.ranked_errors(Y2, P2, k_per_class=5)
    assert errors == {0: [4], 1: [3, 2]}
    assert M.ranked_errors(Y2, P2, k_per_class=1)[1] == [3]
    loss = M.per_sample_loss(Y2, P2)
    assert loss[0] == pytest.approx(-np.log(0.9)) and loss[4] == pytest.approx(-np.log(0.4))


def test_ci_skips_resamples_where_a_rate_is_undefined():
    # One positive among 12: resamples that miss it have no sensitivity; they are skipped, not counted as 0.
    y = np.array([1] + [0] * 11)
    p = np.c_[np.linspace(0.2, 0.9, 12), np.linspace(0.8, 0.1, 12)]
    ci = B.metrics_with_ci(y, p, NAMES2, groups=None, positive_index=1, threshold=0.5, n_boot=300, seed=0)
    assert 0 < ci["sensitivity"]["n_boot_valid"] < 300
    assert ci["sensitivity"]["low"] == 1.0  # whenever the positive is drawn it is caught (p = 0.8)
    assert ci["specificity"]["n_boot_valid"] == 300


def test_bootstrap_speed_1000_by_1000():
    import time

    y, p = _random_case(1000, seed=3)
    start = time.perf_counter()
    B.bootstrap_ci(_acc, y, p, n_boot=1000)
    B.metrics_with_ci(y, p, NAMES2, groups=np.arange(1000) // 3, positive_index=1, threshold=0.5, n_boot=1000, seed=0)
    assert time.perf_counter() - start < 5.0


def test_one_vs_rest_by_hand():
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array([[.7, .2, .1], [.2, .5, .3], [.1, .3, .6], [.5, .1, .4], [.3, .3, .4], [.2, .2, .6]])
    out = M.one_vs_rest(y, probs, 2)
    # class 2 is called (argmax) for rows 2, 4, 5: true positive row 2; rows 3 missed; rows 4, 5 false alarms
    assert out["sensitivity"] == pytest.approx(1 / 2) and out["specificity"] == pytest.approx(2 / 4)
    # p2 of positives 0.6, 0.4 against negatives 0.1, 0.3, 0.4, 0.6 (ties count half): 0.6 wins 3 and ties 1
    # (3.5), 0.4 wins 2 and ties 1 (2.5), of 8 pairs
    assert out["auroc"] == pytest.approx((3.5 + 2.5) / 8)
    assert M.one_vs_rest(np.array([2, 2]), probs[:2], 2)["auroc"] is None  # no negatives


def test_macro_precision_and_f1_count_a_predicted_class_absent_from_the_set():
    """Class c never occurs but is predicted 3 times: its false alarms belong in the macro average (as in
    scikit-learn), while its recall stays undefined and out of macro recall."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    pred = np.array([0, 0, 0, 2, 1, 1, 1, 2, 0, 2])
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = M.classification_metrics(y, probs, ["a", "b", "c"])
    assert m["macro_avg"]["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["macro_avg"]["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["macro_avg"]["recall"] == pytest.approx(recall_score(y, pred, labels=[0, 1], average="macro"))
    assert m["weighted_avg"]["f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    # the vectorised path (bootstrap, model selection) agrees with the point estimate
    cm = M.confusion_batch(y, pred, 3, np.ones((1, len(y))))
    assert M.cm_metrics(cm, None)["macro_f1"][0] == pytest.approx(m["macro_avg"]["f1"])
