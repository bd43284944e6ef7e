"""Offline augmentation: augmented copies of a manifest's TRAIN images, written as files with a new manifest.

`augment_manifest(manifest, out_dir, balance=True)` is what callers need. It reads a manifest (see
docs/ARCHITECTURE.md), writes `out_dir/images/<class>/<source stem>_aug<k>.png` copies of train images only and
`out_dir/manifest.csv`: every original row (all splits) plus one `train` row per copy.
A copy inherits its source's `label` and `group`, so a later grouped split or leakage check still sees it as
the same image; `augmented_from` names the source (empty for originals). Validation and test rows are never
augmented. Class counts are raised to the largest class (`balance`), to `target` images per class, or
multiplied by `factor`; the same manifest and seed always give byte-identical files.

The transforms are the reference recipe of the 3-class seed work, in its order: rotation, horizontal flip,
brightness/contrast, affine (scale, translate, shear), colour jitter (a second brightness/contrast draw) and an
occasional 3x3 Gaussian blur. Their ranges come from an `AugmentConfig` (the defaults are the reference).

Offline copies only add variants of images the model already sees; bonefrac's trainer augments online anyway.
This module exists to reproduce (and measure, see benchmarks/leakage_study.py) the seed recipe honestly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _stdio
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .config import AugmentConfig
from .errors import BonefracError
from .io import read_image

log = logging.getLogger(__name__)

FORMATS = {"png": ("PNG", {"optimize": False}), "webp": ("WEBP", {"quality": 90, "method": 4})}


def target_counts(counts: dict[str, int], balance: bool = False, target: int | None = None,
                  factor: float | None = None) -> dict[str, int]:
    """Final number of train images per class: `factor` x the class count, then raised to the largest class
    (`balance`) or to `target`; never below the class's original count."""
    if not (balance or target or factor):
        raise BonefracError("say how far to augment: --balance, --target N or --factor K")
    if target is not None and target < 1:
        raise BonefracError(f"--target must be a positive image count per class, got {target}")
    if factor is not None and not (math.isfinite(factor) and factor >= 1):
        raise BonefracError(f"--factor must be a number >= 1 (1 = no extra copies), got {factor}")
    base = {c: int(round(n * (factor or 1))) for c, n in counts.items()}
    goal = dict(base)
    if balance:
        goal = {c: max(base.values()) for c in base}
    if target is not None:
        goal = {c: max(goal[c], target) for c in goal}
    return {c: max(goal[c], counts[c]) for c in counts}


