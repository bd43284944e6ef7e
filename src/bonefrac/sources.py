"""Read an image source into labelled rows for `manifest.prepare`: an ImageFolder tree or a labels CSV.

``collect(source, labels_csv, path_col, label_col, recomputed, group_col)`` returns ``(rows, rejected, kind,
origin)``: rows with absolute ``path``, raw ``label``, ``folder_split`` (train/val/test layouts and CSVs with a
``split`` column only), ``given_group`` (the ``group_col`` values, CSVs only) and any extra CSV columns;
``rejected`` lists files that cannot be used (not an image type, an image outside any class folder, a broken
symbolic link). Without ``group_col``, CSV columns that look like patient/study IDs are warned about.
``resolve_labels`` maps raw labels to class names. ``read_csv`` is the package's CSV reader (errors name the
file); `bonefrac.manifest` re-exports it. ``box_masks`` reads a CSV of lesion boxes (train uses it).

Apart from ``read_csv`` and ``box_masks``, only `manifest.prepare` uses this module: the house rule is that only
prepare scans folders (and makes splits).
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import BonefracError
from .groups import GIVEN_GROUP, id_like_columns
from .io import broken_link_reason, ignored_name, is_broken_link, looks_like_image, walk_files

log = logging.getLogger(__name__)

PATH_COLUMNS = {"path", "augmented_from"}  # image paths: relative to the manifest's (or CSV's) folder on disk

# Label cells that mean "no label" in exported spreadsheets (compared case-folded): as labels they made a class.
_NO_LABEL = {"", "na", "n/a", "nan", "none", "null"}
# Folder names and CSV `split` values accepted for each split; the values are the manifest's split names.
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def collect(source, labels_csv, path_col, label_col, recomputed, group_col=None):
    """-> (rows with path/label[/folder_split][/given_group]/extras, rejected, source kind, source description).

    CSV columns named in ``recomputed`` (the manifest's own columns) are not carried over as extras.
    ``group_col`` (a CSV column of patient/study IDs) needs a labels CSV.
    """
    if source is None and labels_csv is None:
        raise BonefracError("give an image folder (source) or a labels CSV (labels_csv)")
    if source is not None and not Path(source).exists():
        raise BonefracError(f"source not found: {source}")
    if labels_csv is None and Path(source).is_file():
        labels_csv, source = source, None
    if labels_csv is not None:
        base = Path(source) if source is not None else Path(labels_csv).parent
        rows = _rows_from_csv(Path(labels_csv), base, path_col, label_col, recomputed, group_col)
        return rows, [], "csv", str(Path(labels_csv).resolve())
    if group_col is not None:
        raise BonefracError(f"group_col ({group_col!r}) needs a labels CSV: an image folder names no patients. List "
                            "the images in a CSV with a patient column (or add one to the manifest.csv that "
                            "prepare wrote for the folder) and prepare that CSV with it")
    rows, rejected, kind = _rows_from_folder(Path(source))
    return rows, rejected, kind, str(Path(source).resolve())


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """`pd.read_csv` with a BonefracError naming the file for a missing or unreadable CSV."""
    if not path.is_file():
        raise BonefracError(f"CSV file not found: {path}")
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise BonefracError(f"cannot read CSV {path}: {str(exc).strip()}") from None


def sorted_labels(labels) -> list[str]:
    """Distinct labels as strings, in class-index order: numerically if all are integers, else sorted."""
    unique = sorted({str(v) for v in labels})
    if unique and all(re.fullmatch(r"-?\d+", v) for v in unique):
        return sorted(unique, key=int)  # "10" after "9", as class indices
    return unique


def resolve_labels(raw: pd.Series, class_names):
    """-> (label names per row, class_names in index order); integer labels index ``class_names``."""
    # NFC: a name typed on one system and a folder made on macOS (NFD) are the same text, so the same class.
    raw = raw.astype(str).str.strip().map(lambda s: unicodedata.normalize("NFC", s))
    _refuse_case_variants(raw)
    if class_names is None:
        _refuse_missing_like(raw)
        return raw, sorted_labels(raw)
    names = [n.strip() for n in class_names.split(",")] if isinstance(class_names, str) else \
        [str(n) for n in class_names]
    names = [unicodedata.normalize("NFC", n) for n in names]
    if len(set(names)) != len(names) or "" in names:
        raise BonefracError(f"class_names must be distinct and non-empty, got {names}")
    _refuse_missing_like(pd.Series(names))
    if not set(raw) <= set(names) and raw.str.fullmatch(r"\d+").all():
        index = raw.astype(int)
        bad = sorted(set(index[index >= len(names)]))
        if bad:
            raise BonefracError(f"integer label(s) {bad} not covered by class_names {names} "
                                f"(0..{len(names) - 1})")
        return index.map(lambda i: names[i]), names
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise BonefracError(f"unknown label(s) {unknown[:10]}: not in class_names {names}")
    return raw, names


def _refuse_missing_like(names: pd.Series) -> None:
    """BonefracError for class names that CSV readers take for a missing value (a folder named None, NA, null or
    nan): the manifest would hold an empty label."""
    bad = sorted({n for n in names if n.casefold() in _NO_LABEL})
    if bad:
        raise BonefracError(f"class name(s) {bad} read as missing values in CSV files (the manifest's labels would "
                            "be empty); rename those class folders or labels")


def _refuse_case_variants(labels: pd.Series) -> None:
    """BonefracError naming labels that differ only in case or surrounding spaces ("Fracture", "fracture"): they
    would silently become separate classes of one finding."""
    variants: dict[str, list[str]] = {}
    for label in sorted(set(labels)):
        variants.setdefault(label.strip().casefold(), []).append(label)
    clashes = [" / ".join(map(repr, names)) for names in variants.values() if len(names) > 1]
    if clashes:
        raise BonefracError(f"labels that differ only in case or spaces would become separate classes: "
                            f"{'; '.join(clashes[:10])}; spell each class one way (CSV labels or folder names)")


def _rows_from_csv(csv: Path, base: Path, path_col: str | None, label_col: str, recomputed,
                   group_col: str | None) -> pd.DataFrame:
    frame = read_csv(csv, dtype=str, keep_default_na=False)
    if path_col is None:  # a manifest (from prepare or augment) names its paths "path"
        path_col = "path" if "image" not in frame.columns and "path" in frame.columns else "image"
    missing = [c for c in (path_col, label_col, group_col) if c is not None and c not in frame.columns]
    if missing:
        raise BonefracError(f"{csv} lacks column(s) {missing}; available: {list(frame.columns)} (name them with "
                            "--path-col / --label-col / --group-col)")
    if frame.empty:
        raise BonefracError(f"{csv} has no rows")
    for col in (path_col, label_col):
        cells = frame[col].str.strip()
        blank = np.flatnonzero(cells.str.casefold().isin(_NO_LABEL) if col == label_col else cells == "")
        what = " (a missing label: blank, NA, N/A, nan, none or null)" if col == label_col else ""
        if len(blank):  # +2: the header is line 1 and rows count from 0
            raise BonefracError(f"{csv}: empty '{col}'{what} on line(s) {[int(i) + 2 for i in blank[:10]]}")
    rows = pd.DataFrame({
        "path": [_resolved(base / p.strip()) for p in frame[path_col]],
        "label": frame[label_col].str.strip(),
    })
    if "split" in frame.columns:
        # Unknown values are judged by prepare: an error with keep_folder_split, else the column is ignored.
        rows["folder_split"] = [_SPLIT_ALIASES.get(s.strip().lower(), s) for s in frame["split"]]
    if group_col is not None:
        rows[GIVEN_GROUP] = _group_column(frame, csv, group_col)
    else:
        _warn_unused_id_columns(csv, id_like_columns(frame.columns, exclude=(path_col, label_col)))
    # `split` is read above as the given split (prepare keeps it with --keep-folder-split): not reported as dropped.
    dropped = [c for c in frame.columns if c in recomputed and c not in (path_col, label_col, group_col, "split")]
    if dropped:
        log.info("CSV columns %s are recomputed by prepare and not carried over", dropped)
    for col in frame.columns:
        if col not in (path_col, label_col) and col not in recomputed:
            rows[col] = frame[col].to_numpy()
    for col in PATH_COLUMNS & set(rows.columns) - {"path"}:  # e.g. augmented_from: relative to this CSV too
        rows[col] = [str((base / p.strip()).resolve()) if p.strip() else "" for p in rows[col].astype(str)]
    return rows


# Cells that mean "no ID" in exported spreadsheets: as IDs they would join unrelated patients into one group.
_NO_ID = _NO_LABEL | {"unknown", "-", "--", "?"}


def _group_column(frame: pd.DataFrame, csv: Path, group_col: str) -> np.ndarray:
    """The group column's values, stripped; a blank or placeholder cell ("NA", "unknown", "-", ...) links its image
    to no other (warned, with a count), and one ID holding a large share of the images is warned about."""
    values = frame[group_col].str.strip()
    values = values.where(~values.str.lower().isin(_NO_ID), "")
    if blank := int((values == "").sum()):
        log.warning("%s: %d row(s) with an empty or placeholder '%s' (NA, unknown, -, ...): each of those images is "
                    "only grouped with its duplicates", csv, blank, group_col)
    counts = values[values != ""].value_counts()
    if len(values) >= 20 and len(counts) and counts.iloc[0] > 0.1 * len(values):  # names no value: logs hold no IDs
        log.warning("%s: one '%s' value covers %d of %d images: if it is a placeholder rather than one patient, "
                    "the split cannot be balanced (blank those cells)", csv, group_col, int(counts.iloc[0]),
                    len(values))
    return values.to_numpy()


def _warn_unused_id_columns(csv: Path, columns: list) -> None:
    # Names only, never values: the values are patient identifiers, and logs must hold none.
    if columns:
        log.warning("%s: column(s) %s look like patient or study IDs but are not used: without --group-col, "
                    "prepare groups images by their pixels only, so one patient's images can land in different "
                    "splits (and the confidence intervals come out too narrow). Pass --group-col %s to keep "
                    "images that share a value together", csv, columns, columns[0])


def _rows_from_folder(root: Path):
    if not root.is_dir():
        raise BonefracError(f"source is neither a folder nor a CSV file: {root}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not ignored_name(d.name))
    if not subdirs:
        raise BonefracError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    rejected = _stray_images(root)
    split_dirs = [d.name for d in subdirs if d.name.lower() in _SPLIT_ALIASES]
    if split_dirs and len(split_dirs) < len(subdirs):  # guessing either layout would be silently wrong
        others = [d.name for d in subdirs if d.name.lower() not in _SPLIT_ALIASES]
        raise BonefracError(f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders "
                            f"({', '.join(others[:5])}); move those out (a --out folder too) or list the images "
                            f"in a labels CSV")
    # Real paths a link inside a class folder must not lead into: the root, the split and the class folders.
    class_parents = subdirs if split_dirs else [root]
    seen = {os.path.realpath(d) for d in [root, *subdirs]} | {
        os.path.realpath(c) for parent in class_parents for c in parent.iterdir() if c.is_dir()}
    if split_dirs:
        records = []
        for split_dir in subdirs:
            rejected += _stray_images(split_dir)
            records += _scan_classes(split_dir, _SPLIT_ALIASES[split_dir.name.lower()], rejected, seen)
        kind = "split_folder"
    else:
        records, kind = _scan_classes(root, None, rejected, seen), "folder"
    if not records:
        raise BonefracError(f"no image files found under {root}")
    rows = pd.DataFrame(records, columns=["path", "label", "folder_split"])
    return (rows.drop(columns="folder_split") if kind == "folder" else rows), rejected, kind


def _resolved(path: Path) -> str:
    """The absolute path with links resolved, except that a broken link keeps its own path: resolving it would
    name only its missing target, and the user needs to find the link."""
    return os.path.normpath(path.absolute()) if is_broken_link(path) else str(path.resolve())


def _scan_classes(root: Path, split, rejected: list, seen: set[str]) -> list:
    records = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not ignored_name(d.name)):
        files, loops = walk_files(class_dir, seen)  # linked sub-folders followed; .ipynb_checkpoints/ etc. skipped
        rejected += [{"path": os.path.normpath(d.absolute()), "reason": f"a link to {d.resolve()}: a folder scanned "
                      "already (a link loop, a second link), the dataset root or another class's folder, whose "
                      "images keep their own label"} for d in loops]
        for file in files:
            if is_broken_link(file):  # whatever its name: it may well have been an image
                rejected.append({"path": _resolved(file), "reason": broken_link_reason(file)})
            elif not file.is_file():
                continue
            elif looks_like_image(file):
                records.append((str(file.resolve()), class_dir.name, split))
            else:
                rejected.append({"path": str(file.resolve()), "reason": f"not an image file type ({file.suffix})"})
    return records


def _stray_images(folder: Path) -> list:
    """Image files lying beside the class folders have no label, and a broken link there may be a missing class
    folder: report both."""
    strays = []
    for f in sorted(f for f in folder.iterdir() if not ignored_name(f.name)):
        if is_broken_link(f):
            strays.append({"path": _resolved(f), "reason": broken_link_reason(f)})
        elif f.is_file() and looks_like_image(f):  # the scan's own test: suffix-less DICOM (IM0001) included
            strays.append({"path": str(f.resolve()), "reason": "image outside any class folder (no label)"})
    return strays


def box_masks(rows, boxes_csv: str | Path, size: int, negative_label: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Lesion masks for manifest `rows` (path, label, width, height) from a boxes CSV (image, x, y, w, h).

    Returns `(masks, known)`: uint8 (N, size, size), 1 inside any box of the image stretched to a square like
    the image cache, and float32 (N,) 1 where the mask is known: the image has boxes, or its label is
    `negative_label` (nothing to find). Other images (e.g. fractured but unannotated) get weight 0. Boxes are
    clipped to their image; ones wholly outside are ignored (warned). BonefracError, naming the CSV row, for a
    box with a missing or non-numeric coordinate or a width/height <= 0.
    """
    boxes_csv = Path(boxes_csv)
    boxes = read_csv(boxes_csv)
    missing = {"image", "x", "y", "w", "h"} - set(boxes.columns)
    if missing:
        raise BonefracError(f"{boxes_csv}: boxes CSV lacks column(s) {', '.join(sorted(missing))}")
    base = boxes_csv.resolve().parent
    keys = [str((base / p).resolve()) for p in boxes["image"].astype(str)]
    index = {str(Path(p).resolve()): i for i, p in enumerate(rows["path"])}
    masks = np.zeros((len(rows), size, size), dtype=np.uint8)
    known = (rows["label"].to_numpy() == negative_label).astype(np.float32)
    width, height = rows["width"].to_numpy(float), rows["height"].to_numpy(float)
    coords = pd.DataFrame({c: pd.to_numeric(boxes[c], errors="coerce") for c in "xywh"}).to_numpy(float)
    bad = ~np.isfinite(coords).all(axis=1) | (coords[:, 2] <= 0) | (coords[:, 3] <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise BonefracError(f"{boxes_csv}: {int(bad.sum())} box(es) with a missing or non-numeric coordinate or a "
                            f"width/height <= 0 (the first is data row {first + 1}: {boxes['image'].iloc[first]})")
    matched = outside = 0
    for key, (x, y, w, h) in zip(keys, coords):
        i = index.get(key)
        if i is None:
            continue
        matched += 1
        sx, sy = size / width[i], size / height[i]
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1, y1 = max(x0 + 1, int(np.ceil((x + w) * sx))), max(y0 + 1, int(np.ceil((y + h) * sy)))
        x0, x1, y0, y1 = (int(np.clip(v, 0, size)) for v in (x0, x1, y0, y1))
        if x1 <= x0 or y1 <= y0:  # wholly outside the image: no evidence of where the fracture is
            outside += 1
            continue
        masks[i, y0:y1, x0:x1] = 1
        known[i] = 1.0
    if outside:
        log.warning("%s: %d box(es) lie wholly outside their image; ignored", boxes_csv, outside)
    if matched == 0:
        raise BonefracError(f"{boxes_csv}: no box matches an image of the manifest (paths are read relative to "
                            f"the CSV's folder)")
    return masks, known
