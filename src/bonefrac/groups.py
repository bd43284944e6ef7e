"""Which images `prepare` keeps together: groups from pixels, provenance and a patient/study ID column.

A split must keep every image of one patient (or study) on one side: otherwise a model is tested on patients it
was trained on, and the bootstrap intervals, which resample groups, come out too narrow. ``assign_groups``
makes the groups as connected components of three kinds of links: duplicates and copies found from the pixels
(dedup.py), ``augmented_from`` provenance (a manifest written by `augment`), and, when the labels CSV names a
group column (``prepare(group_col=...)``, ``--group-col``), rows sharing a value of that column (also the
values of rows that repeat a path: ``carry_repeated_ids`` keeps them before the repeats are dropped).
``id_like_columns`` names CSV columns that look like patient or study IDs, so that prepare can warn when one
is present but not used; ``copy_name_hint`` warns when file names look like augmented copies that the pixel hash
left in separate groups. Split from manifest.py to keep that module readable; `prepare` is the only caller.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .dedup import group_ids
from .io import printable_path

log = logging.getLogger(__name__)

GIVEN_GROUP = "given_group"
"""Internal row column (never written to the manifest) holding the ``group_col`` value of each image."""
OTHER_GIVEN = "other_given_groups"
"""Internal row column: the other ``group_col`` values of rows repeating this row's path (``carry_repeated_ids``)."""

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
    others = rows[OTHER_GIVEN] if OTHER_GIVEN in rows else [()] * len(rows)
    groups = group_ids(sha, np.concatenate([content_pairs, column_pairs(values, others)]))
    ids_per_group = pd.Series(values.to_numpy()).where(values.to_numpy() != "").groupby(groups).nunique()
    all_ids = set(values[values != ""]).union(*map(set, others))
    summary.update(linked_by=links + [f"column:{group_col}"], n_ids=len(all_ids),
                   n_images_without_id=int((values == "").sum()),
                   n_groups_joining_several_ids=int((ids_per_group > 1).sum()))
    if summary["n_groups_joining_several_ids"]:  # e.g. one image filed under two patients: worth a look
        log.info("%d group(s) join images of several '%s' values through duplicates or copies (see "
                 "duplicate_groups in prepare_report.json)", summary["n_groups_joining_several_ids"], group_col)
    return groups, by_content, summary


def column_pairs(values: pd.Series, others=None) -> np.ndarray:
    """(row, first row with the same value) index pairs for rows sharing a non-blank value; `others` (one
    tuple per row) adds more values per row, so a row listed under two IDs links both."""
    first: dict = {}
    others = others if others is not None else [()] * len(values)
    pairs = [(i, first.setdefault(v, i)) for i, (own, more) in enumerate(zip(values, others))
             for v in (own, *more) if v]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def carry_repeated_ids(rows: pd.DataFrame, group_col: str | None) -> pd.DataFrame:
    """`rows` with an OTHER_GIVEN column: for each row, the other non-blank GIVEN_GROUP values that rows of the
    same path carry. prepare keeps only the first row of a repeated path; without this, a repeat filed under
    another patient would lose that link, and that patient's other images could land in another split."""
    if GIVEN_GROUP not in rows:
        return rows
    values = rows[GIVEN_GROUP].astype(str).str.strip()
    listed = (values != "") & rows["path"].duplicated(keep=False)  # only repeated paths can carry another value
    per_path: dict = {}
    for path, value in zip(rows["path"][listed], values[listed]):
        per_path.setdefault(path, set()).add(value)
    rows = rows.assign(**{OTHER_GIVEN: [tuple(sorted(per_path.get(p, set()) - {own}))
                                        for p, own in zip(rows["path"], values)]})
    several = [p for p, ids in per_path.items() if len(ids) > 1]
    if several:  # names the column and one file, never the IDs: logs must hold no patient identifiers
        log.warning("%d file(s) are listed under several '%s' values (e.g. %s): each links all of its values into "
                    "one group", len(several), group_col, printable_path(several[0]))
    return rows


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


# Name endings that augmentation scripts, exporters and file managers give a copy: "_aug3", "-rot90", "_flip",
# "_clahe", "_copy", " (2)", Roboflow's ".rf.<hash>". A bare "-1" / "_1" counts only beside a file of the stripped name,
# since numbered names ("IMG_01", "IMG_02") are how distinct images are often called.
_MARKED_COPY = re.compile(r"(?:\.rf\.[0-9a-f]{6,}| ?\(\d+\)|[ _-](?:aug(?:mented)?|rot(?:ated?)?|flip(?:ped)?|"
                          r"[hv]flip|mirror(?:ed)?|crop(?:ped)?|copy|shear(?:ed)?|scaled?|bright|contrast|noise|"
                          r"blur(?:red)?|transformed|clahe|equali[sz]ed|enhanced)[_-]?\d*)$", re.IGNORECASE)
_NUMBERED = re.compile(r"[_-]\d{1,2}$")


def copy_name_hint(paths, groups) -> dict:
    """For prepare_report.json when the copy detector is off: how many file-name families (stems that agree once
    copy endings such as "_aug3" or " (2)" are stripped) span several groups, a few of them, and what to do.
    Warns when there are any: such files are most likely augmented copies that the pixel hash missed, and
    splitting them apart leaks them across splits."""
    families = copy_name_families(paths, groups)
    hint = {"n_families": len(families), "examples": [[printable_path(p) for p in f[:4]] for f in families[:3]]}
    if families:
        hint["hint"] = ("file names look like augmented copies that the perceptual hash did not group; prepare "
                        "again with --match-copies auto (the learned copy detector) to keep them together. Neither "
                        "recognises contrast-equalised (CLAHE) copies: give those their source's ID in a --group-col "
                        "column")
        log.warning("%d file-name families look like augmented copies (e.g. %s) but lie in different groups, so "
                    "they can land in different splits: prepare again with --match-copies auto (see "
                    "copy_matcher.copy_name_families in prepare_report.json)", len(families),
                    printable_path(families[0][0]))
    return hint


def copy_name_families(paths, groups) -> list[list[str]]:
    """The file-name families that span more than one group, largest first, each as its paths: a family is the
    files whose stems agree once copy endings are stripped, with at least one such ending among them."""
    stems = [Path(p).stem.lower() for p in paths]
    present = set(stems)
    families: dict = {}
    for path, stem, group in zip(paths, stems, groups):
        base, marked = _strip_copy_endings(stem, present)
        family = families.setdefault(base, {"paths": [], "groups": set(), "marked": False})
        family["paths"].append(path)
        family["groups"].add(group)
        family["marked"] |= marked
    split = [f["paths"] for f in families.values() if f["marked"] and len(f["groups"]) > 1]
    return sorted(split, key=len, reverse=True)


def _strip_copy_endings(stem: str, present: set) -> tuple[str, bool]:
    """(stem without its copy endings, whether it had any); "img_aug3_rot90" -> ("img", True)."""
    base, marked = stem, False
    while True:
        cut = _MARKED_COPY.search(base)
        if cut is None:
            cut = _NUMBERED.search(base)
            cut = cut if cut is not None and base[:cut.start()] in present else None
        if cut is None or cut.start() == 0:
            return base, marked
        base, marked = base[:cut.start()], True
