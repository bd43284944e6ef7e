"""Bootstrap confidence intervals that resample the manifest's groups (duplicates; patients, given
`prepare --group-col`), not images.

`metrics_with_ci(...)` gives every headline metric as {value, low, high}; `bootstrap_ci(fn, ...)` does the same
for any metric function. Seeded and repeatable; vectorised so 1,000 resamples of 1,000 images take ~0.1 s.

A percentile bootstrap is only as good as the number of groups it resamples: every interval also says whether it
is `reliable` (with a `note` when not), and metrics_with_ci lists `warnings` for the report.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .calibration import expected_calibration_error, per_sample_brier
from .metrics import (binary_predict, check_inputs, cm_metrics, confusion_batch, json_number, per_sample_loss,
                      positive_class_index)

logger = logging.getLogger(__name__)

# Fewer groups than this (in the set, or in a class a metric depends on): the percentile interval is too narrow
# to trust (about 73 % coverage for sensitivity on 7 + 7 images) and is reported as n/a.
MIN_GROUPS = 10
# An interval defined on fewer resamples than this share describes a conditional distribution, not the metric's.
MIN_VALID_FRACTION = 0.9
MIN_RESAMPLES = 200  # below this the percentile interval is noise; evaluate defaults to 1000


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
    """{value, low, high, n_boot_valid, reliable, note}; `reliable` is False (with a note) when the metric is
    undefined, the interval has zero width although the metric is defined (a percentile bootstrap cannot bound a
    proportion of 0 or 1), fewer than MIN_VALID_FRACTION of the resamples were defined, or fewer than
    MIN_RESAMPLES were (the 2.5th and 97.5th percentiles of a handful of values are not a 95 % interval)."""
    values = np.asarray(values, dtype=float)
    valid = values[np.isfinite(values)]
    low, high = (np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(valid) else (None, None))
    out = {"value": json_number(value), "low": json_number(low), "high": json_number(high),
           "n_boot_valid": int(len(valid)), "reliable": True, "note": None}
    if out["value"] is None:
        return _unreliable(out, "undefined on this set")
    if out["low"] is not None and out["low"] == out["high"]:
        return _unreliable(out, f"n/a: zero width (every resample gave {out['low']:.4g})")
    if len(valid) < MIN_VALID_FRACTION * len(values):
        return _unreliable(out, f"only {len(valid)} of {len(values)} resamples defined")
    if len(valid) < MIN_RESAMPLES:
        return _unreliable(out, f"only {len(valid)} resamples: too few for a 95 % interval (use 1000)")
    return out


def _unreliable(interval: dict, note: str) -> dict:
    """The interval marked unreliable; an existing note is kept first (the more basic reason)."""
    notes = [n for n in (interval.get("note"), note) if n]
    return {**interval, "reliable": False, "note": "; ".join(notes)}


def bootstrap_ci(fn: Callable, y, probs, groups=None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """Percentile bootstrap interval of ``fn(y, probs) -> float``.

    With ``groups`` whole groups are resampled (every image of a drawn group comes along), else rows.
    Resamples where fn raises or returns a non-finite value are skipped. Returns {"value", "low", "high",
    "n_boot_valid", "reliable", "note"} (see `_interval`); seeded and repeatable.
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


def _headline_batch(y, probs, pred, pos, weights, per_row: dict) -> dict:
    k = probs.shape[1]
    out = cm_metrics(confusion_batch(y, pred, k, weights), pos)
    # Brier and NLL are means over images (`per_row`: each image's term), so a resample's value is a weighted mean.
    weights = np.asarray(weights, dtype=float)
    for name, terms in per_row.items():
        out[name] = weights @ terms / weights.sum(axis=1)
    if k == 2:
        out["auroc"] = _auc_batch(y == pos, probs[:, pos], weights)
    else:
        # One-vs-rest macro: undefined (NaN) whenever any class is missing from the resample.
        out["auroc"] = np.mean([_auc_batch(y == c, probs[:, c], weights) for c in range(k)], axis=0)
    return out


