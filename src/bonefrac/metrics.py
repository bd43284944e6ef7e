"""Pure metric functions on numpy arrays: classification metrics, operating points, ensembles, domain-shift
summaries and the errors to look at (calibration.py: temperature, ECE, Brier; bootstrap.py: confidence intervals).

Conventions: ``y`` is a 1-D int array of class indices ``0..K-1``; ``probs`` is ``(n, K)`` with rows summing
to 1; binary helpers take ``y_bin`` (1 = positive) and ``scores`` (probability of the positive class).
Every dict returned holds plain Python floats/ints/lists (``json.dumps`` works); undefined values are None.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats
from sklearn.metrics import confusion_matrix, log_loss, roc_auc_score, roc_curve

from .errors import ConfigError

logger = logging.getLogger(__name__)

SELECTION_METRICS = ("auroc", "macro_f1", "balanced_accuracy", "accuracy", "loss")
_NEGATIVE_NAMES = {"no_fracture", "nofracture", "normal", "healthy", "negative", "not_fractured", "notfractured",
                   "nonfractured", "non_fractured", "unfractured", "none", "no", "0", "false"}
_NEGATIVE_PREFIXES = ("no", "non", "not", "without")
_EPS = 1e-12


def check_inputs(y, probs, n_classes: int | None = None):
    """(y as int (n,), probs as float (n, K)); ValueError naming the problem when they are empty, do not fit
    or hold non-finite values."""
    y = np.asarray(y).astype(int).ravel()
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or len(y) != len(probs):
        raise ValueError(f"need y (n,) and probs (n, K); got {y.shape} and {probs.shape}")
    if not len(y):
        raise ValueError("no rows: metrics need at least one prediction")
    if n_classes is not None and probs.shape[1] != n_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {n_classes} classes")
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(bad):  # a NaN row would otherwise sort anywhere and give e.g. a perfect AUROC
        raise ValueError(f"{len(bad)} row(s) hold non-finite values (NaN/inf), first at row {bad[0]}")
    if y.min() < 0 or y.max() >= probs.shape[1]:
        raise ValueError("y holds a class index outside 0..K-1")
    return y, probs


def _div(a, b) -> float | None:
    return float(a) / float(b) if b else None


def json_number(x):
    """Plain float for JSON, None for undefined (None / NaN)."""
    return None if x is None or not np.isfinite(x) else float(x)


# ----------------------------------------------------------------------------- classification metrics

def positive_class_index(class_names: Sequence[str], override: str | int | None = None) -> int | None:
    """Index of the positive class for 2 classes (None otherwise).

    ``override`` (a class name or index) wins. Otherwise the positive class is the one NOT named like a
    negative (no_fracture, normal, healthy, negative, not_fractured, 0, or a leading "no_"/"non_"/"not_"
    word); if both or neither look negative, the second class.
    """
    names = [str(c) for c in class_names]
    if override is not None:
        if isinstance(override, (int, np.integer)) and 0 <= override < len(names):
            return int(override)
        name = unicodedata.normalize("NFC", str(override))  # as prepare stores class names
        if name in names:
            return names.index(name)
        raise ConfigError(f"positive class {override!r} is not one of the classes {names}")
    if len(names) != 2:
        return None
    negative = [_looks_negative(n) for n in names]
    if negative[0] != negative[1]:
        return 1 if negative[0] else 0
    return 1


def positive_by_position(class_names: Sequence[str]) -> bool:
    """True when `positive_class_index` picks a binary model's positive class by position (neither or both names
    look negative), i.e. when the choice deserves a warning."""
    names = [str(c) for c in class_names]
    return len(names) == 2 and _looks_negative(names[0]) == _looks_negative(names[1])


def negative_class(class_names: Sequence[str]) -> str | None:
    """The class meaning "nothing found": for 2 classes the non-positive one, for more the one class named like
    a negative (no_fracture, normal, ...), else None."""
    names = [str(c) for c in class_names]
    pos = positive_class_index(names)
    if pos is not None:
        return names[1 - pos]
    negative = [n for n in names if _looks_negative(n)]
    return negative[0] if len(negative) == 1 else None


def _looks_negative(name: str) -> bool:
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    # Only a whole leading word counts, so "nondisplaced_fracture" or "nonunion" stay positive.
    return norm in _NEGATIVE_NAMES or norm.split("_")[0] in _NEGATIVE_PREFIXES


def binary_predict(probs, pos: int, threshold: float):
    """Class indices: `pos` where probs[:, pos] >= threshold, else the other class."""
    return np.where(probs[:, pos] >= threshold, pos, 1 - pos)


def one_vs_rest(y, probs, pos: int) -> dict:
    """Class `pos` of a K-class model against the rest: AUROC of probs[:, pos] (None when y is all one side),
    and sensitivity / specificity of the model's own decision (the argmax is `pos`, or not)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=float)
    is_pos, called = y == pos, probs.argmax(axis=1) == pos
    auroc = float(roc_auc_score(is_pos, probs[:, pos])) if 0 < is_pos.sum() < len(y) else None
    return {"auroc": auroc, "sensitivity": _div((called & is_pos).sum(), is_pos.sum()),
            "specificity": _div((~called & ~is_pos).sum(), (~is_pos).sum())}