def copies_per_source(sources: list[str], extra: int, seed: int) -> list[int]:
    """Spread `extra` copies over `sources` (sha256 strings) as evenly as possible, seeded, order-free."""
    n = len(sources)
    order = np.argsort(np.asarray(sources), kind="stable")
    order = order[np.random.default_rng(seed).permutation(n)]
    per = np.full(n, extra // n, dtype=int)
    per[order[: extra % n]] += 1
    return per.tolist()


def reference_transform(img: np.ndarray, acfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One random view of a 2-D uint8 image (same shape, uint8) by the reference six transforms."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    bilinear = InterpolationMode.BILINEAR
    height, width = img.shape
    x = torch.from_numpy(np.ascontiguousarray(img))[None]
    x = TF.rotate(x, float(rng.uniform(-acfg.rotate_deg, acfg.rotate_deg)), interpolation=bilinear)
    if rng.random() < acfg.hflip_p:
        x = TF.horizontal_flip(x)
    if rng.random() < acfg.vflip_p:
        x = TF.vertical_flip(x)
    x = _brightness_contrast(x, acfg, rng)
    shift = [round(float(rng.uniform(-acfg.translate, acfg.translate)) * width),
             round(float(rng.uniform(-acfg.translate, acfg.translate)) * height)]
    x = TF.affine(x, angle=0.0, translate=shift, scale=float(rng.uniform(*acfg.scale)),
                  shear=[float(rng.uniform(-acfg.shear_deg, acfg.shear_deg)), 0.0], interpolation=bilinear)
    x = _brightness_contrast(x, acfg, rng)  # the "colour jitter" step: on grey it is a second such draw
    if rng.random() < acfg.blur_p and min(x.shape[-2:]) >= 2:  # reflect padding needs 2 px a side
        x = TF.gaussian_blur(x, [3, 3])
    return x[0].numpy()


def _brightness_contrast(x: torch.Tensor, acfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    x = TF.adjust_brightness(x, float(rng.uniform(1 - acfg.brightness, 1 + acfg.brightness)))
    return TF.adjust_contrast(x, float(rng.uniform(1 - acfg.contrast, 1 + acfg.contrast)))


def copy_rng(seed: int, source_sha, k: int, rank: int = 0) -> np.random.Generator:
    """The random stream of copy `k` of one source: depends on the seed, the source's sha256 cell and `rank`, the
    source path's place among the train rows with that same cell (see `_dup_ranks`), so results do not change
    with row order or the number of worker threads, and exact duplicate sources still get different copies. The
    cell is hashed as text: any cell works, hex digest or not."""
    digest = hashlib.sha256(f"{source_sha}|{rank}".encode()).hexdigest()
    return np.random.default_rng([seed, int(digest[:15], 16), k])


def encode(img: np.ndarray, fmt: str) -> bytes:
    """uint8 grey array -> file bytes (PNG lossless, or WebP quality 90 like the shared data)."""
    pil_format, options = FORMATS[fmt]
    buf = _stdio.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format=pil_format, **options)
    return buf.getvalue()


def _augment_source(job: dict) -> list[dict]:
    """Write every copy of one source image; returns their manifest rows."""
    img = read_image(job["path"])
    rows = []
    for k in range(job["copies"]):
        out = reference_transform(img, job["acfg"], copy_rng(job["seed"], job["sha256"], k, job["rank"]))
        data = encode(out, job["fmt"])
        rel = Path("images") / job["folder"] / f"{job['stem']}_aug{k}.{job['fmt']}"
        (job["out_dir"] / rel).write_bytes(data)
        rows.append({**job["row"], "path": rel.as_posix(), "split": "train",
                     "sha256": hashlib.sha256(data).hexdigest(), "width": out.shape[1], "height": out.shape[0],
                     "augmented_from": job["path"]})
    return rows


def _load(manifest: Path):
    """(rows with absolute paths, class names, the prepare report or {}) of a manifest."""
    from .manifest import class_names_for, load_manifest

    if not manifest.is_file():
        raise BonefracError(f"manifest not found: {manifest}")
    df = load_manifest(manifest)
    missing = {"path", "label", "group", "split", "sha256"} - set(df.columns)
    if missing:
        raise BonefracError(f"{manifest}: not a bonefrac manifest (missing columns {sorted(missing)})")
    df = df.copy()
    df["path"] = [str(p if Path(p).is_absolute() else (manifest.parent / p).resolve()) for p in df.path]
    report_file = manifest.parent / "prepare_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return df, class_names_for(manifest, df), report


def _stems(rows: pd.DataFrame) -> list[str]:
    """File-name stems for copies, unique within the class ignoring case (`Img` and `img` would be one file on
    macOS and Windows): the source's stem; a repeated stem gets the row number, then _2, _3 ... while that name is
    another source's stem (sources `a`, `a`, `a_1`)."""
    stems = [Path(p).stem for p in rows.path]
    counts = Counter(s.casefold() for s in stems)
    used = {s.casefold() for s in stems if counts[s.casefold()] == 1}
    out = []
    for s, i in zip(stems, rows.index):
        name, n = s, 1
        if counts[s.casefold()] > 1:
            name = f"{s}_{i}"
            while name.casefold() in used:
                n += 1
                name = f"{s}_{i}_{n}"
        used.add(name.casefold())
        out.append(name)
    return out


def _dup_ranks(train: pd.DataFrame) -> pd.Series:
    """Each train row's rank among the rows with the same sha256 cell, in path order (0 for a unique image)."""
    order = train.assign(_sha=train.sha256.astype(str), _path=train.path.astype(str)).sort_values(
        ["_sha", "_path"], kind="stable")
    return order.groupby("_sha").cumcount().reindex(train.index)


def _jobs(train: pd.DataFrame, goal: dict[str, int], out_dir: Path, acfg, seed: int, fmt: str) -> list[dict]:
    jobs, folders, ranks = [], set(), _dup_ranks(train)
    for cls, rows in train.groupby("label", sort=True):
        extra = goal[cls] - len(rows)
        if extra <= 0:
            continue
        folder = _class_folder(cls, folders)
        (out_dir / "images" / folder).mkdir(parents=True, exist_ok=True)
        per = copies_per_source(rows.sha256.tolist(), extra, seed)
        for (index, row), stem, n in zip(rows.iterrows(), _stems(rows), per):
            if n:
                jobs.append({"path": row.path, "sha256": row.sha256, "rank": int(ranks[index]), "copies": n,
                             "stem": stem, "folder": folder, "row": row.to_dict(), "acfg": acfg, "seed": seed,
                             "fmt": fmt, "out_dir": out_dir})
    return jobs


def _class_folder(cls, taken: set) -> str:
    """A file-system-safe folder name for class `cls`, distinct from those in `taken` (then added to it):
    classes "a b" and "a_b" would otherwise write their copies over each other's."""
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(cls)) or "class"
    folder, n = base, 1
    while folder.lower() in taken:  # lower: case-insensitive file systems
        n += 1
        folder = f"{base}_{n}"
    taken.add(folder.lower())
    return folder


def augment_manifest(manifest: str | Path, out_dir: str | Path, balance: bool = False, target: int | None = None,
                     factor: float | None = None, seed: int = 0, acfg: AugmentConfig | None = None,
                     fmt: str = "png", workers: int | None = None) -> dict:
    """Write augmented copies of the train split and `out_dir/manifest.csv`; returns the report (also written
    as `out_dir/augment_report.json`). See the module docstring for the layout and guarantees."""
    manifest, out_dir = Path(manifest), Path(out_dir)
    if fmt not in FORMATS:
        raise BonefracError(f"unknown image format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if (out_dir / "manifest.csv").exists():
        raise BonefracError(f"{out_dir} already holds a manifest; choose another --out")
    if acfg is not None and not acfg.enabled:  # the copies would be augmented anyway, under a report saying not
        raise BonefracError("augment.enabled is false: offline augmentation always transforms its copies; drop "
                            "that setting (it switches off training-time augmentation) or do not run augment")
    df, class_names, prep_report = _load(manifest)
    train = df[df.split == "train"]
    if train.empty:
        raise BonefracError(f"{manifest}: no train rows to augment (splits: {sorted(df.split.unique())})")
    counts = {c: int((train.label == c).sum()) for c in class_names if (train.label == c).any()}
    goal = target_counts(counts, balance, target, factor)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(train, goal, out_dir, acfg or AugmentConfig(), seed, fmt)
    log.info("augmenting %d train images into %d copies (%s)", len(train),
             sum(j["copies"] for j in jobs), ", ".join(f"{c} {counts[c]}->{goal[c]}" for c in counts))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # torch and PIL release the GIL while they work
        new_rows = [r for rows in pool.map(_augment_source, jobs) for r in rows]
    if "augmented_from" not in df:  # an already augmented manifest keeps its copies' provenance
        df = df.assign(augmented_from="")
    out = pd.concat([df, pd.DataFrame(new_rows, columns=list(df.columns))], ignore_index=True)
    from .manifest import write_manifest

    write_manifest(out, out_dir / "manifest.csv")
    report = {"source_manifest": str(manifest.resolve()), "seed": seed, "format": fmt, "balance": balance,
              "target": target, "factor": factor, "augment": dataclasses.asdict(acfg or AugmentConfig()),
              "train_before": counts, "train_after": {c: int(((out.split == "train") & (out.label == c)).sum())
                                                      for c in counts},
              "n_copies": len(new_rows)}
    (out_dir / "augment_report.json").write_text(json.dumps(report, indent=2, default=list))
    # Class order lives in prepare_report.json (manifest contract); keep the source's, add where it came from.
    (out_dir / "prepare_report.json").write_text(json.dumps(
        {**prep_report, "class_names": list(class_names), "augmented": report}, indent=2, default=list))
    return report