def metrics_with_ci(y, probs, class_names: Sequence[str], groups=None, positive_index: int | None = None,
                    threshold: float | None = None, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> dict:
    """Headline metrics each as {"value", "low", "high", "n_boot_valid", "reliable", "note"} (percentile
    bootstrap, groups whole).

    Keys: accuracy, balanced_accuracy, auroc, macro_f1, brier, nll; binary adds sensitivity, specificity, ppv, npv
    (at ``threshold``, default 0.5); per_class_precision, per_class_recall and per_class_f1 map each class name to
    an interval. Also n_boot, alpha, resampling, n_groups, groups_per_class (groups holding an image of the class)
    and warnings (sentences for the report). An interval is unreliable when a class it depends on (or the whole
    set) has fewer than MIN_GROUPS groups, besides the reasons in `_interval`.
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
    per_row = {"brier": per_sample_brier(y, probs), "nll": per_sample_loss(y, probs)}
    point = _headline_batch(y, probs, pred, pos, np.ones((1, len(y))), per_row)
    chunks = [_headline_batch(y, probs, pred, pos, w, per_row) for w in _weight_chunks(len(y), groups, n_boot, seed)]
    boot = {key: np.concatenate([c[key] for c in chunks]) for key in point}
    keys = ["accuracy", "balanced_accuracy", "auroc", "macro_f1", "brier", "nll"]
    keys += ["sensitivity", "specificity", "ppv", "npv"] if pos is not None else []
    out = {key: _interval(boot[key], point[key][0], alpha) for key in keys}
    for metric in ("precision", "recall", "f1"):
        out[f"per_class_{metric}"] = {n: _interval(boot[metric][:, i], point[metric][0, i], alpha)
                                      for i, n in enumerate(names)}
    counts = group_counts(y, groups, len(names))
    _flag_small_groups(out, counts, names, pos)
    warnings_ = _ci_warnings(out, counts, names)
    out.update(n_boot=int(n_boot), alpha=float(alpha), resampling="group" if groups is not None else "row",
               n_groups=counts["all"], groups_per_class={n: counts[i] for i, n in enumerate(names)},
               warnings=warnings_)
    return out


def group_counts(y, groups, k: int) -> dict:
    """{class index: number of groups holding an image of it, "all": number of groups}; rows when groups is None."""
    keys = np.arange(len(y)) if groups is None else np.asarray(groups).astype(str)
    out = {c: len(np.unique(keys[y == c])) for c in range(k)}
    out["all"] = len(np.unique(keys))
    return out


def _depends_on(key: str, cls: str | None, names: list[str], pos: int | None) -> list[int]:
    """Classes whose group count limits an interval: the class itself for a recall, the positive (negative) class
    for sensitivity (specificity), else every class present."""
    if key == "per_class_recall":
        return [names.index(cls)]
    if key in ("sensitivity", "specificity") and pos is not None:
        return [pos if key == "sensitivity" else 1 - pos]
    return list(range(len(names)))


def _flag_small_groups(out: dict, counts: dict, names: list[str], pos: int | None) -> None:
    """Mark (in place) the intervals resting on fewer than MIN_GROUPS groups as n/a."""
    for key, item in list(out.items()):
        if key.startswith("per_class_"):
            for cls in item:
                item[cls] = _small_group_flag(item[cls], _small_group_note(counts, _depends_on(key, cls, names, pos),
                                                                           names))
        else:
            out[key] = _small_group_flag(item, _small_group_note(counts, _depends_on(key, None, names, pos), names))


def _small_group_note(counts: dict, classes: list[int], names: list[str]) -> str | None:
    fewest = min((c for c in classes if counts[c] > 0), key=lambda c: counts[c], default=None)
    if counts["all"] < MIN_GROUPS:
        return f"n/a: {counts['all']} group{'s' * (counts['all'] != 1)} in all"
    if fewest is not None and counts[fewest] < MIN_GROUPS:
        return f"n/a: {counts[fewest]} group{'s' * (counts[fewest] != 1)} of {names[fewest]}"
    return None


def _small_group_flag(interval: dict, note: str | None) -> dict:
    """Too few groups is the basic reason, so it comes first; a zero width then adds nothing."""
    if note is None or interval["value"] is None:
        return interval
    rest = interval["note"] if interval["note"] and "zero width" not in interval["note"] else None
    return {**interval, "reliable": False, "note": "; ".join(n for n in (note, rest) if n)}


def _ci_warnings(out: dict, counts: dict, names: list[str]) -> list[str]:
    """Sentences for the report: too few groups, zero-width and rarely defined intervals."""
    warn = []
    if counts["all"] < MIN_GROUPS:
        warn.append(f"the set has {counts['all']} group(s), fewer than the {MIN_GROUPS} a bootstrap interval needs: "
                    "no interval is shown")
    small = [f"{n} ({counts[i]})" for i, n in enumerate(names) if 0 < counts[i] < MIN_GROUPS]
    if small and counts["all"] >= MIN_GROUPS:
        warn.append(f"fewer than {MIN_GROUPS} groups in class(es) {', '.join(small)}: intervals depending on them "
                    "are not shown (their coverage falls well short of 95 %)")
    flat = [v for k, item in out.items() for v in (item.values() if k.startswith("per_class_") else [item])]
    zero = sum(1 for v in flat if "zero width" in (v["note"] or ""))
    if zero:
        warn.append(f"{zero} interval(s) have zero width although the metric is defined (e.g. a proportion of 0 or "
                    "1): a percentile bootstrap cannot bound them, shown as n/a")
    rare = sum(1 for v in flat if "resamples defined" in (v["note"] or ""))
    if rare:
        warn.append(f"{rare} interval(s) were defined on fewer than {MIN_VALID_FRACTION:.0%} of the resamples: "
                    "flagged as unreliable")
    return warn


def ece_if_calibrated(probs, n_bins: int = 15, n_sim: int = 200, seed: int = 0) -> float:
    """Mean ECE a perfectly calibrated model with these probabilities would get on this many images (labels drawn
    from each row's probabilities): ECE is biased upward on small sets, so compare the measured ECE to this."""
    _, probs = check_inputs(np.zeros(len(probs), int), probs)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    sims = []
    for _ in range(n_sim):
        draw = (rng.random((len(probs), 1)) > cum).sum(axis=1)
        sims.append(expected_calibration_error(np.minimum(draw, probs.shape[1] - 1), probs, n_bins))
    return float(np.mean(sims))
