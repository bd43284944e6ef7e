"""Bootstrap confidence intervals that resample the manifest's groups (duplicates; patients, given
`prepare --group-col`), not images.

`metrics_with_ci(...)` gives every headline metric as {value, low, high}; `bootstrap_ci(fn, ...)` does the same
for any metric function. Seeded and repeatable; vectorised so 1,000 resamples of 1,000 images take ~0.1 s.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .metrics import (binary_predict, check_inputs, cm_metrics, confusion_batch, json_number,
                              positive_class_index)

logger = logging.getLogger(__name__)


def _weight_chunks(n: int, groups, n_boot: int, seed: int, chunk: int = 250):
    """Yield (c, n) row multiplicities for bootstrap resamples; groups are drawn whole, with replacement."""
    if groups is None:
        inverse = np.arange(n)
    else:
        inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()
    n_groups = int(inverse.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(c, n_groups))
        flat = draws + np.arange(c)[:, None] * n_groups
        counts = np.bincount(flat.ravel(), minlength=c * n_groups).reshape(c, n_groups)
        yield counts[:, inverse]


def _interval(values, value, alpha: float) -> dict:
    values = np.asarray(values, dtype=float)
    valid = values[np.isfinite(values)]
    low, high = (np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(valid) else (None, None))
    return {"value": json_number(value), "low": json_number(low), "high": json_number(high),
            "n_boot_valid": int(len(valid))}


def bootstrap_ci(fn: Callable, y, probs, groups=None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """Percentile bootstrap interval of ``fn(y, probs) -> float``.

    With ``groups`` whole groups are resampled (every image of a drawn group comes along), else rows.
    Resamples where fn raises or returns a non-finite value are skipped. Returns {"value", "low", "high",
    "n_boot_valid"}; seeded and repeatable.
    """
    y, probs = check_inputs(y, probs)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = _safe_call(fn, y, probs)
        for weights in _weight_chunks(len(y), groups, n_boot, seed):
            for w in weights:
                idx = np.repeat(np.arange(len(y)), w)
                values.append(_safe_call(fn, y[idx], probs[idx]))
    out = _interval(values, value, alpha)
    if out["n_boot_valid"] < n_boot:
        logger.info("bootstrap: %d of %d resamples undefined and skipped", n_boot - out["n_boot_valid"], n_boot)
    return out


def _safe_call(fn, y, probs) -> float:
    try:
        v = fn(y, probs)
        return float("nan") if v is None else float(v)
    except (ValueError, ZeroDivisionError, FloatingPointError, IndexError):
        return float("nan")


def _auc_batch(is_pos, scores, weights) -> np.ndarray:
    """Weighted Mann-Whitney AUROC per row of weights (ties count 1/2); NaN when a class has no weight."""
    _, level = np.unique(scores, return_inverse=True)
    order = np.argsort(level, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(level[order]) > 0])
    w = np.asarray(weights, dtype=float)[:, order]
    pos_lvl = np.add.reduceat(w * is_pos[order], starts, axis=1)
    neg_lvl = np.add.reduceat(w * ~is_pos[order], starts, axis=1)
    neg_below = np.cumsum(neg_lvl, axis=1) - neg_lvl
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.sum(pos_lvl * (neg_below + 0.5 * neg_lvl), axis=1)
        den = pos_lvl.sum(1) * neg_lvl.sum(1)
        return np.where(den > 0, num / den, np.nan)


def _headline_batch(y, probs, pred, pos, weights) -> dict:
    k = probs.shape[1]
    out = cm_metrics(confusion_batch(y, pred, k, weights), pos)
    if k == 2:
        out["auroc"] = _auc_batch(y == pos, probs[:, pos], weights)
    else:
        # One-vs-rest macro: undefined (NaN) whenever any class is missing from the resample.
        out["auroc"] = np.mean([_auc_batch(y == c, probs[:, c], weights) for c in range(k)], axis=0)
    return out


def metrics_with_ci(y, probs, class_names: Sequence[str], groups=None, positive_index: int | None = None,
                    threshold: float | None = None, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> dict:
    """Headline metrics each as {"value", "low", "high", "n_boot_valid"} (percentile bootstrap, groups whole).

    Keys: accuracy, balanced_accuracy, auroc, macro_f1; binary adds sensitivity, specificity, ppv, npv (at
    ``threshold``, default 0.5); per_class_precision, per_class_recall and per_class_f1 map each class name to
    an interval. Also n_boot, alpha, resampling.
    Uses the same resamples as ``bootstrap_ci`` with the same seed and groups. A value undefined on the whole
    set (e.g. sensitivity without positives) is None; resamples where it is undefined are skipped.
    """
    names = [str(c) for c in class_names]
    y, probs = check_inputs(y, probs, len(names))
    pos = None
    if len(names) == 2:
        pos = positive_class_index(names) if positive_index is None else int(positive_index)
        pred = binary_predict(probs, pos, 0.5 if threshold is None else float(threshold))
    else:
        pred = probs.argmax(axis=1)
    point = _headline_batch(y, probs, pred, pos, np.ones((1, len(y))))
    chunks = [_headline_batch(y, probs, pred, pos, w) for w in _weight_chunks(len(y), groups, n_boot, seed)]
    boot = {key: np.concatenate([c[key] for c in chunks]) for key in point}
    keys = ["accuracy", "balanced_accuracy", "auroc", "macro_f1"]
    keys += ["sensitivity", "specificity", "ppv", "npv"] if pos is not None else []
    out = {key: _interval(boot[key], point[key][0], alpha) for key in keys}
    for metric in ("precision", "recall", "f1"):
        out[f"per_class_{metric}"] = {n: _interval(boot[metric][:, i], point[metric][0, i], alpha)
                                      for i, n in enumerate(names)}
    out.update(n_boot=int(n_boot), alpha=float(alpha), resampling="group" if groups is not None else "row")
    return out


