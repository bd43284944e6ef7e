"""Do Grad-CAM explanations point at the fracture? The pointing game on images with fracture boxes.

    python benchmarks/explain_pointing.py --model runs/lite0/best --manifest work/fracatlas/manifest.csv \
        [--boxes ../shared/data/fracatlas/boxes.csv] [--split test] [--label "lite0 384 px"]

For every fractured image of the split that has boxes (boxes.csv: image,x,y,w,h in pixels of the image, x/y the
top-left corner; matched to manifest rows by file name), Grad-CAM of the fracture class is computed and scored:

* pointing game (Zhang et al., ECCV 2016): a hit when the heatmap's maximum lies within 15 px of a box;
* energy inside (Score-CAM's energy-based pointing game): the share of heatmap mass inside the boxes.

The same scores for a centre Gaussian heatmap (sigma = 1/4 of each side), which ignores the image, and the mean
box-area share (what a uniform heatmap's energy would be) are the baselines. The numbers go into
benchmarks/RESULTS.md under "Grad-CAM pointing game", one subsection per --label (rerunning replaces it).

Only held-out images count: --split is test (or val, for a manifest other than the model's own), and when any
image to score is in the model's training or validation list (the checkpoint's seen list, as `evaluate` checks
it) the run stops with exit status 2. A checkpoint without a list is scored, and its entry says it was unchecked.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from bonefrac import metrics  # noqa: E402
from bonefrac.cli import run_logged  # noqa: E402
from bonefrac.errors import BonefracError  # noqa: E402
from bonefrac.explain import (POINTING_TOLERANCE_PX, box_mask, centre_gaussian, energy_inside,  # noqa: E402
                              explain_arrays, pointing_hit)
from bonefrac.io import read_image  # noqa: E402
from bonefrac.manifest import load_manifest  # noqa: E402
from bonefrac.predict import load_predictor  # noqa: E402
from bonefrac.seen import seen_by_model  # noqa: E402

log = logging.getLogger("explain_pointing")
SECTION = "## Grad-CAM pointing game"
_SHARED_BOXES = ROOT.parent / "shared" / "data" / "fracatlas" / "boxes.csv"
DEFAULT_BOXES = _SHARED_BOXES if _SHARED_BOXES.is_file() else ROOT / "data" / "sample" / "boxes.csv"


def boxes_by_name(boxes_csv: Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """{image file name: [(x, y, w, h), ...]}."""
    table = pd.read_csv(boxes_csv)
    out: dict[str, list] = {}
    for row in table.itertuples(index=False):
        out.setdefault(Path(row.image).name, []).append((row.x, row.y, row.w, row.h))
    return out


def select_images(manifest: Path, split: str, positive: str, boxes: dict) -> pd.DataFrame:
    df = load_manifest(manifest)
    rows = df[df.split == split]
    rows = rows[(rows.label == positive) & rows.path.map(lambda p: Path(p).name in boxes)]
    return rows.reset_index(drop=True)


def check_unseen(predictor, rows: pd.DataFrame, split: str) -> dict | None:
    """seen_by_model's counts for the images to score; BonefracError when the model was trained or selected on
    any of them (a heatmap of an image the model learnt may point at what it memorised, not at the fracture).
    None: the checkpoint keeps no list, so the overlap cannot be checked (the RESULTS entry says so)."""
    seen = seen_by_model(predictor, rows, split)
    if seen and (seen["train"] or seen["val"]):
        raise BonefracError(f"{seen['train']} of the {seen['of']} images of split {split} to score were in the "
                            f"model's training split and {seen['val']} in its validation split: the pointing game "
                            "must be played on images the model never saw (a manifest whose split matches the "
                            "model's, e.g. the one it was trained from, and --split test)")
    return seen


def score_images(predictor, rows: pd.DataFrame, boxes: dict, target: int, tolerance: float, sigma_frac: float,
                 batch_size: int) -> pd.DataFrame:
    """One row per image: hit / energy for Grad-CAM and the centre baseline, box share, probability."""
    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start:start + batch_size]
        images = [read_image(p) for p in chunk.path]
        cams, _, probs = explain_arrays(predictor, images, target, batch_size)
        for path, img, cam, prob in zip(chunk.path, images, cams, probs):
            bx = boxes[Path(path).name]
            centre = centre_gaussian(img.shape, sigma_frac)
            records.append({"image": Path(path).name, "p_fracture": float(prob[target]),
                            "hit": pointing_hit(cam, bx, tolerance), "energy": energy_inside(cam, bx),
                            "centre_hit": pointing_hit(centre, bx, tolerance),
                            "centre_energy": energy_inside(centre, bx),
                            "box_share": float(box_mask(img.shape, bx).mean())})
    return pd.DataFrame(records)


def summarise(scores: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict:
    """Means with 95 % percentile-bootstrap intervals (images resampled) for each score column."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scores), size=(n_boot, len(scores)))
    out = {"n_images": int(len(scores))}
    for col in ("hit", "energy", "centre_hit", "centre_energy", "box_share"):
        v = scores[col].to_numpy(dtype=float)
        low, high = np.percentile(v[idx].mean(axis=1), [2.5, 97.5])
        out[col] = {"value": float(v.mean()), "low": float(low), "high": float(high)}
    diff = scores.hit.to_numpy(float) - scores.centre_hit.to_numpy(float)
    out["hit_minus_centre"] = {"value": float(diff.mean()),
                               **dict(zip(("low", "high"), np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])))}
    return out


