"""Merge the shared bonebreak and hbfmid3 sets into one 3-class labels CSV with the reference class names.

    python scripts/make_threeclass_csv.py --data ../shared/data --out work/threeclass/labels.csv
    bonefrac prepare --labels work/threeclass/labels.csv --out work/threeclass      # groups duplicates ACROSS sets
    python scripts/make_threeclass_csv.py --check work/threeclass/manifest.csv      # overlap and distinct counts
    python scripts/make_threeclass_csv.py --regroup work/threeclass/manifest.csv --out-dir work/threeclass_g

As an external binary test set for a FracAtlas model (`fractured` = comminuted or simple fracture):

    python scripts/make_threeclass_csv.py --data ../shared/data --out work/ext/labels.csv
    bonefrac prepare --labels work/ext/labels.csv --label-col fractured --class-names no_fracture,fracture \
        --split-all test --out work/ext
    python scripts/make_threeclass_csv.py --regroup work/ext/manifest.csv --keep-split --out-dir work/ext_g
    bonefrac evaluate models/fracatlas_effnet_lite --manifest work/ext_g/manifest.csv --split test --out eval/ext

`--regroup` is needed for honest numbers on these two sets: both are Roboflow exports holding several augmented
copies of each source (small rotations, shears, crops), which `prepare`'s pixel grouping does not recognise (on
hbfmid3 the 11 comminuted source stems become 37 groups and 116 of 158 stems straddle train/val/test). It joins
prepare's groups with the exports' source file stems (hbfmid3 `source_stem`, bonebreak `source_name` before
`.rf.`) and re-splits by the joined groups. Different sources sharing a stem only makes groups larger (safe).

The CSV has `image` (absolute path), `label` (comminuted_fracture, no_fracture, simple_fracture), `source`
(bonebreak / hbfmid3) and the sets' own type columns. De-duplication across the two sets is `prepare`'s
grouping: one image present in both ends up in one group, so the grouped split never separates them;
`--check` says how many groups span both sets and how many distinct (group-level) images each class has.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger("bonefrac.make_threeclass_csv")
REFERENCE_NAMES = {"comminuted": "comminuted_fracture", "simple": "simple_fracture", "no_fracture": "no_fracture"}
SETS = ("bonebreak", "hbfmid3")


def merge(data_root: Path, sets=SETS) -> pd.DataFrame:
    """One table of every image of `sets` under `data_root`, labels mapped to the reference names."""
    from bonefrac.errors import BonefracError

    frames = []
    for name in sets:
        csv = data_root / name / "labels.csv"
        if not csv.is_file():
            raise BonefracError(f"labels CSV not found: {csv}")
        df = pd.read_csv(csv)
        unknown = sorted(set(df.label) - set(REFERENCE_NAMES))
        if unknown:
            raise BonefracError(f"{csv}: labels {unknown} have no reference name ({sorted(REFERENCE_NAMES)})")
        df["image"] = [str((csv.parent / p).resolve()) for p in df.image]
        df["label"] = df.label.map(REFERENCE_NAMES)
        df.insert(2, "source", name)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["source_key"] = source_key(out)  # for `--regroup` and `leakage_study.py --group-col source_key`
    out["fractured"] = (out.label != "no_fracture").astype(int)  # binary view, e.g. an external FracAtlas test
    return out


def check(manifest: Path) -> dict:
    """Cross-set duplicate groups and distinct images per class of a prepared 3-class manifest."""
    from bonefrac.manifest import load_manifest

    df = load_manifest(manifest)
    if "source" not in df.columns:
        from bonefrac.errors import BonefracError
        raise BonefracError(f"{manifest}: no 'source' column; prepare the CSV this script writes")
    per_group = df.groupby("group").source.nunique()
    summary = {"images": len(df), "groups": int(df.group.nunique()),
               "groups_in_both_sets": int((per_group > 1).sum()),
               "images_in_cross_set_groups": int(df.group.isin(per_group[per_group > 1].index).sum()),
               "images_per_class": df.label.value_counts().to_dict(),
               "distinct_per_class": df.groupby("label").group.nunique().to_dict(),
               "test_distinct_per_class": df[df.split == "test"].groupby("label").group.nunique().to_dict()}
    return summary


def source_key(df: pd.DataFrame) -> pd.Series:
    """The export's source-file stem per row, prefixed with the set name ('' where unknown)."""
    stem = pd.Series("", index=df.index)
    if "source_stem" in df.columns:
        stem = stem.mask(df.source_stem.notna() & (df.source_stem != ""), df.source_stem)
    if "source_name" in df.columns:
        names = df.source_name.fillna("").astype(str).str.split(".rf.").str[0]
        stem = stem.mask((stem == "") & (names != ""), names)
    return df.source.astype(str) + ":" + stem.astype(str)


