"""The HTML report of `bonefrac evaluate`: which sections, in which order, with which warnings.

`write_report(...)` turns the metrics dict that evaluate writes to metrics.json into plots and report.html;
`set_warnings(...)` lists what makes a set's metrics degenerate (one class, TTA on thresholds fitted without it),
for metrics.json and the report alike. The plots and the HTML writer themselves live in `report`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import metrics, report
from .errors import BonefracError
from .io import read_image

log = logging.getLogger(__name__)

# Below this many images the ECE of even a perfectly calibrated model is far from 0 (about 0.22 on 14 images).
ECE_SMALL_N = 500


def set_warnings(y, names: list[str], pos: int | None, tta: bool, split: str = "test") -> list[str]:
    """Sentences on what this set or these settings leave undefined or untrustworthy (empty when nothing)."""
    out = []
    present = set(np.unique(y).tolist())
    missing = [n for i, n in enumerate(names) if i not in present]
    if len(present) == 1:
        only = next(iter(present))
        undefined = "AUROC is"
        if pos is not None:
            undefined = f"AUROC and {'specificity' if only == pos else 'sensitivity'} are"
        out.append(f"the {split} split has one class ({names[only]}): {undefined} undefined, and the ROC and "
                   "precision-recall plots are empty")
    elif missing:
        out.append(f"class(es) {', '.join(missing)} are absent from the {split} split: the macro AUROC and their "
                   "recall are undefined")
    if tta:
        out.append("--tta is on, but the temperature and thresholds were fitted on validation without it: averaged "
                   "TTA probabilities are less extreme, so calibration and operating points may not hold here")
    return out


def write_report(out_dir: Path, result: dict, rows, y, probs, pred, pos, points, ref, predictor) -> None:
    """Plots, error and Grad-CAM grids, and report.html in out_dir, from evaluate's result dict."""
    names = result["class_names"]
    plots = [report.plot_confusion_matrix(result["confusion_matrix"], names, out_dir / "confusion_matrix.png"),
             report.plot_roc(y, probs, names, out_dir / "roc.png", pos, points),
             report.plot_pr(y, probs, names, out_dir / "pr.png", pos, points),
             report.plot_reliability(y, probs, out_dir / "reliability.png")]
    sections = _warning_sections(result)
    sections += [("Headline metrics", [_settings(result), _headline(result)]), ("Data", [_summary(result, rows, y)])]
    if result.get("one_vs_rest"):
        sections.append(_one_vs_rest_section(result))
    if "ci" in result:
        sections.append(_ci_section(result["ci"]))
    sections.append(("Per class", [[{"class": c, **v, **_class_intervals(result.get("ci", {}), c)}
                                     for c, v in result["per_class"].items()]]))
    sections += _operating_sections(result)
    sections.append(("Curves", _curve_notes(result) + plots[1:3]))
    sections.append(("Calibration", _calibration_items(result) + [plots[3]]))
    sections.append(("Confusion matrix", [plots[0]]))
    errors = _error_grid(out_dir, rows, y, probs, pred, names)
    if errors:
        sections.append(("Most confident mistakes", [errors]))
    cams = _gradcam_grid(out_dir, predictor, rows, y, probs, pred, names, pos)
    if cams:
        sections.append(("Grad-CAM: where the model looked (predicted class; red = most influential)",
                         ["Most confident correct positives first, then the most confident mistakes. Heatmaps "
                          "show evidence for the predicted class, not a localisation of the fracture.", cams]))
    if ref is not None and "domain_shift" in result:
        scores = {"reference": ref["scores"], "this set": np.asarray(result["scores"], dtype=float)}
        dist = report.plot_score_distributions(scores, out_dir / "score_shift.png", xlabel=result["score_type"])
        sections.append(("Domain shift against the reference set",
                         [f"Compared score: {result['score_type']}.", result["domain_shift"]["metric_diff"], dist]))
    report.html_report(out_dir / "report.html", title=f"bonefrac evaluation ({result['split']})", sections=sections)


def _warning_sections(result: dict) -> list[tuple]:
    out = []
    seen = result.get("seen_by_model")
    if seen and (seen["train"] or seen["val"]):
        out.append(("Warning: the model has seen some of these images",
                    ["Images of this set were in the model's training or validation split (counts below): "
                     "every metric here is optimistic.", seen]))
    if result.get("warnings"):
        out.append(("Warnings", [f"Warning: {w}." for w in result["warnings"]]))
    return out


def _settings(result: dict) -> dict:
    """What was evaluated and how: the numbers below mean little without it."""
    return {"models": result["models"], "manifest": result["manifest"], "split": result["split"],
            "test-time augmentation (--tta)": "on" if result.get("tta") else "off",
            "positive class": result.get("positive_class") or (result.get("one_vs_rest") or {}).get("positive_class")
            or "none (most probable class)",
            "threshold": _threshold_text(result)}


def _threshold_text(result: dict) -> str:
    t, source = result.get("threshold"), result.get("threshold_source", "")
    if t is None:
        return source or "none: the prediction is the most probable class"
    return f"p({result['positive_class']}) >= {t:.4g}: {source}"


def _summary(result: dict, rows, y) -> dict:
    names = result["class_names"]
    return {"images": result["n"], "groups": int(rows.group.nunique()), "split": result["split"],
            **{f"n_{c}": int((y == i).sum()) for i, c in enumerate(names)}}


def _headline(result: dict) -> dict:
    """Point values, named so that a reader sees the positive class and what the AUROC averages."""
    pc = result.get("positive_class")
    auroc = "AUROC" if len(result["class_names"]) == 2 else "AUROC (macro one-vs-rest)"
    rows = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auroc": auroc,
            "sensitivity": f"sensitivity ({pc})", "specificity": f"specificity ({pc})", "ppv": f"PPV ({pc})",
            "npv": f"NPV ({pc})"}
    return {label: result.get(key) for key, label in rows.items() if result.get(key) is not None}