def _fmt(d: dict) -> str:
    return f"{d['value']:.3f} ({d['low']:.3f}–{d['high']:.3f})"


def markdown_entry(label: str, summary: dict, command: str, tolerance: float, sigma_frac: float,
                   note: str = "") -> str:
    return "\n".join([
        f"### {label}", "", *([note, ""] if note else []),
        f"`{command}`", "",
        f"{summary['n_images']} fractured images with boxes; tolerance {tolerance:g} px; centre Gaussian sigma = "
        f"{sigma_frac:g} x side. Mean (95 % bootstrap interval over images).", "",
        "| heatmap | pointing-game hit rate | energy inside boxes |",
        "|---|---|---|",
        f"| Grad-CAM (fracture class) | {_fmt(summary['hit'])} | {_fmt(summary['energy'])} |",
        f"| centre Gaussian baseline | {_fmt(summary['centre_hit'])} | {_fmt(summary['centre_energy'])} |",
        f"| uniform heatmap | — | {_fmt(summary['box_share'])} |", "",
        f"Hit rate Grad-CAM minus centre: {_fmt(summary['hit_minus_centre'])}.", ""])


def update_results(results: Path, label: str, entry: str) -> None:
    """Replace (or add) this label's subsection inside our section; other sections stay byte for byte."""
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    intro = (f"{SECTION}\n\nDoes Grad-CAM point at the fracture? `benchmarks/explain_pointing.py` on fractured "
             "images with FracAtlas boxes; hit = heatmap maximum within the tolerance of a box (Zhang et al. "
             "2016), energy = share of heatmap mass inside the boxes (Wang et al. 2020).\n")
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + intro + "\n"
        start = text.find(SECTION + "\n")
    nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(text)
    body = text[start:end]
    parts = re.split(r"(?=^### )", body, flags=re.M)
    head, subs = parts[0], [p for p in parts[1:] if not p.startswith(f"### {label}\n")]
    new_body = head.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in [*subs, entry])
    results.write_text(text[:start] + new_body.rstrip("\n") + "\n" + ("\n" + text[end:] if text[end:] else ""))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, action="append", help="checkpoint (an ensemble explains member 1)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--boxes", default=str(DEFAULT_BOXES))
    # Held-out splits only: the model learnt its train images. val is for a manifest other than the model's own
    # (its own val images, which the model was selected on, are refused by check_unseen).
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--tolerance", type=float, default=POINTING_TOLERANCE_PX)
    p.add_argument("--sigma-frac", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default=None, help="subsection title in RESULTS.md (default: the model path)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="'' to skip writing")
    p.add_argument("--note", default="", help="a sentence about the model, printed under the subsection title")
    p.add_argument("--scores-csv", help="also write the per-image scores here")
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv) -> None:
    predictor = load_predictor(args.model, args.device)
    names = predictor.class_names
    pos = predictor.positive_index if predictor.positive_index is not None else metrics.positive_class_index(names)
    boxes = boxes_by_name(Path(args.boxes))
    rows = select_images(Path(args.manifest), args.split, names[pos], boxes)
    if rows.empty:
        raise BonefracError(f"no '{names[pos]}' images of split {args.split} have boxes in {args.boxes}")
    seen = check_unseen(predictor, rows, args.split)
    scores = score_images(predictor, rows, boxes, pos, args.tolerance, args.sigma_frac, args.batch_size)
    summary = {**summarise(scores), "seen_by_model": seen}
    print(json.dumps(summary, indent=2))
    if args.scores_csv:
        scores.to_csv(args.scores_csv, index=False)
    if args.results:
        command = "python benchmarks/explain_pointing.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        unchecked = "" if seen else ("The model keeps no list of the images it was trained on: that none of these "
                                     "images was among them is not checked.")
        note = " ".join(n for n in (args.note, unchecked) if n)
        label = args.label or " + ".join(args.model)
        update_results(Path(args.results), label, markdown_entry(label, summary, command, args.tolerance,
                                                                 args.sigma_frac, note))
        log.info("wrote section '%s' of %s", SECTION[3:], args.results)


def main(argv=None) -> int:
    """Exit status 2, one error line, for a problem the user can fix (bonefrac.cli.run_logged)."""
    args = parse_args(argv)
    return run_logged(run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
