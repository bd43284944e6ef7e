"""Leakage study: what offline augmentation before a random split does to reported accuracy.

    python benchmarks/leakage_study.py --data labels.csv --label-col label --arch tf_efficientnetv2_s \
        --size 224 --epochs 10 --aug-factor 4 --out runs/leakage --device cuda

Writes OUT/leakage_study.json and OUT/leakage_study.md. Method (docs/leakage.md):

0. `prepare` the labels CSV (duplicate groups by pixels) and hold out a group-disjoint, class-stratified set of
   ORIGINAL images first (`--holdout`, default 20 % of groups). Neither pipeline ever sees it.
1. seed-style: augment ALL remaining images x`--aug-factor`, split the pool of images at random 70/15/15, write
   it as root/{train,val,test}/<class>/ and run `prepare --keep-folder-split` on it (which lists the duplicate
   groups crossing the split, using the shipped copy detector when there is one), train, evaluate on its own
   test split.
2. bonefrac: grouped, stratified 70/15/15 split of the same remaining images, augment the train split only
   x`--aug-factor`, train, evaluate on its own test split.
Both train with the same config (model, size, epochs, online augmentation), and both are finally evaluated on
the clean held-out originals. The gap between "claimed" (own test split) and "clean" is the leakage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("bonefrac.leakage_study")
SUMMARY_KEYS = ("n", "accuracy", "balanced_accuracy", "auroc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="labels CSV (paths relative to the CSV)")
    p.add_argument("--path-col", default="image")
    p.add_argument("--label-col", default="label")
    p.add_argument("--class-names", help="comma-separated class names (needed for integer labels)")
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="auto", help="model.pretrained for both pipelines")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--aug-factor", type=int, default=4, help="images per original after offline augmentation")
    p.add_argument("--holdout", type=float, default=0.2, help="share of duplicate groups held out clean")
    p.add_argument("--group-col", help="CSV column joined with prepare's pixel groups (e.g. source_key)")
    p.add_argument("--max-images", type=int, help="stratified random subset of the CSV (smoke tests)")
    p.add_argument("--config", help="base training YAML; the flags above override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra training override")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the clean intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="decode/augment workers (default: all cores)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def load_labels(args, out: Path) -> tuple[Path, list[str] | None]:
    """The input CSV with absolute paths (optionally a stratified subset), written to OUT/data.csv."""
    from bonefrac.errors import BonefracError

    src = Path(args.data)
    if not src.is_file():
        raise BonefracError(f"labels CSV not found: {src}")
    df = pd.read_csv(src)
    if args.path_col not in df.columns or args.label_col not in df.columns:
        raise BonefracError(f"{src}: needs columns {args.path_col!r} and {args.label_col!r}; has {list(df.columns)}")
    if args.max_images and args.max_images < len(df):
        share = args.max_images / len(df)
        rng = np.random.default_rng(args.seed)
        keep = [i for _, idx in df.groupby(args.label_col).groups.items()
                for i in rng.choice(idx, max(2, round(len(idx) * share)), replace=False)]
        df = df.loc[sorted(keep)]
    df[args.path_col] = [str((src.parent / p).resolve()) for p in df[args.path_col]]
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "data.csv", index=False)
    return out / "data.csv", args.class_names.split(",") if args.class_names else None


def hold_out(manifest: Path, share: float, seed: int, out: Path, group_col: str | None):
    """Split a prepared set by duplicate group into the pipelines' input OUT/source/manifest.csv (all "train")
    and a clean held-out OUT/holdout/manifest.csv (split "test", original images only). With `group_col`,
    prepare's groups are first joined with that column (e.g. an export's source-file stem)."""
    from bonefrac.manifest import class_names_for, load_manifest

    df = load_manifest(manifest)
    names = class_names_for(manifest, df)
    if group_col:
        if group_col not in df.columns:
            from bonefrac.errors import BonefracError
            raise BonefracError(f"--group-col {group_col!r} is not a column of the labels CSV")
        keys = df[group_col].fillna("").astype(str).tolist()
        df["group"] = _tools().join_groups(df.group.astype(str).tolist(), keys)
    held = holdout_groups(df, share, seed)
    df["split"] = ["test" if g in held else "train" for g in df.group]
    _write_manifest(df[df.split == "test"], out / "holdout", names)
    _write_manifest(df[df.split == "train"], out / "source", names)
    return out / "source" / "manifest.csv", out / "holdout" / "manifest.csv", names


def _write_manifest(rows: pd.DataFrame, folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_csv(folder / "manifest.csv", index=False)
    (folder / "prepare_report.json").write_text(json.dumps({"class_names": names}))


def _tools():
    """scripts/make_threeclass_csv.py as a module (group joining and the grouped split)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_threeclass_csv.py"
    spec = importlib.util.spec_from_file_location("make_threeclass_csv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def holdout_groups(df: pd.DataFrame, share: float, seed: int) -> set[str]:
    """About `share` of the duplicate groups of each class (by the group's majority label), at least one per
    class, drawn at random: whole groups, so no held-out image has a copy among the pipelines' inputs."""
    from bonefrac.errors import BonefracError

    if not 0 < share < 1:
        raise BonefracError(f"--holdout must be between 0 and 1, got {share}")
    majority = df.groupby("group").label.agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed + 7)
    held: set[str] = set()
    for _, groups in majority.groupby(majority):
        if len(groups) < 2:
            raise BonefracError(f"class {groups.iloc[0]!r} has {len(groups)} distinct image(s); need 2 to hold out")
        k = min(len(groups) - 1, max(1, round(share * len(groups))))
        held.update(rng.choice(sorted(groups.index), k, replace=False).tolist())
    return held