def _one_vs_rest_section(result: dict) -> tuple:
    """--positive-class on a K-class model: that class against the rest."""
    ovr = result["one_vs_rest"]
    pc = ovr["positive_class"]
    return (f"{pc} against the rest (one-vs-rest)",
            [f"Sensitivity and specificity of the model's own decision (the most probable class is {pc}, or not); "
             f"AUROC of p({pc}).", ovr])


def _ci_section(ci: dict) -> tuple:
    """Interval table; unreliable intervals show their note instead of a range."""
    k_classes = len(ci.get("groups_per_class") or {})
    rows = [{"metric": "auroc (macro one-vs-rest)" if k == "auroc" and k_classes > 2 else k, "value": v["value"],
             "95 % interval": report.interval_text(v),
             "resamples defined": f"{v['n_boot_valid']} of {ci['n_boot']}"}
            for k, v in ci.items() if isinstance(v, dict) and "value" in v]
    groups = ", ".join(f"{c}: {n}" for c, n in (ci.get("groups_per_class") or {}).items())
    items = [f"Groups resampled: {ci.get('n_groups')} ({groups})."] if "n_groups" in ci else []
    items += [f"Warning: {w}." for w in ci.get("warnings", [])]
    return ("95 % bootstrap intervals (resampling groups: duplicates, copies, patients)", items + [rows])


def _class_intervals(ci: dict, name: str) -> dict:
    """{"precision 95 % CI": "low-high" or "n/a: ...", ...} for one class from metrics_with_ci's intervals."""
    out = {}
    for metric in ("precision", "recall", "f1"):
        iv = ci.get(f"per_class_{metric}", {}).get(name)
        if iv and iv["value"] is not None:
            out[f"{metric} 95 % CI"] = report.interval_text(iv)
    return out


def _operating_sections(result: dict) -> list[tuple]:
    out = []
    fitted = not result.get("ensemble") or result["ensemble"].get("fitted_on")
    if result.get("operating_points"):
        how = "chosen on validation" if fitted else "the first member's, not fitted for this ensemble"
        notes = [result["operating_points_note"] + "."] if result.get("operating_points_note") else []
        out.append((f"Operating points (thresholds on p({result['positive_class']}), {how})",
                    notes + [[{"point": k, **v} for k, v in result["operating_points"].items()]]))
    if result.get("ensemble"):
        how = "weights fitted on validation" if fitted else "equal weights: no usable val split to fit them on"
        out.append((f"Ensemble ({how})", [result["ensemble"]]))
    return out


def _curve_notes(result: dict) -> list[str]:
    if len(result["class_names"]) == 2:
        return [f"Curves of p({result['positive_class']}); markers are the model's operating points."]
    return ["One curve per class present (one-vs-rest)."]


def _calibration_items(result: dict) -> list:
    cal = result["calibration"]
    items = [cal]
    e0 = cal.get("ece_if_perfectly_calibrated")
    if e0 is not None and result["n"] < ECE_SMALL_N:
        items.insert(0, f"Caveat: ECE is biased upward on small sets. On these {result['n']} images a perfectly "
                        f"calibrated model would score an ECE of about {e0:.3f} (simulated): compare the ECE of "
                        f"{cal['ece']:.3f} with that, not with 0. Brier score and NLL are less affected.")
    if result.get("tta"):
        items.insert(0, "The temperature was fitted on validation without TTA; these probabilities are TTA "
                        "averages, so the calibration shown is not the one that was fitted.")
    return items


def _error_grid(out_dir: Path, rows, y, probs, pred, names) -> Path | None:
    worst = metrics.ranked_errors(y, probs, k_per_class=4, pred=pred)
    picks = [i for c in sorted(worst) for i in worst[c]]
    if not picks:
        return None
    images = [read_image(rows.path[i]) for i in picks]
    titles = [f"true {names[y[i]]}\npred {names[pred[i]]}, p({names[pred[i]]}) {probs[i, pred[i]]:.2f}"
              for i in picks]
    return report.image_grid(images, titles, out_dir / "errors.png", ncols=4)


def _gradcam_grid(out_dir: Path, predictor, rows, y, probs, pred, names, pos, k: int = 4) -> Path | None:
    """Grad-CAM of the k most confident correct positives (correct predictions for K > 2) and the k most
    confident mistakes; None (with a warning) for a model Grad-CAM cannot explain."""
    from .explain import explain_arrays, overlay

    conf = probs[np.arange(len(y)), pred]
    right = np.flatnonzero((pred == y) & ((y == pos) if pos is not None else True))
    wrong = np.flatnonzero(pred != y)
    picks = [("correct", i) for i in right[np.argsort(-conf[right], kind="stable")][:k]]
    picks += [("error", i) for i in wrong[np.argsort(-conf[wrong], kind="stable")][:k]]
    if not picks:
        return None
    images = [read_image(rows.path[i]) for _, i in picks]
    try:
        # The reported prediction's class (an ensemble's may differ from its first member's own choice).
        heatmaps = explain_arrays(predictor, images, [int(pred[i]) for _, i in picks])[0]
    except BonefracError as exc:
        log.warning("no Grad-CAM in the report: %s", exc)
        return None
    titles = [f"{kind}: true {names[y[i]]}\npred {names[pred[i]]}, p({names[pred[i]]}) {conf[i]:.2f}"
              for kind, i in picks]
    tiles = [overlay(img, h) for img, h in zip(images, heatmaps)]
    return report.image_grid(tiles, titles, out_dir / "gradcam.png", ncols=4)