def _auroc(y, probs, pos: int | None):
    """Binary AUROC of probs[:, pos], or one-vs-rest macro for K > 2; None if a class is absent."""
    k = probs.shape[1]
    if len(np.unique(y)) < k:
        return None
    if k == 2:
        return float(roc_auc_score(y == pos, probs[:, pos]))
    return float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(k)]))


def classification_metrics(y, probs, class_names: Sequence[str], positive_index: int | None = None,
                           threshold: float | None = None) -> dict:
    """Headline metrics for one set of predictions, as a JSON-ready dict.

    Keys: n, accuracy, balanced_accuracy, auroc, per_class {name: {precision, recall, f1, support}},
    macro_avg, weighted_avg, confusion_matrix (rows true, columns predicted), class_names. For 2 classes the
    prediction is ``probs[:, pos] >= threshold`` (default 0.5) and sensitivity, specificity, ppv, npv,
    threshold, positive_class are added; for K > 2 the prediction is the argmax.
    """
    names = [str(c) for c in class_names]
    k = len(names)
    y, probs = check_inputs(y, probs, k)
    pos = None
    if k == 2:
        pos = positive_class_index(names) if positive_index is None else int(positive_index)
        threshold = 0.5 if threshold is None else float(threshold)
        pred = binary_predict(probs, pos, threshold)
    else:
        pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=np.arange(k))
    per = {key: v[0] for key, v in cm_metrics(cm[None], None).items()}
    support = cm.sum(axis=1)
    out = {
        "n": int(len(y)),
        "accuracy": _div(np.trace(cm), cm.sum()),
        "balanced_accuracy": json_number(per["balanced_accuracy"]) if support.sum() else None,
        "auroc": _auroc(y, probs, pos),
        "per_class": {n: {"precision": json_number(per["precision"][i]), "recall": json_number(per["recall"][i]),
                          "f1": json_number(per["f1"][i]), "support": int(support[i])} for i, n in enumerate(names)},
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": names,
        **_averages(per, support, cm.sum(axis=0)),
    }
    if k == 2:
        out.update(threshold_metrics(y == pos, probs[:, pos], threshold))
        out["positive_class"] = names[pos]
    return out


