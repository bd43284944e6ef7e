"""Probabilities that mean what they say: temperature scaling fitted on validation, the numbers that judge it
(reliability curve, expected calibration error, Brier score, log loss), and `calibration_meta`, what training and
`bonefrac calibrate` save in a checkpoint (temperature, decision threshold, operating points).
Pure functions on numpy arrays, with metrics.py's conventions."""

from __future__ import annotations

import logging

import numpy as np
from scipy import optimize, special

from . import metrics
from .metrics import check_inputs, per_sample_loss

logger = logging.getLogger(__name__)


def fit_temperature(logits, y, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (temperature scaling, fit on validation).

    Returns 1.0 with a warning when the model classifies every validation image correctly: the NLL then keeps
    falling as T -> 0, turning every probability into 0 or 1 so that no threshold can be chosen. An optimum at a
    bound otherwise is kept (the bound), with a warning."""
    logits = np.asarray(logits, dtype=float)
    y, _ = check_inputs(y, logits)
    true_logit = logits[np.arange(len(y)), y]

    def nll(log_t):
        t = np.exp(log_t)
        return float(np.mean(special.logsumexp(logits / t, axis=1) - true_logit / t))

    # Searching log T keeps the scale even between over- and under-confident models.
    others = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits)
    if len(y) and (true_logit > others.max(axis=1)).all():
        logger.warning("every one of the %d validation images is classified correctly: no temperature can be "
                       "fitted (it would go to 0); keeping T = 1", len(y))
        return 1.0
    lo, hi = np.log(bounds)
    res = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    if min(res.x - lo, hi - res.x) < 1e-3:
        logger.warning("temperature fit ran into its bound T = %.3g", float(np.exp(res.x)))
    return float(np.exp(res.x))


def reliability_curve(y, probs, n_bins: int = 15) -> dict:
    """Top-label reliability over equal-width confidence bins (lo, hi].

    Returns arrays of length n_bins: "confidence" (mean top probability, NaN if empty), "accuracy" (NaN if
    empty), "count"; plus "edges" (n_bins + 1).
    """
    y, probs = check_inputs(y, probs)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"confidence": mean_conf, "accuracy": acc, "count": count, "edges": edges}


def expected_calibration_error(y, probs, n_bins: int = 15) -> float:
    """ECE: sum over bins of (bin share) * |accuracy - mean confidence|, top-label, equal-width bins."""
    curve = reliability_curve(y, probs, n_bins)
    filled = curve["count"] > 0
    gap = np.abs(curve["accuracy"][filled] - curve["confidence"][filled])
    return float(np.sum(curve["count"][filled] * gap) / max(curve["count"].sum(), 1))


def brier_score(y, probs) -> float:
    """Brier score, lower is better. Binary: mean (p(class 1) - [y = 1])^2, as sklearn's brier_score_loss (the
    same for either class as positive); K > 2: mean over images of the sum over classes of (p_k - [y = k])^2."""
    return float(per_sample_brier(y, probs).mean())


def per_sample_brier(y, probs) -> np.ndarray:
    """Each row's term of `brier_score` (binary: (p(class 1) - [y = 1])^2; K > 2: the sum over classes)."""
    y, probs = check_inputs(y, probs)
    sq = (probs - np.eye(probs.shape[1])[y]) ** 2
    return sq[:, 1] if probs.shape[1] == 2 else sq.sum(axis=1)


def negative_log_likelihood(y, probs) -> float:
    """Mean -log p(true class) (log loss; probabilities clipped at 1e-12), lower is better."""
    return float(per_sample_loss(y, probs).mean())



def calibration_meta(val_logits, val_y, class_names, pos, monitor, score) -> dict:
    """Temperature, decision threshold and operating points fitted on validation, for the checkpoint."""
    # One class only: any temperature "fits" by pushing every probability towards it; keep the model's own.
    temperature = fit_temperature(val_logits, val_y) if len(np.unique(val_y)) > 1 else 1.0
    probs = metrics.softmax(val_logits, temperature)
    out = {"temperature": temperature, "threshold": None, "operating_points": None,
           "val_metrics": {"monitor": monitor, "score": score, "n": int(len(val_y))}}
    if pos is not None and len(np.unique(val_y)) == 2:
        y_bin = (val_y == pos).astype(int)
        points = metrics.operating_points(y_bin, probs[:, pos])
        out["operating_points"] = points
        out["threshold"] = points["default"]
    out["val_metrics"].update(metrics.classification_metrics(val_y, probs, class_names, pos, out["threshold"]))
    return out

