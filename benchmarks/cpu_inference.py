"""CPU inference: eager PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime INT8, same run, same machine.

    python benchmarks/cpu_inference.py [--model CKPT] [--data ../shared/data/fracatlas] [--split-csv CSV]
        [--n-val 0] [--n-calib 64] [--int8-float-convs 4] [--keep-onnx DIR] [--json F]

Reports batch-1 latency (median) and batch-32 throughput per back-end, ratios to eager fp32, the AUROC of
fp32 vs INT8 on FracAtlas, and how far single INT8 probabilities move (max and 99th percentile of
|p_int8 - p_fp32| over the evaluated images). Both exports run `bonefrac export`'s own parity check at its
default tolerance (64 validation images; INT8 0.15), so a refused INT8 model fails the benchmark.
Without --model it uses models/fracatlas_effnet_lite when present, else a freshly initialised
tf_efficientnet_lite0 at 384 px (AUROC is then meaningless: ~0.5).

With a split file (columns image, label, group, split) INT8 is calibrated on shuffled TRAIN-split images and
AUROC is measured on the VALIDATION split (all of it with --n-val 0, else a stratified subset of n-val). The
shipped model's data_split.csv is the default only for the shipped model; any other --model needs --split-csv
(the split it was trained with). Without the shipped model, disjoint random subsets of labels.csv serve the
freshly initialised one. The AUROC images are checked against the model's seen list (bonefrac.seen): any it was
trained on stops the run (exit status 2); those it was selected on (its own val split, as for the shipped model)
are expected, and the output's "val_auroc_on" says the AUROC is then on the selection split, not held out:
good for the fp32-vs-INT8 change, not as an accuracy estimate. Calibration images may be training images.
--keep-onnx DIR keeps the exported fp32.onnx / int8.onnx (e.g. for benchmarks/serve_load.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonefrac import checkpoint
from bonefrac.backends import load_backend
from bonefrac.cli import run_logged
from bonefrac.errors import BonefracError
from bonefrac.export import export
from bonefrac.io import file_sha256, read_image
from bonefrac.metrics import _auroc
from bonefrac.models import create
from bonefrac.predict import Predictor
from bonefrac.seen import seen_by_model

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "fracatlas_effnet_lite"


def shipped_or_fresh(tmp: Path, size: int) -> tuple[Path, str]:
    if (SHIPPED / checkpoint.META_FILE).is_file():
        return SHIPPED, "shipped models/fracatlas_effnet_lite"
    torch.manual_seed(0)
    meta = {"arch": "tf_efficientnet_lite0", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
            "preprocess": {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3},
            "threshold": 0.5, "temperature": 1.0, "manifest_sha256": "random-init"}
    path = checkpoint.save(tmp / "fresh", create("tf_efficientnet_lite0", 2).eval(), meta)
    return path, f"freshly initialised tf_efficientnet_lite0 at {size} px (no shipped model yet)"


def subsets(data: Path, n_calib: int, n_val: int, seed: int = 0):
    """(calibration paths, val paths, val labels): disjoint, fixed by the seed, val stratified."""
    rows = pd.read_csv(data / "labels.csv").sample(frac=1.0, random_state=seed)
    val = pd.concat([g.head(n_val // 2) for _, g in rows.groupby("fractured")])
    calib = rows.drop(val.index).head(n_calib)
    return [data / p for p in calib.image], [data / p for p in val.image], val.fractured.to_numpy()


def split_subsets(data: Path, split_csv: Path, n_calib: int, n_val: int, tmp: Path, seed: int = 0):
    """(manifest CSV, calibration paths, val paths, val labels) from the model's own split file."""
    rows = pd.read_csv(split_csv)
    rows["path"] = [str(data / "images" / name) for name in rows.image]
    train = rows[rows.split == "train"].sample(frac=1.0, random_state=seed).head(n_calib)
    val = rows[rows.split == "val"]
    if n_val:
        val = pd.concat([g.sample(frac=1.0, random_state=seed).head(n_val // 2) for _, g in val.groupby("label")])
    manifest = tmp / "manifest.csv"
    pd.concat([train, val]).assign(sha256="")[["path", "label", "group", "split", "sha256"]].to_csv(
        manifest, index=False)
    y = (val.label.to_numpy() == "fracture").astype(int)
    return manifest, [Path(p) for p in train.path], [Path(p) for p in val.path], y


def split_file(model: str | None, split_csv: str | None) -> Path | None:
    """The split file to draw calibration and AUROC images from (None: random subsets of labels.csv, for the
    fresh model). The shipped model's data_split.csv is right only for the shipped model: another model's val
    images are unknown here and may be among its training images. ValueError (a usage error) otherwise."""
    if split_csv:
        if not Path(split_csv).is_file():
            raise ValueError(f"--split-csv {split_csv}: no such file")
        return Path(split_csv)
    if model and Path(model).resolve() != SHIPPED.resolve():
        raise ValueError(f"--model {model} needs --split-csv (image,label,group,split: the split it was trained "
                         f"with); the default, {SHIPPED / 'data_split.csv'}, is the shipped model's")
    default = SHIPPED / "data_split.csv"
    return default if default.is_file() else None


def check_unseen(predictor, val: list[Path], calib: list[Path]) -> dict:
    """seen_by_model's counts for the AUROC and calibration images; BonefracError when the model was trained on
    any AUROC image (its AUROC, and the INT8 change measured on it, would be on memorised images)."""
    val_seen = seen_by_model(predictor, _hashed(val), "val")
    if val_seen and val_seen["train"]:
        raise BonefracError(f"{val_seen['train']} of the {val_seen['of']} AUROC images were in the model's "
                            "training split: pass the --split-csv the model was trained with")
    on = ("not checked (the model keeps no list of the images it saw)" if val_seen is None else
          "the model's selection (val) split: it was chosen on these images, so the AUROC is not a held-out "
          "estimate; the fp32-vs-INT8 change is what it measures" if val_seen["val"] else
          "images the model neither trained nor was selected on")
    return {"val_seen_by_model": val_seen, "calib_seen_by_model": _calib_seen(predictor, calib), "val_auroc_on": on}


def _calib_seen(predictor, calib: list[Path]) -> dict | None:
    """seen_by_model's counts for the calibration images, without its warning: that one is about scores being
    optimistic, while calibrating INT8 on training images is fine, so these counts are only reported."""
    seen_log = logging.getLogger("bonefrac.seen")
    level = seen_log.level
    seen_log.setLevel(logging.ERROR)
    try:
        return seen_by_model(predictor, _hashed(calib), "train")
    finally:
        seen_log.setLevel(level)


def _hashed(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "sha256": [file_sha256(p) for p in paths]})


def latency_ms(fn, image, reps: int) -> float:
    fn([image])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn([image])
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def throughput(fn, images, reps: int) -> float:
    fn(images)
    t = time.perf_counter()
    for _ in range(reps):
        fn(images)
    return reps * len(images) / (time.perf_counter() - t)


def prob_change(p, ref) -> dict:
    """max, 99th percentile and mean of |p - ref| (fracture probabilities), and how many exceed 0.15."""
    d = np.abs(np.asarray(p, np.float64) - np.asarray(ref, np.float64))
    return {"max": round(float(d.max()), 4), "p99": round(float(np.quantile(d, 0.99)), 4),
            "mean": round(float(d.mean()), 4), "n_over_0.15": int((d > 0.15).sum()), "n": int(d.size)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fracatlas"))
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--split-csv", help="image,label,group,split file the model was trained with (default: the "
                    "shipped model's, for the shipped model only)")
    ap.add_argument("--n-val", type=int, default=0, help="0: the whole validation split")
    ap.add_argument("--int8-tolerance", type=float, default=None,
                    help="export parity tolerance for INT8 (default: bonefrac export's, 0.15)")
    ap.add_argument("--int8-float-convs", type=int, default=None,
                    help="input-side convolutions INT8 keeps in float (default: bonefrac export's, 4)")
    ap.add_argument("--reuse-onnx", action="store_true",
                    help="with --keep-onnx: use fp32.onnx / int8.onnx already there instead of exporting again")
    ap.add_argument("--keep-onnx", help="directory to keep fp32.onnx and int8.onnx in")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    try:
        args.split_file = split_file(args.model, args.split_csv)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def pick_data(args: argparse.Namespace, tmp: Path):
    """(export's image source, calibration paths, AUROC paths, AUROC labels, a note saying where they came from)."""
    if args.split_file is not None:
        manifest, calib, val, y = split_subsets(Path(args.data), args.split_file, args.n_calib, args.n_val, tmp)
        note = f"{args.split_file}: INT8 calibrated on {len(calib)} train-split images, AUROC on val split"
        return {"manifest": manifest}, calib, val, y, note
    calib, val, y = subsets(Path(args.data), args.n_calib, args.n_val or 200)
    return {"images": calib}, calib, val, y, f"random subsets of {args.data}/labels.csv"


def export_both(ckpt: Path, out_dir: Path, args: argparse.Namespace, source: dict) -> dict:
    """{variant: export report} for fp32 and int8 ONNX files in out_dir (with --reuse-onnx: those already there)."""
    reports = {}
    for variant in ("fp32", "int8"):
        if args.reuse_onnx and (out_dir / f"{variant}.onnx").is_file():
            reports[variant] = json.loads((out_dir / f"{variant}.onnx.json").read_text()).get("export", {})
            continue
        t = time.perf_counter()
        extra = {"int8_float_convs": args.int8_float_convs} if args.int8_float_convs is not None else {}
        reports[variant] = export(ckpt, out_dir / f"{variant}.onnx", int8=variant == "int8", n_calib=args.n_calib,
                                  tolerance=args.int8_tolerance if variant == "int8" else None,
                                  **source, **(extra if variant == "int8" else {}))
        log.info("exported %s in %.0f s", variant, time.perf_counter() - t)
    return reports


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt, model_note = (Path(args.model), args.model) if args.model else shipped_or_fresh(tmp, args.size)
        source, calib, val, y, data_note = pick_data(args, tmp)
        eager = Predictor.from_checkpoint(ckpt, "cpu", batch_size=32)
        seen = check_unseen(eager, val, calib)  # before the exports: a refused run costs seconds, not minutes
        out_dir = Path(args.keep_onnx) if args.keep_onnx else tmp
        reports = export_both(ckpt, out_dir, args, source)
        tmp = out_dir
        backends = {"eager_fp32": eager,
                    "ort_fp32": load_backend(tmp / "fp32.onnx", "cpu"),
                    "ort_int8": load_backend(tmp / "int8.onnx", "cpu")}
        sizes = {"ort_fp32": (tmp / "fp32.onnx").stat().st_size, "ort_int8": (tmp / "int8.onnx").stat().st_size}
        val_images = [read_image(p) for p in val]
        batch = (val_images * 2)[:32]
        rows = {}
        probs = {}
        for name, pred in backends.items():
            rows[name] = {"batch1_ms": round(latency_ms(pred.predict_arrays, batch[0], 5 * args.reps), 1),
                          "batch32_img_s": round(throughput(pred.predict_arrays, batch, args.reps), 1)}
            log.info("%s %s", name, rows[name])
        for name, pred in backends.items():  # timings first, all back-ends back to back; then the accuracy pass
            probs[name] = pred.predict_arrays(val_images)
            rows[name].update(val_auroc=round(_auroc(y, probs[name], 1), 4),
                              size_mb=round(sizes.get(name, 0) / 1e6, 1) or None)
            log.info("%s %s", name, rows[name])
    base = rows["eager_fp32"]
    for r in rows.values():
        r["throughput_x_eager"] = round(r["batch32_img_s"] / base["batch32_img_s"], 2)
        r["latency_x_eager"] = round(base["batch1_ms"] / r["batch1_ms"], 2)
    result = {"model": model_note, "data": data_note, "n_val": len(val), "n_val_fractured": int(y.sum()), **seen,
              "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "auroc_change_int8": round(
                  rows["ort_int8"]["val_auroc"] - rows["ort_fp32"]["val_auroc"], 4),
              "auroc_change_int8_vs_eager": round(rows["ort_int8"]["val_auroc"] - rows["eager_fp32"]["val_auroc"], 4),
              "int8_prob_change": prob_change(probs["ort_int8"][:, 1], probs["ort_fp32"][:, 1]),
              "int8_prob_change_vs_eager": prob_change(probs["ort_int8"][:, 1], probs["eager_fp32"][:, 1]),
              "export_parity": {k: {kk: v for kk, v in r.items() if "parity" in kk or "diff" in kk}
                                for k, r in reports.items()},
              "int8_export": reports["int8"].get("int8"),
              "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__, "backends": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def main(argv=None) -> int:
    """Exit status 2 and one error line for a usage problem or a model that trained on the AUROC images."""
    return run_logged(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