def _averages(per: dict, support, predicted) -> dict:
    """macro_avg and weighted_avg of per-class precision/recall/F1. Recall averages over the classes present in
    the set (an absent class has nothing to recall); precision and F1 also over absent classes the model
    predicted (their false alarms count, as in scikit-learn's macro average). A present class never predicted
    counts precision 0."""
    present, used = support > 0, (support > 0) | (predicted > 0)
    out = {}
    for avg in ("macro", "weighted"):
        if not present.any():
            out[f"{avg}_avg"] = {"precision": None, "recall": None, "f1": None}
            continue
        row = {}
        for key in ("precision", "recall", "f1"):
            over = present if key == "recall" or avg == "weighted" else used
            weights = support if avg == "weighted" else np.ones(len(support))
            row[key] = float(np.average(np.nan_to_num(per[key][over]), weights=weights[over]))
        out[f"{avg}_avg"] = row
    return out


def default_selection_metric(n_classes: int) -> str:
    """The validation metric used for model selection by default: "auroc" for 2 classes, else "macro_f1"."""
    return "auroc" if n_classes == 2 else "macro_f1"


def selection_score(metric_name: str, y, probs) -> float:
    """Value of a validation metric by name, higher is better (so "loss" is the negative log loss).

    Names: auroc, macro_f1, balanced_accuracy, accuracy, loss. Predictions are the argmax. NaN when the metric
    is undefined (AUROC with a class missing from ``y``).
    """
    if metric_name not in SELECTION_METRICS:
        raise ConfigError(f"unknown selection metric {metric_name!r}; choose one of {SELECTION_METRICS}")
    y, probs = check_inputs(y, probs)
    if metric_name == "loss":
        return -float(log_loss(y, np.clip(probs, _EPS, 1.0), labels=np.arange(probs.shape[1])))
    if metric_name == "auroc":
        # Binary AUROC is the same for either class as positive, so no class names are needed.
        value = _auroc(y, probs, 1)
        return float("nan") if value is None else value
    m = cm_metrics(confusion_batch(y, probs.argmax(1), probs.shape[1], np.ones((1, len(y)))), None)
    return float(m[metric_name][0])


def confusion_batch(y, pred, k: int, weights) -> np.ndarray:
    """(B, K, K) weighted confusion matrices, one per row of weights (B, n)."""
    cell = np.zeros((len(y), k * k))
    cell[np.arange(len(y)), y * k + pred] = 1.0
    return (np.asarray(weights, dtype=float) @ cell).reshape(-1, k, k)


