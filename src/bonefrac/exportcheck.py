"""The real images an export is calibrated and checked on, and the parity check itself (used by export.py).

From a manifest, INT8 calibrates on a sample of the train split and parity is checked on a sample of the val
split; from an image folder, on two disjoint halves of it. Samples are drawn with a fixed seed and spread over the
labels in proportion (every label at least once), because a prepared manifest lists its rows class by class and
its first rows would be one class. The check compares the exported model's probabilities with PyTorch's and also
the decisions each makes at the model's threshold and at every saved operating point: what a user acts on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .backends import load_backend
from .errors import BonefracError, ImageReadError
from .io import read_image
from .predict import decide, expand_paths

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.15}  # max |p_exported - p_torch|
SAMPLE_SEED = 0


def check_tolerance(tolerance) -> float | None:
    """`tolerance` as a float, or None for the variant's default; BonefracError for NaN, inf or a negative value
    (NaN would pass every comparison and switch the parity check off)."""
    if tolerance is None:
        return None
    value = float(tolerance)
    if not math.isfinite(value) or value < 0:
        raise BonefracError(f"--tolerance must be a finite number >= 0, got {tolerance!r}")
    return value


def reference_images(manifest, images, meta: dict, n_calib: int, n_parity: int, calibrate: bool):
    """(calibration images, parity images, parity labels or None, description of both sets), decoded 2-D uint8.
    `calibrate`: INT8 needs calibration images (else none are read, and a manifest needs no train split)."""
    if manifest is None and images is None:
        raise BonefracError("export needs real images for the parity check: pass --manifest (train split "
                            "calibrates INT8, val split checks parity) or --images FOLDER")
    if manifest is None:
        return _folder_images(images, n_calib if calibrate else 0, n_parity)
    rows = _manifest_rows(manifest)
    train, val = rows[rows.split == "train"], rows[rows.split == "val"]
    if val.empty or (calibrate and train.empty):
        need = "non-empty train (INT8 calibration) and val (parity) splits" if calibrate else "a non-empty val split"
        raise BonefracError(f"{manifest}: needs {need} for export")
    names = [str(n) for n in meta["class_names"]]
    unknown = sorted(set(rows.label) - set(names))
    if unknown:  # checked before decoding any image: a wrong manifest should fail fast
        raise BonefracError(f"{manifest}: label(s) {unknown} are not classes of the model {names}; "
                            "pass the manifest the model was trained on, or --images")
    calib = _load(list(spread(train, n_calib).path))[0] if calibrate else []
    picked = spread(val, n_parity)
    parity, ok = _load(list(picked.path))
    labels = np.array([names.index(v) for v in np.asarray(picked.label)[ok]])
    counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
    if missing := [n for n, c in counts.items() if not c]:
        log.warning("the val split gave no %s image for the parity check: agreement is not checked on it",
                    ", ".join(missing))
    return calib, parity, labels, {"calibration": f"{len(calib)} train images", "parity_labels": counts}


def spread(rows, n: int, seed: int = SAMPLE_SEED):
    """Up to `n` of `rows`, drawn with a fixed seed, each label in proportion to its share (every label present
    at least once when n allows): rows ordered by their rank within their label, relative to the label's size."""
    if len(rows) <= n:
        return rows
    shuffled = rows.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby("label").cumcount() / shuffled.groupby("label")["label"].transform("size")
    return shuffled.assign(_rank=rank.to_numpy()).sort_values("_rank", kind="stable").head(n).drop(columns="_rank")


def _folder_images(images, n_calib: int, n_parity: int):
    """Calibration and parity images from a folder: disjoint, so INT8 is not checked on its own calibration."""
    files = _image_files(images)
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(files))
    files = [files[i] for i in order]
    if n_calib and len(files) < 2:
        raise BonefracError(f"{images}: INT8 needs at least 2 images (calibration and parity sets are disjoint)")
    half = len(files) // 2 if n_calib else 0
    calib = _load(files[:min(half, n_calib)])[0] if n_calib else []
    parity = _load(files[half:half + n_parity])[0]
    log.info("--images: %d images calibrate, %d others check parity; no labels, so no validation metric",
             len(calib), len(parity))
    return calib, parity, None, {"calibration": f"{len(calib)} images of --images",
                                 "parity": f"{len(parity)} other images of --images"}