def seed_layout(pool_manifest: Path, root: Path, seed: int) -> pd.DataFrame:
    """Random IMAGE-level 70/15/15 split of an augmented pool, written as root/{train,val,test}/<class>/.

    Returns the layout (path, split, and the `group` each copy inherited from its source: the ground truth
    that a pixel-based duplicate check on the folder has to rediscover)."""
    from bonefrac.manifest import load_manifest

    pool = load_manifest(pool_manifest)
    order = np.random.default_rng(seed).permutation(len(pool))
    n_train, n_val = int(0.7 * len(pool)), int(0.15 * len(pool))
    splits = np.empty(len(pool), dtype=object)
    splits[order[:n_train]], splits[order[n_train:n_train + n_val]] = "train", "val"
    splits[order[n_train + n_val:]] = "test"
    dests = []
    for i, (path, label, split) in enumerate(zip(pool.path, pool.label, splits)):
        dest = root / split / label / f"{i:06d}_{Path(path).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(Path(path), dest)
        dests.append(str(dest.resolve()))
    return pd.DataFrame({"path": dests, "split": splits, "true_group": pool.group.to_numpy()})


def crossing_summary(layout: pd.DataFrame, manifest: Path, report: dict) -> dict:
    """Groups crossing the random split: truly (inherited groups) and as flagged by `prepare`, and how many
    of the true groups prepare's pixel-based grouping put back together."""
    from bonefrac.manifest import load_manifest

    found = layout.merge(load_manifest(manifest)[["path", "group"]], on="path", how="left")
    true_cross = found.groupby("true_group").split.nunique()
    multi = found.groupby("true_group").filter(lambda g: len(g) > 1).groupby("true_group").group.nunique()
    flagged = report.get("crossing_groups", [])
    return {"crossing_groups": len(flagged), "images_in_crossing_groups": sum(_n_paths(g) for g in flagged),
            "true_crossing_groups": int((true_cross > 1).sum()), "true_groups_with_copies": int(len(multi)),
            "true_groups_recovered_by_prepare": int((multi == 1).sum())}


def _n_paths(entry: dict) -> int:
    """Images in one crossing_groups entry of a prepare report ({split: [paths]} or a flat path list)."""
    splits = entry.get("splits")
    if isinstance(splits, dict):
        return sum(len(v) for v in splits.values())
    return len(entry.get("paths", []))


def _link_or_copy(src: Path, dest: Path) -> None:
    try:  # a hard link costs no disk; copy across file systems
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def train_and_score(manifest: Path, holdout: Path, run: Path, cfg, args) -> dict:
    """Train on a manifest, then evaluate on its own test split (claimed) and on the clean hold-out."""
    from bonefrac.evaluate import evaluate
    from bonefrac.train import train

    t0 = time.perf_counter()
    best = train(manifest, run / "run", cfg)
    train_s = time.perf_counter() - t0
    claimed = evaluate([str(best)], manifest, "test", run / "eval_own_test", device=args.device, n_boot=0)
    clean = evaluate([str(best)], holdout, "test", run / "eval_clean", device=args.device, n_boot=args.bootstrap)
    return {"claimed": summarize(claimed), "clean": summarize(clean), "train_s": round(train_s, 1)}


def summarize(m: dict) -> dict:
    """The headline numbers of an evaluate() result, with clean 95 % intervals when bootstrapped."""
    out = {k: m.get(k) for k in SUMMARY_KEYS}
    out["macro_f1"] = m.get("macro_avg", {}).get("f1")
    out["per_class_recall"] = {c: v["recall"] for c, v in m.get("per_class", {}).items()}
    ci = m.get("ci") or {}
    out["ci"] = {k: [v.get("low"), v.get("high")] for k, v in ci.items()
                 if isinstance(v, dict) and k in ("accuracy", "balanced_accuracy", "auroc")}
    return out