def cm_metrics(cm, pos: int | None) -> dict:
    """Vectorised metrics from (B, K, K) confusion matrices.

    Every metric is NaN when undefined (empty denominator) so that the bootstrap skips those resamples:
    precision when nothing is predicted as the class, recall without support, F1 with neither. Balanced accuracy
    averages over the classes present (support > 0), macro-F1 also over absent classes that were predicted.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        present, used = support > 0, (support > 0) | (predicted > 0)
        recall = np.where(present, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        f1_den = support + predicted
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, np.nan)
        out = {"accuracy": tp.sum(1) / cm.sum((1, 2)),
               "balanced_accuracy": np.nansum(recall, axis=1) / present.sum(1),
               "macro_f1": np.nansum(np.where(used, f1, 0.0), axis=1) / used.sum(1),
               "recall": recall, "precision": precision, "f1": f1}
        if pos is not None:
            neg = 1 - pos
            t_p, f_n, f_p, t_n = cm[:, pos, pos], cm[:, pos, neg], cm[:, neg, pos], cm[:, neg, neg]
            for name, a, b in (("sensitivity", t_p, f_n), ("specificity", t_n, f_p),
                               ("ppv", t_p, f_p), ("npv", t_n, f_n)):
                out[name] = np.where(a + b > 0, a / (a + b), np.nan)
    return out


# ----------------------------------------------------------------------------- thresholds

def _roc_pick(y_bin, scores, pick) -> float:
    """Threshold at ROC index ``pick(fpr, tpr)``; thresholds are observed scores, the "predict nothing" point
    sits just above the top score (finite, JSON-safe). 0.5 with a warning when a class is absent."""
    y_bin = np.asarray(y_bin).astype(bool).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if y_bin.all() or not y_bin.any():
        logger.warning("threshold search needs both classes; %d of %d are positive, using 0.5",
                       int(y_bin.sum()), len(y_bin))
        return 0.5
    fpr, tpr, thr = roc_curve(y_bin, scores, drop_intermediate=False)
    thr = thr.astype(float)
    # Just above the top score; with a saturated score of exactly 1.0 that is the float after 1.0, which predict,
    # serve and export accept (`checkpoint.MAX_THRESHOLD`): capping it at 1.0 would call the 1.0 scores positive.
    thr[0] = np.nextafter(scores.max(), np.inf)
    return float(thr[int(pick(fpr, tpr))])


def youden_threshold(y_bin, scores) -> float:
    """Threshold maximising sensitivity + specificity - 1 (predict positive when score >= t).

    The threshold is an observed score; ties go to the highest threshold. 0.5 if a class is absent.
    """
    # A tolerance, because equal J values computed from different fractions can differ in the last bit.
    return _roc_pick(y_bin, scores, lambda fpr, tpr: np.flatnonzero(tpr - fpr >= np.max(tpr - fpr) - 1e-12)[0])


def threshold_for_sensitivity(y_bin, scores, target: float = 0.95) -> float:
    """Highest threshold whose sensitivity is >= target (0.5 if a class is absent)."""
    # tpr rises as the threshold falls, so the first point reaching the target has the highest threshold.
    return _roc_pick(y_bin, scores, lambda fpr, tpr: np.argmax(tpr >= target - 1e-12))


def threshold_for_specificity(y_bin, scores, target: float = 0.95) -> float:
    """Lowest threshold whose specificity is >= target (0.5 if a class is absent)."""
    # fpr rises as the threshold falls; index 0 (predict nothing) always qualifies.
    return _roc_pick(y_bin, scores, lambda fpr, tpr: np.flatnonzero(1.0 - fpr >= target - 1e-12)[-1])


def operating_points(y_bin, scores, sensitivity_target: float = 0.95, specificity_target: float = 0.95,
                     screening_sensitivity: float = 0.90) -> dict:
    """Named thresholds: {"default": Youden, "high_sensitivity": ..., "high_specificity": ..., "screening": ...};
    screening reaches validation sensitivity >= 0.90 (by default) and is never less sensitive than the default
    (it is the default when the Youden point already reaches the target)."""
    default = youden_threshold(y_bin, scores)
    return {"default": default,
            "high_sensitivity": threshold_for_sensitivity(y_bin, scores, sensitivity_target),
            "high_specificity": threshold_for_specificity(y_bin, scores, specificity_target),
            "screening": min(default, threshold_for_sensitivity(y_bin, scores, screening_sensitivity))}


def threshold_metrics(y_bin, scores, t: float) -> dict:
    """{sensitivity, specificity, ppv, npv, threshold} when predicting positive for score >= t; a value whose
    denominator is empty (e.g. ppv when nothing is predicted positive) is None."""
    y_bin = np.asarray(y_bin).astype(bool).ravel()
    pred = np.asarray(scores, dtype=float).ravel() >= t
    tp, fn = int(np.sum(pred & y_bin)), int(np.sum(~pred & y_bin))
    fp, tn = int(np.sum(pred & ~y_bin)), int(np.sum(~pred & ~y_bin))
    return {"sensitivity": _div(tp, tp + fn), "specificity": _div(tn, tn + fp),
            "ppv": _div(tp, tp + fp), "npv": _div(tn, tn + fn), "threshold": float(t)}


# ----------------------------------------------------------------------------- probabilities

def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    return special.softmax(np.asarray(logits, dtype=float) / float(temperature), axis=1)


# ----------------------------------------------------------------------------- ensembles, shift, errors

def average_probs(list_of_probs: Sequence, weights=None) -> np.ndarray:
    """Weighted average of (n, K) probability arrays (equal weights by default); rows renormalised."""
    stack = np.stack([np.asarray(p, dtype=float) for p in list_of_probs])
    w = np.full(len(stack), 1.0 / len(stack)) if weights is None else np.asarray(weights, dtype=float)
    avg = np.tensordot(w, stack, axes=1)
    return avg / avg.sum(axis=1, keepdims=True)


def fit_ensemble_weights(list_of_probs: Sequence, y) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the validation NLL of the weighted average."""
    y = np.asarray(y).astype(int).ravel()
    q = np.stack([np.asarray(p, dtype=float)[np.arange(len(y)), y] for p in list_of_probs], axis=1)
    m = q.shape[1]
    if m == 1:
        return np.ones(1)

    def nll(w):
        mix = np.clip(q @ w, _EPS, None)
        return float(-np.mean(np.log(mix))), -np.mean(q / mix[:, None], axis=0)

    res = optimize.minimize(nll, np.full(m, 1.0 / m), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def _headline(metrics: dict) -> dict:
    """Headline numbers from classification_metrics or metrics_with_ci output."""
    out = {}
    for key in ("accuracy", "balanced_accuracy", "auroc", "macro_f1", "sensitivity", "specificity", "ppv", "npv"):
        v = metrics.get(key)
        if key == "macro_f1" and v is None and "macro_avg" in metrics:
            v = metrics["macro_avg"]["f1"]
        out[key] = v.get("value") if isinstance(v, dict) else v
    return out


def _flat_scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=float)
    return s.max(axis=1) if s.ndim == 2 else s.ravel()