def _manifest_rows(manifest):
    from .manifest import read_csv, resolve_paths

    path = Path(manifest)
    # read_csv, not load_manifest: export needs only path, label and split (not group, sha256, ...).
    # All text with blanks as "": labels compare as strings and a blank path is one unreadable image.
    rows = read_csv(path, dtype=str, keep_default_na=False)
    if not {"path", "label", "split"} <= set(rows.columns):
        raise BonefracError(f"{path}: manifest needs path, label and split columns; has {list(rows.columns)}")
    resolve_paths(rows, path)
    return rows


def _image_files(images) -> list[Path]:
    files = expand_paths([images] if isinstance(images, (str, Path)) else list(images))
    if not files:
        raise BonefracError(f"no image files in {images}")
    return files


def _load(paths) -> tuple[list[np.ndarray], np.ndarray]:
    out, ok = [], []
    for p in paths:
        try:
            out.append(read_image(p))
            ok.append(True)
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
            ok.append(False)
    if not out:
        raise BonefracError("none of the reference images could be read")
    return out, np.array(ok, bool)


def verify(source, out: Path, parity, labels, meta: dict, tolerance: float | None, variant: str) -> dict:
    """Parity against PyTorch (fails loudly past the tolerance), decision agreement at the model's threshold and
    operating points, and the validation-metric change."""
    tol = DEFAULT_TOLERANCE[variant] if tolerance is None else tolerance
    ref = source.predict_arrays(parity)
    got = load_backend(out, "cpu").predict_arrays(parity)
    diff = float(np.abs(ref - got).max())
    agreement = decision_agreement(ref, got, meta)
    # Significant digits, not fixed decimals: a tiny but non-zero difference must not read as 0.0.
    result = {"parity": {"n_images": len(parity), "max_abs_prob_diff": float(f"{diff:.3g}"), "tolerance": tol,
                         "decision_agreement": agreement},
              "size_bytes": out.stat().st_size}
    if labels is not None:
        result["val_metric"] = _metric_change(labels, ref, got, meta)
    if not np.isfinite(diff) or diff > tol:  # the caller removes the file `out`
        raise BonefracError(f"export parity check FAILED: max |p_exported - p_torch| = {diff:.4g} > tolerance "
                            f"{tol:g} on {len(parity)} images; nothing written (raise --tolerance to accept)")
    flips = {k: v for k, v in agreement.items() if v < 1}
    if flips:
        log.warning("the exported model decides differently on some parity images (share agreeing: %s)",
                    ", ".join(f"{k} {v:.3f}" for k, v in flips.items()))
    log.info("parity ok: max prob diff %.3g <= %g on %d images", diff, tol, len(parity))
    return result


def decision_agreement(ref: np.ndarray, got: np.ndarray, meta: dict) -> dict:
    """Share of images whose decision is the same before and after export: at the model's own threshold
    ("default"; the most probable class for multi-class models or without a threshold) and at each saved
    operating point."""
    pos = meta.get("positive_index")
    points = {"default": meta.get("threshold")}
    if pos is not None and isinstance(meta.get("operating_points"), dict):
        points.update({k: v for k, v in meta["operating_points"].items() if k != "default"})
    return {name: round(float((decide(ref, pos, t) == decide(got, pos, t)).mean()), 4) for name, t in points.items()}


def _metric_change(labels, ref, got, meta: dict) -> dict:
    from .metrics import _auroc

    name, pos = "auroc", meta.get("positive_index")
    before, after = _auroc(labels, ref, pos), _auroc(labels, got, pos)
    if before is None or after is None:  # a class absent from the parity images: accuracy of the decisions
        name, t = "accuracy", meta.get("threshold")
        before, after = (float((decide(p, pos, t) == labels).mean()) for p in (ref, got))
    return {"name": name, "torch": round(before, 5), "exported": round(after, 5),
            "change": round(after - before, 5), "n": int(len(labels))}
