"""Which images `prepare` keeps together: groups from pixels, provenance and a patient/study ID column.

A split must keep every image of one patient (or study) on one side: otherwise a model is tested on patients it
was trained on, and the bootstrap intervals, which resample groups, come out too narrow. ``assign_groups``
makes the groups as connected components of three kinds of links: duplicates and copies found from the pixels
(dedup.py), ``augmented_from`` provenance (a manifest written by `augment`), and, when the labels CSV names a
group column (``prepare(group_col=...)``, ``--group-col``), rows sharing a value of that column.
``id_like_columns`` names CSV columns that look like patient or study IDs, so that prepare can warn when one
is present but not used. Split from manifest.py to keep that module readable; `prepare` is the only caller.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd

from .dedup import group_ids

log = logging.getLogger(__name__)

GIVEN_GROUP = "given_group"
"""Internal row column (never written to the manifest) holding the ``group_col`` value of each image."""

# Column names (lower case, runs of other characters as "_") that usually hold patient or study identifiers.
ID_LIKE_NAMES = frozenset({
    "group", "group_id", "patient", "patient_id", "patientid", "patient_number", "subject", "subject_id",
    "subjectid", "study", "study_id", "studyid", "study_uid", "study_instance_uid", "studyinstanceuid",
    "case", "case_id", "caseid", "accession", "accession_number", "mrn",
})


def id_like_columns(columns, exclude=()) -> list[str]:
    """The names in ``columns`` (not in ``exclude``) that look like patient/study identifier columns."""
    return [c for c in columns if c not in exclude and re.sub(r"[^a-z0-9]+", "_", str(c).lower()).strip("_")
            in ID_LIKE_NAMES]


def assign_groups(rows: pd.DataFrame, dup_pairs: np.ndarray, group_col: str | None,
                  copy_detector: bool) -> tuple[list[str], list[str], dict]:
    """-> (group per row, duplicate group per row, summary for the report).

    The duplicate groups join identical bytes, ``dup_pairs`` (near duplicates and detected copies) and
    ``augmented_from`` provenance; the groups also join rows sharing a ``GIVEN_GROUP`` value (blank: no link).
    """
    sha = rows["sha256"].tolist()
    content_pairs = np.concatenate([dup_pairs.reshape(-1, 2), provenance_pairs(rows)])
    by_content = group_ids(sha, content_pairs)
    links = ["sha256", "perceptual_hash"] + ["copy_detector"] * copy_detector + \
        ["augmented_from"] * ("augmented_from" in rows)
    summary = {"group_col": group_col, "linked_by": links, "n_groups_by_content": len(set(by_content))}
    if group_col is None:
        return by_content, by_content, summary
    values = rows[GIVEN_GROUP].astype(str).str.strip()
    groups = group_ids(sha, np.concatenate([content_pairs, column_pairs(values)]))
    ids_per_group = pd.Series(values.to_numpy()).where(values.to_numpy() != "").groupby(groups).nunique()
    summary.update(linked_by=links + [f"column:{group_col}"], n_ids=int(values[values != ""].nunique()),
                   n_images_without_id=int((values == "").sum()),
                   n_groups_joining_several_ids=int((ids_per_group > 1).sum()))
    if summary["n_groups_joining_several_ids"]:  # e.g. one image filed under two patients: worth a look
        log.info("%d group(s) join images of several '%s' values through duplicates or copies (see "
                 "duplicate_groups in prepare_report.json)", summary["n_groups_joining_several_ids"], group_col)
    return groups, by_content, summary


def column_pairs(values: pd.Series) -> np.ndarray:
    """(row, first row with the same value) index pairs for rows sharing a non-blank value."""
    first: dict = {}
    pairs = [(i, first.setdefault(v, i)) for i, v in enumerate(values) if v]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def provenance_pairs(rows: pd.DataFrame) -> np.ndarray:
    """(copy, source) row pairs from an `augmented_from` column (a manifest written by `augment`): a copy
    belongs to its source's group whatever the hashes say (small rotations escape them), and copies of one
    source belong together even when the source itself is not in the table."""
    if "augmented_from" not in rows:
        return np.zeros((0, 2), dtype=np.int64)
    index = {p: i for i, p in enumerate(rows["path"])}
    pairs = []
    for i, src in enumerate(rows["augmented_from"].fillna("").astype(str)):
        if src:  # the source's row, or else the first copy of the same source: copies stay together either way
            pairs.append((i, index.setdefault(src, i)))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)
