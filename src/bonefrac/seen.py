"""Which images a model has already seen, from the lists checkpoints keep (checkpoint.SEEN_FILE).

    seen_by_model(predictor, test_rows, "test")    # {"train": 0, "val": 3, "of": 613}; warns when not all zero
    trained_on(val_rows, [ckpt_a, ckpt_b], manifest)  # "M: 6 of the 28 val images were in A's training split"

`evaluate` uses the first to flag optimistic metrics; `calibrate` and the ensemble fits use the second to refuse
fitting a temperature, thresholds or ensemble weights on images a model was trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from . import checkpoint

log = logging.getLogger(__name__)


def seen_by_model(predictor, rows: pd.DataFrame, split: str | None = None) -> dict | None:
    """How many of `rows` the predictor's model(s) were trained ("train") or selected ("val") on, by image hash,
    from the list each checkpoint keeps (checkpoint.SEEN_FILE); warns when any were. None when a model keeps no
    list."""
    seen = {}
    for path in _checkpoint_dirs(predictor):
        listed = checkpoint.read_seen(path) if path is not None else None
        if listed is None:
            log.info("%s does not list the images it was trained on: overlap with this set not checked", path)
            return None
        merge_seen(seen, listed)
    hits = rows.sha256.map(seen).value_counts()
    out = {"train": int(hits.get("train", 0)), "val": int(hits.get("val", 0)), "of": int(len(rows))}
    if out["train"] or out["val"]:
        why = ("was the split drawn again?" if split == "test" else "the model was chosen on its own val split"
               if split == "val" and not out["train"] else "the split evaluated holds the model's own images")
        log.warning("%d of the %d images evaluated here were in the model's training split and %d in its "
                    "validation split: these metrics are optimistic (%s)", out["train"], out["of"], out["val"], why)
    return out


# When the members of an ensemble list one image under different splits, the strongest use wins: an image one
# member trained on is a training image of the ensemble, whatever another member selected or tested on it.
_PRECEDENCE = {"train": 0, "val": 1, "test": 2}


def merge_seen(seen: dict, listed: dict) -> dict:
    """Add `listed` ({sha256: split}) to `seen` in place and return it; an image in both keeps the stronger
    split (train > val > test; names outside these rank last)."""
    for sha, split in listed.items():
        if sha not in seen or _rank(split) < _rank(seen[sha]):
            seen[sha] = split
    return seen


def _rank(split: str) -> int:
    return _PRECEDENCE.get(split, len(_PRECEDENCE))


def _checkpoint_dirs(predictor) -> list:
    """The folders whose seen lists count: every member checkpoint's, and an ensemble directory's own when it
    keeps one (the val images its weights were fitted on)."""
    dirs = [m.path for m in getattr(predictor, "members", None) or [predictor]]
    ensemble_dir = predictor.meta.get("ensemble_dir")
    if ensemble_dir and (Path(ensemble_dir) / checkpoint.SEEN_FILE).is_file():
        dirs.append(Path(ensemble_dir))
    return dirs


def trained_on(val: pd.DataFrame, models: list, manifest) -> str | None:
    """Why the val rows `val` of `manifest` must not be fitted on: "<manifest>: 6 of the 28 val images were in
    <model>'s training split" for each checkpoint directory in `models` whose seen list holds some of them as
    training images; None when none does. A model that keeps no list cannot be checked, and a warning says so."""
    found = []
    for model in models:
        seen = checkpoint.read_seen(model) if model is not None else None
        if seen is None:
            log.warning("%s does not list the images it was trained on: cannot check that %s's val split is new "
                        "to it", model, manifest)
            continue
        n = int((val.sha256.map(seen) == "train").sum())
        if n:  # a temperature, threshold or weights fitted on training images come out overconfident
            found.append(f"{n} of the {len(val)} val images were in {model}'s training split")
    return f"{manifest}: {'; '.join(found)}" if found else None


def seen_images(rows) -> dict:
    """{sha256: split} of a manifest's train and val rows, as checkpoints list them; an image listed in both
    is "val" whatever the row order (either way the model has seen it)."""
    seen = {}
    for split in ("train", "val"):
        seen.update(dict.fromkeys(rows.sha256[rows.split == split], split))
    return seen