def seed_style(source: Path, holdout: Path, names, cfg, args, out: Path) -> dict:
    """Augment everything, random image split, flag crossing groups, train, score."""
    from bonefrac.augment import augment_manifest
    from bonefrac.manifest import prepare

    work = out / "seed_style"
    augment_manifest(source, work / "pool", factor=args.aug_factor, seed=args.seed,
                     workers=args.workers)
    layout = seed_layout(work / "pool" / "manifest.csv", work / "layout", args.seed)
    # match_copies="auto": the shipped copy detector (if any) also recognises the freshly augmented copies.
    report = prepare(work / "data", source=work / "layout", keep_folder_split=True, workers=args.workers,
                     match_copies="auto")
    crossing = crossing_summary(layout, work / "data" / "manifest.csv", report)
    log.info("seed-style split: prepare flagged %d crossing groups; truly crossing: %d", crossing["crossing_groups"],
             crossing["true_crossing_groups"])
    result = train_and_score(work / "data" / "manifest.csv", holdout, work, cfg, args)
    return {**result, "split_sizes": layout.split.value_counts().to_dict(), **crossing}


def bonefrac_style(source: Path, holdout: Path, names, cfg, args, out: Path) -> dict:
    """Grouped split, augment train only, train, score."""
    from bonefrac.augment import augment_manifest
    from bonefrac.manifest import load_manifest

    work = out / "bonefrac"
    rows = load_manifest(source)
    rows["split"] = _tools().group_split(rows, seed=args.seed)
    _write_manifest(rows, work / "split", names)
    augment_manifest(work / "split" / "manifest.csv", work / "data", factor=args.aug_factor, seed=args.seed,
                     workers=args.workers)
    result = train_and_score(work / "data" / "manifest.csv", holdout, work, cfg, args)
    final = load_manifest(work / "data" / "manifest.csv")  # copies carry their source's group
    true_cross = int((final.groupby("group").split.nunique() > 1).sum())
    return {**result, "split_sizes": final.split.value_counts().to_dict(), "crossing_groups": true_cross,
            "true_crossing_groups": true_cross}


def training_config(args):
    from bonefrac.config import load_config

    overrides = [f"model.arch={args.arch}", f"model.pretrained={args.pretrained}", f"data.size={args.size}",
                 f"train.epochs={args.epochs}", f"train.device={args.device}", f"train.seed={args.seed}"]
    if args.workers:
        overrides.append(f"data.decode_workers={args.workers}")
    return load_config(args.config, overrides + args.set)


def markdown(result: dict) -> str:
    """The results table of the study as markdown."""
    lines = ["| pipeline | claimed accuracy (own test) | clean accuracy | clean balanced acc. | clean AUROC "
             "| clean macro-F1 | groups crossing its split (flagged by prepare / true) |",
             "|---|---|---|---|---|---|---|"]
    for key, label in (("seed_style", "seed-style: augment all, random split"),
                       ("bonefrac", "bonefrac: grouped split, augment train only")):
        r = result[key]
        cells = [_fmt(r["claimed"]["accuracy"]), _fmt(r["clean"]["accuracy"], r["clean"]["ci"].get("accuracy")),
                 _fmt(r["clean"]["balanced_accuracy"]), _fmt(r["clean"]["auroc"]), _fmt(r["clean"]["macro_f1"]),
                 f"{r['crossing_groups']} / {r.get('true_crossing_groups', r['crossing_groups'])}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    s = result["setup"]
    lines.append(f"\n{s['arch']} at {s['size']} px, {s['epochs']} epochs, offline augmentation x{s['aug_factor']}, "
                 f"device {s['device']}; clean hold-out: {s['holdout_images']} original images in "
                 f"{s['holdout_groups']} duplicate groups never seen by either pipeline.")
    return "\n".join(lines) + "\n"


def _fmt(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci and None not in ci:
        text += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return text


def run(args) -> dict:
    """The whole study; returns (and writes) the result dict."""
    from bonefrac.manifest import load_manifest, prepare

    out = Path(args.out)
    if (out / "leakage_study.json").exists():
        from bonefrac.errors import BonefracError
        raise BonefracError(f"{out} already holds a study; choose another --out")
    data_csv, names = load_labels(args, out)
    prepare(out / "all", labels_csv=data_csv, path_col=args.path_col, label_col=args.label_col,
            class_names=names, workers=args.workers)
    source, holdout, names = hold_out(out / "all" / "manifest.csv", args.holdout, args.seed, out, args.group_col)
    cfg = training_config(args)
    clean = load_manifest(holdout)
    result = {"setup": {"data": str(args.data), "arch": args.arch, "size": args.size, "epochs": args.epochs,
                        "aug_factor": args.aug_factor, "device": args.device, "class_names": names,
                        "holdout_images": len(clean), "holdout_groups": int(clean.group.nunique()),
                        "source_images": len(pd.read_csv(source)), "group_col": args.group_col}}
    result["seed_style"] = seed_style(source, holdout, names, cfg, args, out)
    result["bonefrac"] = bonefrac_style(source, holdout, names, cfg, args, out)
    (out / "leakage_study.json").write_text(json.dumps(result, indent=2))
    (out / "leakage_study.md").write_text(markdown(result))
    log.info("results: %s\n%s", out / "leakage_study.json", markdown(result))
    return result


def main(argv=None) -> int:
    from bonefrac.cli import run_logged

    return run_logged(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
