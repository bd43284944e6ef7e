"""How `prepare` deals groups out to train/val/test: per class, a seeded shuffle of the groups, cut by image count.

``stratified_group_split(rows, names, fractions, seed)`` gives every row the split of its group, so neither a
duplicate nor a patient's images ever cross splits. Per class (each group counts under its majority label), the
groups are ordered by a seeded hash of their content alone (the smallest SHA-256 among their images): neither row
order, file names nor group size change the order. The order is then cut at image-count targets: test takes the
first ``fractions[2]`` of the class's images, val the next ``fractions[1]``, train the rest. A group goes to the
segment holding the midpoint of its images, so a group straddling a cut lands on either side, and each split's
share of a class stays within one group's size of its target.

Why not fill the emptiest split, biggest groups first (the method until 2026-12-06): every multi-image group
(duplicates, a patient's several images) then went to train for every seed, so test never held one, and adding
one image cascaded through the greedy fill and moved hundreds of others between splits. Cutting a fixed order
moves only the groups near the two cuts when a group is added or removed.

``listed_in_two_splits`` and ``warn_empty_cells`` report on a split once made (a given split listing one file
twice; a class or split left empty). Split from manifest.py; `manifest.prepare` is the only caller.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd

from .errors import BonefracError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Test is cut first, from the start of the order: another val or train share then never changes the test set.
_CUT_ORDER = ("test", "val", "train")


def given_split(rows: pd.DataFrame, keep: bool) -> pd.DataFrame:
    """`rows` with its given split (`folder_split`, from a CSV's split column) checked: values other than
    train/val/test are a BonefracError when the split is to be kept (`keep`), else the column is dropped with a
    warning, since prepare draws its own split (a CSV meant to be re-split may say "holdout" or nothing)."""
    if "folder_split" not in rows:
        return rows
    bad = sorted({str(s) for s in rows["folder_split"]} - set(SPLITS))
    if not bad:
        return rows
    if keep:
        raise BonefracError(f"unknown split value(s) {bad[:10]} in the labels CSV's 'split' column (keeping the "
                            "given split needs train, val or test in every row)")
    log.warning("the labels CSV's 'split' column holds value(s) %s besides train/val/test: ignored, prepare draws "
                "its own split", bad[:10])
    return rows.drop(columns="folder_split")


def stratified_group_split(rows: pd.DataFrame, names: list, fractions, seed: int) -> list[str]:
    """The split of each row of `rows` (columns group, label, sha256), in row order.

    `names`: the class names (a group's majority label, ties to the earlier name, picks its class);
    `fractions`: train/val/test shares of each class's images (a 0 share gets no group); `seed`: which shuffle.
    The same images, groups and seed always give the same split, in any row order.
    """
    rank = {n: i for i, n in enumerate(names)}
    by_group = rows.groupby("group")
    majority = by_group["label"].agg(
        lambda s: min(s.value_counts().items(), key=lambda kv: (-kv[1], rank[kv[0]]))[0])
    sizes = by_group.size()
    content = by_group["sha256"].min()  # the group's identity, whatever its id or row order
    split_of = {}
    for name in names:
        groups = sorted(majority.index[majority == name], key=lambda g: shuffle_key(seed, content[g]))
        split_of.update(zip(groups, cut_in_order(sizes[groups].to_numpy(), fractions)))
    return [split_of[g] for g in rows["group"]]


def shuffle_key(seed: int, content: str) -> str:
    """A group's place in the seeded order: a hash of the seed and its content, nothing else."""
    return hashlib.sha256(f"{seed}|{content}".encode()).hexdigest()


def cut_in_order(sizes: np.ndarray, fractions) -> list[str]:
    """The split of each group of `sizes` (images, in shuffled order): test, then val, then train, each taking
    the groups whose image midpoint falls in its share of the cumulative image count."""
    share = dict(zip(SPLITS, np.asarray(fractions, dtype=np.float64)))
    segments = [s for s in _CUT_ORDER if share[s] > 0]
    if not len(sizes) or not segments:
        return []
    ends = np.cumsum(sizes, dtype=np.float64)
    # The last segment takes the rest, so fractions summing to 1 within rounding leave no group out.
    bounds = np.cumsum([share[s] for s in segments[:-1]]) * ends[-1]
    index = np.searchsorted(bounds, ends - np.asarray(sizes) / 2, side="right")
    return [segments[i] for i in index]


def listed_in_two_splits(rejected: list, group_of: dict) -> list[dict]:
    """crossing_groups entries for files a given split lists in two splits (`rejected` holds the listing that
    manifest._analyse dropped, with its "splits"); `group_of` maps a kept path to its group. Warns when any."""
    twice = [r for r in rejected if "splits" in r and r["path"] in group_of]
    if twice:
        log.warning("%d file(s) are listed in two splits of the given split: a leak (see crossing_groups)",
                    len(twice))
    return [{"group": group_of[r["path"]], "splits": {s: [r["path"]] for s in r["splits"]}, "same_file": True}
            for r in twice]


def warn_empty_cells(manifest: pd.DataFrame, names: list, splits: list) -> None:
    """Warn about each of `splits` that lacks a class of `names` (training cannot select on, calibrate on or test
    it) or has no image at all (fewer groups than splits)."""
    counts = pd.crosstab(manifest["label"], manifest["split"])
    for split in splits:
        if split not in counts.columns:
            log.warning("split '%s' is empty: %d duplicate groups are too few to fill every split",
                        split, manifest["group"].nunique())
            continue
        missing = [n for n in names if counts.get(split, {}).get(n, 0) == 0]
        if missing:
            log.warning("split '%s' has no images of class(es) %s (too few images of them to split 3 ways?)",
                        split, missing)