def join_groups(groups: list[str], keys: list[str]) -> list[str]:
    """Union of two groupings (rows sharing a group OR a non-empty key end up together); ids j00000..."""
    parent: dict[str, str] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for g, k in zip(groups, keys):
        if k and not k.endswith(":"):
            parent[find("k" + k)] = find("g" + g)
    roots = [find("g" + g) for g in groups]
    ids = {r: f"j{i:05d}" for i, r in enumerate(dict.fromkeys(roots))}
    return [ids[r] for r in roots]


def group_split(df: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 42) -> list[str]:
    """Stratified split of whole groups: each group (by majority label, in random order, largest first)
    goes to the split furthest below its share of that class's images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    majority = df.groupby("group").label.agg(lambda s: s.value_counts().index[0])
    sizes = df.group.value_counts()
    assign = {}
    for _, members in majority.groupby(majority):
        names = list(rng.permutation(members.index.to_numpy()))
        names.sort(key=lambda g: -sizes[g])
        target = np.asarray(fractions) * sizes[names].sum()
        filled = np.zeros(3)
        for g in names:
            k = int(np.argmax((target - filled) / np.maximum(target, 1e-9)))
            assign[g], filled[k] = ("train", "val", "test")[k], filled[k] + sizes[g]
    return [assign[g] for g in df.group]


def regroup(manifest: Path, out_dir: Path, seed: int = 42, keep_split: bool = False) -> dict:
    """Write out_dir/manifest.csv with prepare's groups joined with the source stems, re-split by group
    (`keep_split`: keep the manifest's splits, e.g. an all-test external set; the groups still get joined,
    which is what a group bootstrap needs)."""
    from bonefrac.manifest import class_names_for, load_manifest

    df = load_manifest(manifest)
    df["pixel_group"] = df.group
    keys = df.source_key.fillna("").astype(str) if "source_key" in df.columns else source_key(df)
    df["group"] = join_groups(df.group.astype(str).tolist(), keys.tolist())
    if not keep_split:
        df["split"] = group_split(df, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "manifest.csv", index=False)
    report = {"class_names": class_names_for(manifest, df), "regrouped_from": str(manifest.resolve()),
              "n_images": len(df), "n_groups": int(df.group.nunique()), "n_pixel_groups": int(df.pixel_group.nunique()),
              "counts": df.groupby(["split", "label"]).size().unstack(fill_value=0).to_dict(orient="index")}
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2, default=int))
    return report


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="folder holding bonebreak/ and hbfmid3/")
    p.add_argument("--out", help="labels CSV to write")
    p.add_argument("--check", help="a manifest prepared from that CSV: report cross-set duplicates")
    p.add_argument("--regroup", help="a manifest prepared from that CSV: join groups with source stems, re-split")
    p.add_argument("--out-dir", help="folder for the --regroup manifest")
    p.add_argument("--keep-split", action="store_true", help="--regroup joins groups but keeps the splits")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    from bonefrac.errors import BonefracError

    try:
        if args.out:
            df = merge(Path(args.data))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out, index=False)
            log.info("%s: %d images %s", args.out, len(df), df.groupby(["source", "label"]).size().to_dict())
        if args.regroup:
            if not args.out_dir:
                raise BonefracError("--regroup needs --out-dir")
            report = regroup(Path(args.regroup), Path(args.out_dir), args.seed, args.keep_split)
            log.info("%s/manifest.csv: %d groups (prepare: %d)", args.out_dir, report["n_groups"],
                     report["n_pixel_groups"])
        if args.check:
            sys.stdout.write(json.dumps(check(Path(args.check)), indent=2) + "\n")
        if not (args.out or args.check or args.regroup):
            raise BonefracError("give --out CSV (merge), --regroup MANIFEST and/or --check MANIFEST")
    except BonefracError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