def _score_stats(s) -> dict:
    q = np.percentile(s, [5, 25, 50, 75, 95]) if len(s) else [None] * 5
    return {"n": int(len(s)), "mean": json_number(s.mean()) if len(s) else None,
            "std": json_number(s.std()) if len(s) else None,
            **{k: json_number(v) for k, v in zip(("q05", "q25", "median", "q75", "q95"), q, strict=True)}}


def domain_shift_summary(metrics_a: dict, metrics_b: dict, scores_a, scores_b) -> dict:
    """How test set b differs from test set a (e.g. internal vs external).

    Returns {"metric_diff": {metric: b - a or None}, "metrics_a", "metrics_b", "scores_a", "scores_b"
    (n, mean, std, quantiles), "ks_statistic", "ks_pvalue"}. Scores are 1-D (probability of the positive
    class) or (n, K), in which case the top-label confidence is compared.
    """
    ha, hb = _headline(metrics_a), _headline(metrics_b)
    diff = {k: (float(hb[k] - ha[k]) if ha[k] is not None and hb[k] is not None else None) for k in ha}
    fa, fb = _flat_scores(scores_a), _flat_scores(scores_b)
    ks = stats.ks_2samp(fa, fb) if len(fa) and len(fb) else None
    return {"metric_diff": diff, "metrics_a": ha, "metrics_b": hb,
            "scores_a": _score_stats(fa), "scores_b": _score_stats(fb),
            "ks_statistic": float(ks.statistic) if ks else None, "ks_pvalue": float(ks.pvalue) if ks else None}


def per_sample_loss(y, probs) -> np.ndarray:
    """Cross-entropy of each row: -log p(true class), clipped at 1e-12."""
    y, probs = check_inputs(y, probs)
    return -np.log(np.clip(probs[np.arange(len(y)), y], _EPS, None))


def ranked_errors(y, probs, k_per_class: int = 8, pred=None) -> dict[int, list[int]]:
    """Most confident mistakes per true class: {true class index: row indices, most confident first}.

    A mistake is ``pred != y`` (``pred`` defaults to the argmax; pass thresholded predictions for binary);
    confidence is the probability given to the wrong predicted class.
    """
    y, probs = check_inputs(y, probs)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred).astype(int).ravel()
    conf = probs[np.arange(len(y)), pred]
    out = {}
    for c in range(probs.shape[1]):
        wrong = np.flatnonzero((y == c) & (pred != c))
        order = wrong[np.argsort(-conf[wrong], kind="stable")]
        out[c] = [int(i) for i in order[:k_per_class]]
    return out
