"""Build and read the manifest: every image once, its label, duplicate group and split.

``prepare`` scans an image folder (``root/<class>/*`` or ``root/{train,val,test}/<class>/*``) or a labels CSV,
decodes each image once (unreadable files are listed as rejected, never fatal), groups exact and near
duplicates (re-encoded, resized, rotated by 90 degrees or flipped copies) and, given a CSV column of patient or
study IDs (``group_col``), each patient's images, and splits by group so that neither a duplicate nor a patient
leaks across train/val/test (reading the folder or CSV: sources.py; duplicate detection: dedup.py; joining the
links into groups: groups.py; dealing the groups out to splits, 70/15/15 of each class's images: splits.py).
``load_manifest`` reads a manifest back for the later stages.

Default near-duplicate threshold: 32 of 256 bits. On FracAtlas (4,083 images, 2 cores, workers=2) it finds
3,941 groups, 129 with more than one image (71 byte-identical, 58 near; 271 images; 6 of them mix labels) in
about 16-18 s, almost all decoding; the pair search takes 1.5 s (about 50 s for 20k images). Pairs at <= 34
bits looked like the same radiograph on inspection (many are copies of the 59 truncated-source files with a
grey band); from about 36 bits distinct feet and hands in similar poses appear, from 40 bits they dominate.
Rotated, flipped, JPEG q70 and 80 %-resized copies stay within 12 bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .config import MAX_SEED
from .dedup import NEAR_DUP_THRESHOLD, crossing_groups, dihedral_phash, duplicate_pairs
from .errors import BonefracError, ImageReadError
from .groups import GIVEN_GROUP, OTHER_GIVEN, assign_groups, carry_repeated_ids, copy_name_hint
from .io import decode_image, file_sha256, printable_path, read_bytes, write_atomically
# read_csv lives with the source readers; load_manifest, data and export import it from here.
from .sources import PATH_COLUMNS, collect, read_csv, resolve_labels, sorted_labels
from .splits import SPLITS, given_split, listed_in_two_splits, stratified_group_split, warn_empty_cells

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "group", "split", "sha256", "width", "height")


# --- public API ---------------------------------------------------------------------------------------------


def prepare(out_dir, *, source=None, labels_csv=None, path_col=None, label_col="label", class_names=None,
            seed=42, fractions=(0.7, 0.15, 0.15), keep_folder_split=False, split_all=None,
            near_dup_threshold=NEAR_DUP_THRESHOLD, workers=None, match_copies="default", overwrite=False,
            group_col=None) -> dict:
    """Write ``out_dir/manifest.csv`` and ``out_dir/prepare_report.json``; return the report dict.

    Give ``source`` (an image folder, or a CSV file) or ``labels_csv`` (paths relative to the CSV's folder,
    or to ``source`` when both are given). ``class_names`` (list or "a,b") names integer labels 0,1,..
    in order, or fixes the class order of named labels. Splits are stratified by class and grouped by
    duplicate group: ``fractions`` (train/val/test) of each class's images, in whole groups, drawn by ``seed``
    (splits.py); ``keep_folder_split`` keeps the folder's (or the CSV's ``split`` column's) split and reports
    groups crossing splits; ``path_col`` is the CSV's path column ("image", else "path" for a CSV without one,
    such as a manifest); ``split_all="test"`` puts every image in one split. ``match_copies`` also groups freshly
    augmented copies with a learned copy detector (copydetect.py): "auto" (the shipped one, if any), a detector
    folder, or "off"/None; "default" is "auto" with keep_folder_split (auditing someone else's split) and "off"
    otherwise; when off, file names that look like augmented copies in different groups are warned about. A
    different manifest, or the same one with another class order, already in ``out_dir`` is only replaced with
    ``overwrite``. ``group_col`` names a labels-CSV column of patient or study IDs: images sharing a value share a
    group (on top of the duplicate groups), so the split keeps each patient on one side (groups.py). Raises
    BonefracError for unusable input.
    """
    started = time.perf_counter()
    _check_out_dir(out_dir)  # before minutes of decoding, not after
    fractions = _check_options(fractions, split_all, keep_folder_split)
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise BonefracError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    if match_copies not in ("default", "auto", "off", None):  # a mistyped folder fails now, not after decoding
        from .copydetect import resolve_detector  # imports torch, as dedup does when matching copies

        resolve_detector(match_copies)
    rows, rejected, kind, origin = collect(source, labels_csv, path_col, label_col, MANIFEST_COLUMNS, group_col)
    rows = given_split(carry_repeated_ids(_without_unwritable_names(rows, rejected), group_col), keep_folder_split)
    if keep_folder_split and "folder_split" not in rows:
        raise BonefracError("keep_folder_split needs a train/val/test folder layout or a 'split' CSV column")
    rows["label"], names = resolve_labels(rows["label"], class_names)
    rows, more_rejected, hashes = _analyse(rows, workers)
    rejected += more_rejected
    _check_classes(rows, names, class_names)
    if near_dup_threshold is None:
        near_dup_threshold = NEAR_DUP_THRESHOLD
    if match_copies == "default":
        match_copies = "auto" if keep_folder_split else "off"
    pairs, copies = duplicate_pairs(rows["path"].tolist(), rows["sha256"].tolist(), hashes, near_dup_threshold,
                                    match_copies, workers)
    rows["group"], dup_groups, grouping = assign_groups(rows, pairs, group_col, copies["detector"] is not None)
    if copies["detector"] is None and not split_all:  # a cheap look at the names for what the detector would catch
        copies["copy_name_families"] = copy_name_hint(rows["path"].tolist(), rows["group"].tolist())
    crossing = []
    if split_all:
        rows["split"] = split_all
    elif keep_folder_split:
        rows["split"] = rows["folder_split"]
        crossing = crossing_groups(rows["group"].tolist(), rows["split"].tolist(), rows["path"].tolist())
        crossing += listed_in_two_splits(rejected, dict(zip(rows["path"], rows["group"])))
    else:
        rows["split"] = stratified_group_split(rows, names, fractions, seed)
    manifest = _manifest_frame(rows)
    expected = [split_all] if split_all else sorted(set(manifest["split"])) if keep_folder_split else \
        [name for name, f in zip(SPLITS, fractions) if f > 0]
    warn_empty_cells(manifest, names, expected)
    report = _report(manifest, dup_groups, names, rejected, crossing, origin, kind, seed, fractions,
                     near_dup_threshold, split_all, keep_folder_split)
    report["grouping"], report["copy_matcher"] = grouping, copies
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    _write(out_dir, manifest, report, overwrite)
    return report


def load_manifest(path) -> pd.DataFrame:
    """Read a manifest CSV; paths come back absolute (relative ones resolved against the manifest's folder).

    Raises BonefracError when the file is missing/unreadable, required columns are missing (naming them and
    the available ones), a path or sha256 cell is blank, or a split value is not train/val/test.
    """
    path = Path(path)
    frame = read_csv(path, dtype={c: str for c in ("path", "label", "group", "split", "sha256")})
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise BonefracError(f"manifest {path} lacks column(s) {missing}; available: {list(frame.columns)}")
    bad = sorted(set(frame["split"].fillna("").astype(str)) - set(SPLITS))  # a blank cell reads as NaN
    if bad:
        raise BonefracError(f"manifest {path}: unknown split value(s) {bad}; expected {list(SPLITS)}")
    for col in ("path", "sha256"):  # both key the image cache: a blank would reuse stale pixels or crash later
        blank = frame[col].isna() | (frame[col].str.strip() == "")
        if blank.any():
            first = int(np.flatnonzero(blank.to_numpy())[0]) + 1
            raise BonefracError(f"manifest {path}: {int(blank.sum())} row(s) without a {col} (the first is data "
                                f"row {first}); make manifests with `bonefrac prepare`, which fills every column")
    resolve_paths(frame, path)
    no_group = frame["group"].isna() | (frame["group"].str.strip() == "")
    if no_group.any():  # never let blank cells become one shared "nan" group
        log.warning("manifest %s: %d row(s) without a group; each is treated as its own group",
                    path, int(no_group.sum()))
        frame.loc[no_group, "group"] = "ungrouped:" + frame.loc[no_group, "path"]
    return frame


def class_names_for(manifest_path, df: pd.DataFrame) -> list[str]:
    """Class names in class-index order: from prepare_report.json beside the manifest, else sorted labels."""
    report_path = Path(manifest_path).parent / "prepare_report.json"
    if report_path.is_file():
        try:
            names = json.loads(report_path.read_text()).get("class_names")
        except (OSError, ValueError) as exc:
            raise BonefracError(f"cannot read {report_path}: {exc}") from None
        if names:
            unknown = sorted(set(df["label"].astype(str)) - set(names))
            if unknown:
                raise BonefracError(f"labels {unknown} in the manifest are not in {report_path} class_names")
            return [str(n) for n in names]
    return sorted_labels(df["label"].astype(str))


def manifest_sha256(path) -> str:
    """Hex SHA-256 of the manifest file's bytes (checkpoints record it to tie a model to its data)."""
    return file_sha256(path)


# --- checks -------------------------------------------------------------------------------------------------


def _check_out_dir(out_dir) -> None:
    """Refuse an out_dir that is, or lies under, an existing file: mkdir would fail only after all the decoding."""
    for folder in (Path(out_dir), *Path(out_dir).parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise BonefracError(f"cannot write to --out {out_dir}: {folder} is a file, not a folder; choose "
                                    "another --out")
            return


def _without_unwritable_names(rows: pd.DataFrame, rejected: list) -> pd.DataFrame:
    """`rows` less the files whose names are not valid UTF-8 (bytes from a Latin-1 system), which join `rejected`:
    the manifest, a UTF-8 CSV, cannot name them, and finding out only when writing it lost all the decoding."""
    bad = np.array([not _is_utf8(p) for p in rows["path"]], dtype=bool)
    for path in rows.loc[bad, "path"]:
        log.warning("rejected %s: its file name is not valid UTF-8 (rename it)", printable_path(path))
        rejected.append({"path": printable_path(path), "reason": "file name is not valid UTF-8 (rename the file)"})
    if len(bad) and bad.all():
        raise BonefracError(f"none of the {len(bad)} image file names is valid UTF-8; rename the files")
    return rows.loc[~bad].reset_index(drop=True) if bad.any() else rows


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")  # os.listdir gives undecodable name bytes as lone surrogates, which fail here
    except UnicodeEncodeError:
        return False
    return True


def _check_options(fractions, split_all, keep_folder_split) -> np.ndarray:
    if split_all is not None:
        if split_all not in SPLITS:
            raise BonefracError(f"split_all must be one of {list(SPLITS)}, got {split_all!r}")
        if keep_folder_split:
            raise BonefracError("choose split_all or keep_folder_split, not both")
    try:
        values = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.full(1, np.nan)
    if values.shape != (3,) or not np.isfinite(values).all() or (values < 0).any() or abs(values.sum() - 1) > 1e-3:
        raise BonefracError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions!r}")
    return values


def _check_classes(rows: pd.DataFrame, names: list, class_names) -> None:
    present = set(rows["label"])
    if len(present) < 2 and (class_names is None or len(names) < 2):
        raise BonefracError(f"only one class ({sorted(present)}) among the readable images: a classifier "
                            "needs at least two (give class_names to prepare a one-class test set)")
    absent = [n for n in names if n not in present]
    if absent:
        log.warning("classes with no readable image: %s", absent)


# --- decoding and hashing -----------------------------------------------------------------------------------


def _analyse_one(path: str):
    """Worker: (sha256, width, height, hashes) for one file, or the reason it cannot be used."""
    try:
        data = read_bytes(path)
        img = decode_image(data, path)
    except ImageReadError as exc:
        return exc.reason
    if img.min() == img.max():  # no content; its hash would be noise shared by every other blank image
        return f"blank image (every pixel is {int(img.min())})"
    return hashlib.sha256(data).hexdigest(), img.shape[1], img.shape[0], dihedral_phash(img)


def _analyse(rows: pd.DataFrame, workers):
    """Decode every image once; -> (readable rows with sha256/width/height, rejected, hashes (N, 8, 4))."""
    repeated = rows["path"].duplicated()
    first = dict(zip(rows.loc[~repeated, "path"], rows.loc[~repeated, "label"]))
    rejected = [{"path": p, "reason": "listed more than once" if lab == first[p] else
                 f"listed more than once with another label ({lab!r}; the first row's {first[p]!r} is kept)"}
                for p, lab in zip(rows.loc[repeated, "path"], rows.loc[repeated, "label"])]
    if "folder_split" in rows:  # a given split that lists one file (or a link to it) in two splits leaks it
        kept = dict(zip(rows.loc[~repeated, "path"], rows.loc[~repeated, "folder_split"]))
        for entry, split in zip(rejected, rows.loc[repeated, "folder_split"]):
            if split != kept[entry["path"]]:
                entry.update(reason=f"listed again in split '{split}' (kept in '{kept[entry['path']]}'): one file "
                                    "in two splits", splits=sorted({split, kept[entry["path"]]}))
    if conflicts := sum("another label" in r["reason"] for r in rejected):
        log.warning("%d image(s) listed again with a different label: the first label is kept (see "
                    "prepare_report.json, 'rejected')", conflicts)
    rows = rows.loc[~repeated].reset_index(drop=True)
    workers = max(1, int(workers if workers is not None else os.cpu_count() or 1))
    paths = rows["path"].tolist()
    with tqdm(total=len(paths), desc="reading images", unit="img", dynamic_ncols=True) as bar:
        if workers > 1 and len(paths) > 4 * workers:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                chunk = max(1, min(64, len(paths) // (workers * 8)))
                results = _tracked(pool.map(_analyse_one, paths, chunksize=chunk), bar)
        else:
            results = _tracked(map(_analyse_one, paths), bar)
    ok = [isinstance(r, tuple) for r in results]
    for path, result in zip(paths, results):
        if not isinstance(result, tuple):
            log.warning("rejected %s: %s", path, result)
            rejected.append({"path": path, "reason": result})
    good = rows.loc[ok].reset_index(drop=True)
    kept = [r for r in results if isinstance(r, tuple)]
    if not kept:
        if not any(Path(p).exists() for p in paths):  # most likely a CSV whose paths resolve elsewhere
            raise BonefracError(f"none of the {len(paths)} image files exists (the first: {paths[0]}); a labels "
                                "CSV's paths are relative to the CSV's folder, or to SOURCE when one is given")
        raise BonefracError(f"none of the {len(paths)} image files could be used (see the warnings: unreadable "
                            "or blank)")
    good["sha256"], good["width"], good["height"] = ([r[i] for r in kept] for i in range(3))
    return good, rejected, np.stack([r[3] for r in kept])


def _tracked(results, bar) -> list:
    out = []
    for result in results:
        out.append(result)
        bar.update()
    return out


# --- output -------------------------------------------------------------------------------------------------


def resolve_paths(frame: pd.DataFrame, manifest_path) -> None:
    """Make `frame`'s image paths (its PATH_COLUMNS) absolute in place, relative ones against the manifest's
    folder; blank cells stay blank."""
    base = Path(manifest_path).resolve().parent
    for col in PATH_COLUMNS & set(frame.columns):
        frame[col] = [_absolute(p, base) for p in frame[col]]


def _absolute(p, base: Path):
    if not isinstance(p, str) or not p:  # an original's empty `augmented_from`
        return p
    return str(p if Path(p).is_absolute() else (base / p).resolve())


def write_manifest(frame: pd.DataFrame, path) -> None:
    """Write `frame` as a manifest CSV with absolute image paths made relative to its folder, so a manifest
    moved or copied together with its images (another machine, another mount point) still finds them;
    `load_manifest` resolves them back to absolute paths. Paths on another drive (Windows) stay absolute."""
    path = Path(path)
    base = path.resolve().parent
    out = frame.copy()
    for col in PATH_COLUMNS & set(out.columns):
        out[col] = [_relative(p, base) for p in out[col]]
    out.to_csv(path, index=False)


def _relative(p, base: Path):
    if not isinstance(p, str) or not p or not Path(p).is_absolute():  # relative ones already are to `base`
        return p
    try:
        return Path(os.path.relpath(p, base)).as_posix()
    except ValueError:  # different drive
        return p


def _manifest_frame(rows: pd.DataFrame) -> pd.DataFrame:
    extras = [c for c in rows.columns if c not in MANIFEST_COLUMNS and c not in ("folder_split", GIVEN_GROUP,
                                                                                     OTHER_GIVEN)]
    return rows[list(MANIFEST_COLUMNS) + extras]


def _report(manifest, dup_groups, names, rejected, crossing, origin, kind, seed, fractions, threshold, split_all,
            keep_folder_split) -> dict:
    """The report dict; duplicates and label conflicts are listed by duplicate group (`dup_groups`, one per row:
    a patient's distinct images with different labels are no conflict), under the id of the manifest's group."""
    counts = {"total": {n: int((manifest["label"] == n).sum()) for n in names}}
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        counts[split] = {n: int((part["label"] == n).sum()) for n in names}
    duplicates, conflicts = [], []
    for _, members in manifest.groupby(np.asarray(dup_groups), sort=True):
        group = members["group"].iloc[0]
        if len(members) > 1:
            kind_ = "exact" if members["sha256"].nunique() == 1 else "near"
            duplicates.append({"group": group, "kind": kind_, "labels": sorted(set(members["label"])),
                               "paths": members["path"].tolist()})
        if members["label"].nunique() > 1:
            conflicts.append({"group": group, "labels": members["label"].value_counts().to_dict(),
                              "paths": members["path"].tolist()})
    if conflicts:
        log.warning("%d duplicate group(s) hold images with different labels (see label_conflict_groups)",
                    len(conflicts))
    mode = f"all:{split_all}" if split_all else "folder" if keep_folder_split else "stratified_grouped"
    return {
        "source": origin, "source_type": kind, "class_names": list(names), "n_images": int(len(manifest)),
        "n_groups": int(manifest["group"].nunique()), "n_duplicate_groups": len(duplicates),
        "n_rejected": len(rejected), "counts": counts, "split_mode": mode, "seed": seed,
        "fractions": [float(f) for f in fractions], "near_dup_threshold": int(threshold),
        "duplicate_groups": duplicates, "label_conflict_groups": conflicts, "crossing_groups": crossing,
        "rejected": rejected,
    }


def _write(out_dir, manifest: pd.DataFrame, report: dict, overwrite: bool) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, new = out / "manifest.csv", out / "manifest.csv.new"
    try:
        write_manifest(manifest, new)
        if target.is_file() and not overwrite:
            _refuse_another_manifest(target, new, report["class_names"])
        os.replace(new, target)
    finally:
        new.unlink(missing_ok=True)
    text = json.dumps(report, indent=2, default=str) + "\n"  # atomically: train reads the class order from it
    write_atomically(out / "prepare_report.json", lambda tmp: tmp.write_text(text))
    log.info("wrote %s: %d images in %d groups (%d duplicate groups), %d rejected", out / "manifest.csv",
             report["n_images"], report["n_groups"], report["n_duplicate_groups"], report["n_rejected"])


def _difference(old_file: Path, new_file: Path) -> str:
    """What re-preparing would change, e.g. "2 images added, 5 relabelled, 130 in another split", by path."""
    try:
        old, new = (pd.read_csv(f, dtype=str, keep_default_na=False).set_index("path") for f in (old_file, new_file))
    except (OSError, ValueError, KeyError, pd.errors.ParserError):  # KeyError: no path column (not bonefrac's)
        return "it could not be compared row by row"
    both = old.index.intersection(new.index)
    counts = {"added": len(new.index.difference(old.index)), "removed": len(old.index.difference(new.index))}
    for column, what in (("label", "relabelled"), ("split", "in another split"), ("group", "in another group")):
        if column in old.columns and column in new.columns:
            counts[what] = int((old.loc[both, column] != new.loc[both, column]).sum())
    said = [f"{n} image{'s' if n != 1 else ''} {what}" for what, n in counts.items() if n]
    return ", ".join(said) if said else "the same images, labels and splits, written differently"


def _refuse_another_manifest(target: Path, new: Path, class_names: list) -> None:
    """Raise unless `target` already holds manifest `new` with the same class order. Runs trained on the old
    manifest must still resume and evaluate honestly: another split would let them train on its test images,
    and another class order (same manifest bytes) would swap what each class index means."""
    if target.read_bytes() != new.read_bytes():
        raise BonefracError(f"{target} already holds a different manifest ({_difference(target, new)}); "
                            "choose another --out, or pass --overwrite to replace it")
    try:
        old = json.loads((target.parent / "prepare_report.json").read_text()).get("class_names")
    except (OSError, ValueError, AttributeError):  # no readable report: nothing recorded to contradict
        return
    if old is not None and list(old) != list(class_names):
        raise BonefracError(f"{target.parent} was prepared with the class order {list(old)}, now {list(class_names)}:"
                            " runs trained on it would read every label as another class; choose another --out, "
                            "or pass --overwrite to replace it")
