"""Evaluate a checkpoint (or an ensemble) on a manifest split: the only stage that reads test data.

`evaluate(models, manifest, split, out_dir)` writes `metrics.json` (point values, group-bootstrap 95 % intervals
each marked reliable or not, operating points, calibration, warnings), `predictions.csv` (sorted by loss, worst
first), plots and one self-contained `report.html` (built by `evalreport`). Thresholds come from the checkpoint
(chosen on validation), never from the data evaluated here.

Validation-only helpers live here too: `calibrate(ckpt, manifest)` re-fits a checkpoint's temperature and
operating points, `fit_ensemble(...)` fits an ensemble's weights and threshold and `build_ensemble(...)` writes an
ensemble directory that every command accepts as a checkpoint. Both refuse a val split with fewer than
MIN_VAL_IMAGES images or without every class of the model (see `check_val_split`), or holding images a model was
trained on (`seen.trained_on`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import bootstrap, calibration, checkpoint, evalreport, metrics
from .cache import build_cache
from .errors import BonefracError
from .io import write_atomically
from .manifest import load_manifest
from .predict import ENSEMBLE_FILE, Ensemble, Predictor, decide, load_predictor
from .seen import seen_by_model, trained_on

log = logging.getLogger(__name__)

# Fewest val images that calibrate / ensemble fit on. Below it a temperature, threshold or set of weights is decided
# by a handful of images and replaces a better fit made during training. Not higher: the embedded 100-image
# sample leaves 16 images in val, and the demo must be able to calibrate on it.
MIN_VAL_IMAGES = 10


def predict_manifest(predictor, df: pd.DataFrame, cache_dir: Path) -> np.ndarray:
    """(n, K) calibrated probabilities for manifest rows, decoding through the shared uint8 cache."""
    members = predictor.members if isinstance(predictor, Ensemble) else [predictor]
    weights = predictor.weights if isinstance(predictor, Ensemble) else [1.0]
    total = 0.0
    for weight, member in zip(weights, members):
        cache = build_cache(df.path.tolist(), df.sha256.tolist(), member.size, cache_dir)
        total = total + weight * member.probs_uint8(torch.from_numpy(np.asarray(cache))[:, None])
    return total


def select_rows(df: pd.DataFrame, split: str, class_names: list[str], manifest) -> pd.DataFrame:
    rows = df if split == "all" else df[df.split == split]
    if rows.empty:
        raise BonefracError(f"{manifest}: no rows in split '{split}' (splits present: "
                            f"{', '.join(sorted(df.split.unique()))})")
    unknown = sorted(set(rows.label) - set(class_names))
    if unknown:
        raise BonefracError(f"{manifest}: labels {unknown} are not classes of the model ({class_names})")
    return rows.reset_index(drop=True)


def evaluate(models: list[str], manifest: str | Path, split: str = "test", out_dir: str | Path = "eval",
             positive_class: str | None = None, tta: bool = False, device: str = "auto", n_boot: int = 1000,
             reference: str | None = None, seed: int = 0) -> dict:
    """Compute and write every evaluation artefact; returns the metrics dict (also in metrics.json)."""
    ref = _load_reference(reference) if reference else None  # before inference: a bad path must not cost a run
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = load_predictor(models, device, tta)
    names = predictor.class_names
    pos = predictor.positive_index if positive_class is None else metrics.positive_class_index(names, positive_class)
    if pos is None and len(names) == 2:  # an older checkpoint without positive_index: the class metrics would pick
        pos = metrics.positive_class_index(names)  # this one by name, so scores and references must agree with it
    if ref is not None:
        _check_reference(ref, reference, names, pos)
    df = load_manifest(manifest)
    rows = select_rows(df, split, names, manifest)
    seen = seen_by_model(predictor, rows, split)
    y = rows.label.map({c: i for i, c in enumerate(names)}).to_numpy()
    cache_dir = Path(manifest).parent / "cache"
    ensemble_fit = None
    if isinstance(predictor, Ensemble) and "ensemble_dir" not in predictor.meta:
        ensemble_fit = _fit_loose_ensemble(predictor, df, manifest, cache_dir, split)
    probs = predict_manifest(predictor, rows, cache_dir)
    broken = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(broken):
        raise BonefracError(f"the model gave non-finite probabilities (NaN/inf) for {len(broken)} image(s), e.g. "
                            f"{rows.path.iloc[broken[0]]}; no metrics computed (check the model file)")

    threshold = _threshold_for(predictor, pos)
    probs = _complemented(probs, predictor, pos)
    result = metrics.classification_metrics(y, probs, names, pos, threshold)
    if positive_class is not None and len(names) > 2:  # the K-class metrics above have no positive class
        result["one_vs_rest"] = {"positive_class": names[pos], **metrics.one_vs_rest(y, probs, pos)}
    result.update(split=split, manifest=str(manifest), models=[str(m) for m in models], tta=tta, seen_by_model=seen,
                  score_type=score_type(names, pos), threshold_source=_threshold_source(predictor, pos, ensemble_fit))
    if isinstance(predictor, Ensemble):
        result["ensemble"] = ensemble_fit or {"weights": [float(w) for w in predictor.weights],
                                              "fitted_on": predictor.meta.get("ensemble_dir")}
    result["calibration"] = _calibration(y, probs, getattr(predictor, "temperature", None), seed)
    if n_boot:
        result["ci"] = bootstrap.metrics_with_ci(y, probs, names, rows.group.to_numpy(), pos, threshold, n_boot, seed)
    points, mirrored = _operating_thresholds(predictor, pos)
    if pos is not None and points:
        y_bin = (y == pos).astype(int)
        result["operating_points"] = {k: metrics.threshold_metrics(y_bin, probs[:, pos], t)
                                      for k, t in points.items()}
        if mirrored:
            result["operating_points_note"] = mirrored
    result["warnings"] = evalreport.set_warnings(y, names, pos, tta, split)
    if ensemble_fit and ensemble_fit.get("fitted_on") and split in ("val", "all"):
        result["warnings"].append(f"the ensemble's weights and thresholds were fitted here on this manifest's val "
                                  f"split ({ensemble_fit['val_n']} images), which this '{split}' evaluation "
                                  "includes: its metrics are optimistic")
        log.warning("%s", result["warnings"][-1])
    if ref is not None:
        # rounded as the reference's were when written below, so a set compared with itself shows no shift
        result["domain_shift"] = {**metrics.domain_shift_summary(ref, result, ref["scores"],
                                                                 _scores(probs, pos).round(6)),
                                  "score_type": result["score_type"]}
    if len(names) == 2:  # decide exactly as the metrics above did (at 0.5 when the model has no threshold)
        pred = decide(probs, names.index(result["positive_class"]), result["threshold"])
    else:
        pred = decide(probs, pos, threshold)
    _write_predictions(out_dir, rows, y, probs, pred, names)
    result["scores"] = _scores(probs, pos).round(6).tolist()  # kept for later domain-shift comparisons
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    evalreport.write_report(out_dir, result, rows, y, probs, pred, pos, points, ref, predictor)
    return result


def _threshold_for(predictor, pos: int | None) -> float | None:
    """The threshold on class `pos`'s probability that gives predict's decisions: the model's own for its positive
    class; for the other class of a binary model, predict's rule p(own) < t is p(pos) > 1 - t, i.e. p(pos) >= the
    next float above 1 - t (so a score equal to t still goes to the model's positive class)."""
    own, t = predictor.positive_index, predictor.threshold
    if pos == own or own is None or t is None or len(predictor.class_names) != 2:
        return t if pos == own else None
    flipped = _mirrored(t)
    names = predictor.class_names
    log.info("the model's threshold %.4g is for '%s'; with positive class '%s' the decision is p(%s) > %.4g, "
             "the same as predict's", t, names[own], names[pos], names[pos], 1.0 - t)
    return flipped


def score_type(names: list[str], pos: int | None) -> str:
    """What metrics.json's "scores" hold: p(positive class), or the top-label confidence without one."""
    return f"p({names[pos]})" if pos is not None else "top-label confidence (highest class probability)"


def _calibration(y, probs, temperature, seed: int) -> dict:
    """ECE (with what a perfectly calibrated model would score on this many images), Brier score and NLL."""
    return {"ece": calibration.expected_calibration_error(y, probs),
            "ece_if_perfectly_calibrated": bootstrap.ece_if_calibrated(probs, seed=seed),
            "brier": calibration.brier_score(y, probs), "nll": calibration.negative_log_likelihood(y, probs),
            "temperature": temperature}


def _threshold_source(predictor, pos: int | None, ensemble_fit: dict | None) -> str:
    """Where the decision threshold came from, in words for the report."""
    own, t, names = predictor.positive_index, predictor.threshold, predictor.class_names
    if len(names) != 2:
        return "none: the prediction is the most probable class"
    if t is None or own is None:
        return "0.5 fallback: the model has no validation-chosen threshold"
    how = "the model's, chosen on validation"
    if isinstance(predictor, Ensemble) and "ensemble_dir" not in predictor.meta:
        fitted = ensemble_fit and ensemble_fit.get("fitted_on")
        how = "fitted for this ensemble on validation" if fitted else "the first member's, not fitted for this ensemble"
    if pos != own:
        return f"{how} for {names[own]} (p({names[own]}) < {t:.4g}), mirrored to p({names[pos]}) > {1 - t:.4g}"
    return how


def _operating_thresholds(predictor, pos: int | None) -> tuple[dict | None, str | None]:
    """The model's saved operating points as thresholds on p(pos), and a note when they were mirrored from the
    other class of a binary model (p(own) < t is p(pos) > 1 - t: its sensitivity is specificity here)."""
    points, own = predictor.meta.get("operating_points"), predictor.positive_index
    if not points or pos is None or pos == own:
        return (points if pos == own else None), None
    if own is None or len(predictor.class_names) != 2:
        return None, None
    names = predictor.class_names
    note = (f"the model's operating points are for {names[own]}; mirrored to p({names[pos]}) > 1 - t, so a point "
            f"named for sensitivity to {names[own]} is one of specificity here")
    return {k: _mirrored(t) for k, t in points.items()}, note


def _complemented(probs: np.ndarray, predictor, pos: int | None) -> np.ndarray:
    """`probs` with, for the other class `pos` of a binary model, p(pos) = 1 - p(own) exactly: the softmax's own
    p(pos) can differ from it in the last bit, and then a score equal to the model's threshold would be decided
    unlike predict (whose rule is p(own) >= t) by the mirrored threshold."""
    own = predictor.positive_index
    if pos is None or own is None or pos == own or probs.shape[1] != 2:
        return probs
    probs = probs.copy()
    probs[:, pos] = 1.0 - probs[:, own]
    return probs


def _mirrored(t: float) -> float:
    """A threshold t on the other class of a binary model as one on this class: p(other) < t is p(this) > 1 - t,
    i.e. p(this) >= the next float above 1 - t (metrics decide with >=)."""
    return float(np.nextafter(1.0 - float(t), 2.0))


def _check_reference(ref: dict, path, names: list[str], pos: int | None) -> None:
    """BonefracError naming --reference when its scores cannot be compared with this run's: other classes, another
    positive class or another kind of score."""
    theirs = ref.get("class_names")
    if not isinstance(theirs, list):
        raise BonefracError(f"--reference {path}: no class_names; expected a metrics.json written by "
                            "`bonefrac evaluate`")
    if len(theirs) != len(names) or set(map(str, theirs)) != set(names):
        raise BonefracError(f"--reference {path}: its classes {theirs} differ from the model's {names}; the scores "
                            "are not comparable")
    their_pos = ref.get("positive_class") or (ref.get("one_vs_rest") or {}).get("positive_class")
    mine = names[pos] if pos is not None else None
    if their_pos != mine:
        raise BonefracError(f"--reference {path}: its positive class is {their_pos} but this run's is {mine}; the "
                            "scores are not comparable (pass --positive-class to match)")
    kind = score_type(names, pos)
    if ref.get("score_type", kind) != kind:
        raise BonefracError(f"--reference {path}: its scores are {ref['score_type']} but this run's are {kind}")


def _load_reference(reference: str | Path) -> dict:
    """The reference metrics.json as a dict whose "scores" is a float array (empty when the file has none);
    BonefracError naming the file when it is missing, unreadable, not JSON or not a metrics object."""
    path = Path(reference)
    try:
        ref = json.loads(path.read_text())
    except FileNotFoundError:
        raise BonefracError(f"--reference {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BonefracError(f"--reference {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BonefracError(f"--reference {path}: not valid JSON ({exc})") from None
    if not isinstance(ref, dict):
        raise BonefracError(f"--reference {path}: expected the metrics.json object written by `bonefrac evaluate`, "
                            f"found a JSON {type(ref).__name__}")
    try:
        ref["scores"] = np.asarray(ref.get("scores", []), dtype=float)
    except (TypeError, ValueError):
        raise BonefracError(f"--reference {path}: \"scores\" is not a list of numbers") from None
    return ref


def val_problem(val: pd.DataFrame, names: list[str]) -> str | None:
    """Why these val rows cannot be fitted on (too few images, or a class of the model missing), or None."""
    problems = []
    if len(val) < MIN_VAL_IMAGES:
        problems.append(f"{len(val)} images, fewer than the {MIN_VAL_IMAGES} needed")
    missing = [c for c in names if c not in set(val.label)]
    if missing:  # a threshold needs both classes; a temperature fitted without a class is meaningless for it
        problems.append(f"no images of class(es) {missing}")
    return f"val split has {' and '.join(problems)}" if problems else None


def check_val_split(df: pd.DataFrame, names: list[str], manifest) -> pd.DataFrame:
    """The manifest's val rows, or BonefracError naming the manifest when they are too few to fit on."""
    val = select_rows(df, "val", names, manifest)
    problem = val_problem(val, names)
    if problem:
        raise BonefracError(f"{manifest}: {problem}; refusing to fit on it; nothing was written")
    return val


def _fit_loose_ensemble(ens: Ensemble, df: pd.DataFrame, manifest, cache_dir: Path, split: str) -> dict:
    """Several checkpoints named on the command line: weights and thresholds from this manifest's val split,
    unless it is unusable (too small, a class missing, or holding a member's training images)."""
    names, val = ens.class_names, df[df.split == "val"]
    problem = val_problem(val, names) or trained_on(val, [m.path for m in ens.members], manifest)
    if problem:  # evaluating must still work on a manifest without a usable val split: fall back, loudly
        log.warning("no usable val split to fit ensemble weights on (%s); using equal weights and the first "
                    "member's thresholds", problem)
        return {"weights": [float(w) for w in ens.weights], "fitted_on": None}
    fit = fit_ensemble(ens, select_rows(df, "val", names, "val split"), cache_dir)
    apply_ensemble_fit(ens, fit)
    return {**fit, "fitted_on": "val split of this manifest"}


def fit_ensemble(ens: Ensemble, val_rows: pd.DataFrame, cache_dir: Path) -> dict:
    """Member weights minimising the validation log loss of the mix, then the mix's threshold and operating
    points on the same rows: {weights, threshold, operating_points, val_n, val_member_log_loss}."""
    names = ens.class_names
    y = val_rows.label.map({c: i for i, c in enumerate(names)}).to_numpy()
    member_probs = [predict_manifest(m, val_rows, cache_dir) for m in ens.members]
    weights = metrics.fit_ensemble_weights(member_probs, y)
    mixed = metrics.average_probs(member_probs, weights)
    out = {"weights": [float(w) for w in weights], "threshold": None, "operating_points": None,
           "val_n": int(len(y)),
           "val_member_log_loss": [float(metrics.per_sample_loss(y, p).mean()) for p in member_probs],
           "val_ensemble_log_loss": float(metrics.per_sample_loss(y, mixed).mean())}
    pos = ens.positive_index
    if pos is not None and len(names) == 2 and len(np.unique(y)) == 2:
        out["operating_points"] = metrics.operating_points((y == pos).astype(int), mixed[:, pos])
        out["threshold"] = out["operating_points"]["default"]
    log.info("ensemble weights %s (val log loss %.4f; members %s)", out["weights"],
             out["val_ensemble_log_loss"], [round(v, 4) for v in out["val_member_log_loss"]])
    return out


def apply_ensemble_fit(ens: Ensemble, fit: dict) -> None:
    ens.weights = np.asarray(fit["weights"], dtype=float)
    ens.threshold = fit["threshold"]
    ens.meta.update(threshold=fit["threshold"], operating_points=fit["operating_points"])


def build_ensemble(models: list[str], manifest: str | Path, out_dir: str | Path, device: str = "auto") -> Path:
    """Fit weights and thresholds on the val split and write an ensemble directory: the members copied
    inside it (weights and JSON only) and `ensemble.json` naming them by relative path."""
    out_dir = Path(out_dir)
    if len(models) < 2:
        raise BonefracError("an ensemble needs at least two checkpoints")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BonefracError(f"{out_dir} exists and is not empty; choose a new --out")
    ens = load_predictor(models, device)
    if not isinstance(ens, Ensemble) or "ensemble_dir" in ens.meta:
        raise BonefracError("name the member checkpoints themselves, not an ensemble directory")
    df = load_manifest(manifest)
    val = check_val_split(df, ens.class_names, manifest)
    problem = trained_on(val, models, manifest)
    if problem:
        raise BonefracError(f"{problem}; fit the ensemble on images its members have not trained on (nothing "
                            "was written)")
    fit = fit_ensemble(ens, val, Path(manifest).parent / "cache")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_seen(out_dir, dict.fromkeys(val.sha256, "val"))  # what its weights were fitted on
    members = []
    for i, src in enumerate(models):
        rel = f"members/{i}_{ens.members[i].meta['arch']}"
        (out_dir / rel).mkdir(parents=True)
        for name in (checkpoint.META_FILE, checkpoint.WEIGHTS_FILE, checkpoint.SEEN_FILE):  # no optimizer state
            if name != checkpoint.SEEN_FILE or (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, out_dir / rel / name)
        members.append(rel)
    spec = {"format": "bonefrac-ensemble", "members": members, "class_names": ens.class_names,
            "positive_index": ens.positive_index, "sources": [str(m) for m in models],
            "member_versions": [m.version for m in ens.members],  # loading refuses members changed since
            "manifest": str(manifest), **fit}
    _write_json_atomic(out_dir / ENSEMBLE_FILE, spec)
    return out_dir


def calibrate(ckpt: str | Path, manifest: str | Path, device: str = "auto") -> dict:
    """Re-fit a checkpoint's temperature, threshold and operating points on the manifest's val split and
    rewrite its JSON in place, keeping the previous file as bonefrac.json.bak (.bak.2, ... on later runs); the val
    images join the checkpoint's seen list. Returns the new calibration fields.

    Raises BonefracError, leaving the checkpoint untouched, when the val split is unusable (`check_val_split`),
    holds images the model trained on, or the fit would replace an existing threshold with None."""

    ckpt = Path(ckpt)
    if (ckpt / ENSEMBLE_FILE).is_file():
        raise BonefracError(f"{ckpt} is an ensemble; calibrate its members, then rebuild it with "
                            "`bonefrac ensemble`")
    owner = next((d for d in ckpt.resolve().parents if (d / ENSEMBLE_FILE).is_file()), None)
    if owner is not None:  # its weights and threshold were fitted on this member's current probabilities
        raise BonefracError(f"{ckpt} is a member of the ensemble {owner}; calibrate the original checkpoint, then "
                            "rebuild the ensemble with `bonefrac ensemble`")
    meta = checkpoint.read_meta(ckpt)
    predictor = Predictor.from_checkpoint(ckpt, device)
    names = predictor.class_names
    val = check_val_split(load_manifest(manifest), names, manifest)
    problem = trained_on(val, [ckpt], manifest)
    if problem:
        raise BonefracError(f"{problem}; calibrate on images the model has not trained on (the checkpoint is left "
                            "unchanged)")
    y = val.label.map({c: i for i, c in enumerate(names)}).to_numpy()
    cache = build_cache(val.path.tolist(), val.sha256.tolist(), predictor.size, Path(manifest).parent / "cache")
    logits = predictor.logits_uint8(torch.from_numpy(np.asarray(cache))[:, None])
    monitor = (meta.get("val_metrics") or {}).get("monitor") or metrics.default_selection_metric(len(names))
    score = metrics.selection_score(monitor, y, metrics.softmax(logits))
    fitted = calibration.calibration_meta(logits, y, names, predictor.positive_index, monitor, score)
    if fitted["threshold"] is None and meta.get("threshold") is not None:
        raise BonefracError(f"{manifest}: the val split gave no decision threshold; refusing to drop the "
                            f"checkpoint's threshold {meta['threshold']} (the checkpoint is left unchanged)")
    fitted["calibrated_on"] = {"manifest": str(manifest), "split": "val", "n": int(len(y))}
    meta_file = ckpt / checkpoint.META_FILE
    backup = _unused_backup_name(meta_file)
    shutil.copy2(meta_file, backup)  # the only copy of the earlier calibration otherwise
    log.info("temperature %.4f -> %.4f, threshold %s -> %s; previous %s kept as %s", meta.get("temperature") or 1.0,
             fitted["temperature"], meta.get("threshold"), fitted["threshold"], meta_file.name, backup)
    _write_json_atomic(meta_file, {**meta, **fitted})
    seen = checkpoint.read_seen(ckpt)
    if seen is not None:  # thresholds now come from these images: evaluate must count them as seen
        checkpoint.write_seen(ckpt, {**seen, **dict.fromkeys(val.sha256, "val")})
    return fitted


def _unused_backup_name(meta_file: Path) -> Path:
    """bonefrac.json.bak for the first calibration (it keeps the training-time fit), then .bak.2, .bak.3, ...:
    no calibration overwrites an earlier one's backup."""
    backup, n = meta_file.with_name(meta_file.name + ".bak"), 1
    while backup.exists():
        n += 1
        backup = meta_file.with_name(f"{meta_file.name}.bak.{n}")
    return backup


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def _scores(probs: np.ndarray, pos: int | None) -> np.ndarray:
    return probs[:, pos] if pos is not None else probs.max(axis=1)


def _write_predictions(out_dir: Path, rows, y, probs, pred, names) -> None:
    loss = metrics.per_sample_loss(y, probs)
    table = pd.DataFrame({"path": rows.path, "group": rows.group, "label": rows.label,
                          "prediction": [names[i] for i in pred], "loss": loss.round(6)})
    for i, name in enumerate(names):
        table[f"p_{name}"] = probs[:, i].round(6)
    table.sort_values("loss", ascending=False).to_csv(out_dir / "predictions.csv", index=False)
