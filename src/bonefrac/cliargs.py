"""The `bonefrac` command line: every subcommand's flags and their types (cli.py runs the commands).

`parse_args` also takes positionals after options (`explain CKPT --out DIR a.png b.png`).
"""

from __future__ import annotations

import argparse
import sys

from .config import MAX_SEED

OPERATING_POINT_HELP = ("decide at a threshold saved with the model (chosen on validation), e.g. screening "
                        "(sensitivity >= 0.90), high_sensitivity or high_specificity (>= 0.95); "
                        "default: the model's own threshold")


def _int_in(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` (to `high`), else a one-line usage error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"needs a whole number {span}, got {text!r}")
        return value
    return parse


_positive_int = _int_in(1)
_count = _int_in(0)
_seed = _int_in(0, MAX_SEED)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonefrac", description="Bone X-ray fracture classification "
                                "(an assistive research tool, not a diagnostic device).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="scan images or a labels CSV into a leakage-aware manifest")
    s.add_argument("source", nargs="?", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    s.add_argument("--labels", help="CSV of image paths and labels; paths are relative to the CSV, or to SOURCE "
                   "when one is given")
    s.add_argument("--path-col", help="CSV column of image paths (default: image; path in a bonefrac manifest)")
    s.add_argument("--label-col", default="label", help="CSV column of labels (default: label)")
    s.add_argument("--group-col", metavar="COL", help="CSV column of patient/study IDs: images sharing a value stay "
                   "in one group and split (on top of duplicate grouping)")
    s.add_argument("--class-names", help="comma-separated names for integer labels 0,1,...")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=_seed, default=42, help="seed of the split (default: 42)")
    s.add_argument("--overwrite", action="store_true", help="replace a different manifest already in --out")
    s.add_argument("--keep-folder-split", action="store_true", help="keep the folder's train/val/test split")
    s.add_argument("--split-all", choices=["train", "val", "test"], help="put every image in one split")
    s.add_argument("--near-dup-threshold", type=_count, default=None,
                   help="max Hamming distance (bits of 256) between perceptual hashes for near duplicates "
                        "(default 32)")
    s.add_argument("--match-copies", metavar="{auto,off,PATH}",
                   help="also group augmented copies with a copy detector: auto (the shipped one, if any), off, "
                        "or a detector folder; default: auto with --keep-folder-split, else off")
    s.add_argument("--workers", type=_positive_int, default=None)

    s = sub.add_parser("train", help="train a model on a manifest's train split, selecting on val")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--config", help="YAML experiment file (see configs/)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(without --config: with the run's own config.json, --set applied on top)")

    s = sub.add_parser("evaluate", help="metrics, plots and an HTML report on a manifest split")
    s.add_argument("model", nargs="*", help="checkpoint dir(s); several make an ensemble; default: "
                   "$BONEFRAC_MODEL, else the shipped model")
    s.add_argument("--model", dest="model_opt", action="append", default=[], help="checkpoint (repeatable)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    s.add_argument("--out", required=True)
    s.add_argument("--positive-class", help="class the binary metrics (sensitivity, PPV, ...) are about (default: "
                   "the model's positive class); the decisions stay predict's (the model's threshold t on the "
                   "other class becomes p > 1 - t)")
    s.add_argument("--reference", help="metrics.json written by an earlier `bonefrac evaluate` (e.g. on the "
                   "internal test set), for a domain-shift summary (default: none)")
    s.add_argument("--bootstrap", type=_count, default=1000, help="group-bootstrap resamples for the 95 %% "
                   "intervals (default %(default)s; 0: none)")
    s.add_argument("--tta", action="store_true", help="average with a horizontally flipped view")
    s.add_argument("--device", default="auto")

    s = sub.add_parser("predict", help="predict image files, folders or DICOM; JSON lines or CSV")
    s.add_argument("paths", nargs="*", help="image files, and folders: their image files (PNG, JPEG, ..., DICOM), "
                   "recursively")
    s.add_argument("--model", action="append", help="checkpoint or ensemble dir (repeatable: averaged); default: "
                   "$BONEFRAC_MODEL, else the shipped model (also read: $BONEFRAC_OPERATING_POINT)")
    s.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="JSON lines (default) or CSV")
    s.add_argument("--batch-size", type=_positive_int, default=32, help="images read and run together "
                   "(default %(default)s; lower it if memory runs out)")
    s.add_argument("--tta", action="store_true", help="average with a horizontally flipped view")
    s.add_argument("--no-xray-check", action="store_true",
                   help="predict every readable image, even ones that do not look like a radiograph")
    s.add_argument("--device", default="auto", help="auto (the GPU if there is one, else the CPU), cpu, cuda, "
                   "cuda:N or mps")
    s.add_argument("--operating-point", metavar="NAME", help=OPERATING_POINT_HELP)
    s = sub.add_parser("export", help="export a checkpoint to ONNX (fp32/fp16/INT8) or TorchScript, parity-checked")
    s.add_argument("ckpt", help="checkpoint or ensemble directory")
    s.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    s.add_argument("--int8", action="store_true", help="ONNX Runtime static INT8, calibrated on training images")
    s.add_argument("--fp16", action="store_true")
    s.add_argument("--manifest", help="manifest: train split calibrates INT8, val split checks parity/metrics")
    s.add_argument("--images", help="image folder for calibration and parity, instead of --manifest (two disjoint "
                   "halves of it; no labels, so no validation metric)")
    s.add_argument("--tolerance", type=float, help="max |p_exported - p_torch| on the parity images (default per "
                   "variant: fp32 and TorchScript 0.001, fp16 0.02, INT8 0.15)")
    s.add_argument("--n-calib", type=_positive_int, default=64, help="INT8 calibration images, drawn from the "
                   "train split over its labels (default %(default)s)")
    s.add_argument("--n-parity", type=_positive_int, default=64, help="parity images, drawn from the val split over "
                   "its labels (default %(default)s; more: a firmer check, a slower export)")
    s.add_argument("--int8-float-convs", type=_count,
                   help="input-side convolutions --int8 keeps in float (default 4; 0 quantizes all)")
    s.add_argument("--out", required=True)

    s = sub.add_parser("serve", help="HTTP service and web page (settings also from BONEFRAC_* variables)")
    s.add_argument("--model", help="checkpoint or ensemble dir, .onnx or TorchScript file; default: "
                   "$BONEFRAC_MODEL, else the shipped model")
    s.add_argument("--host", help="default 127.0.0.1")
    s.add_argument("--port", type=int, help="default 8000")
    s.add_argument("--max-batch", type=int, help="micro-batch size (1: no batching; default 16)")
    s.add_argument("--max-wait-ms", type=float, help="micro-batch window (default 10)")
    s.add_argument("--audit-db", help="SQLite audit log file")
    s.add_argument("--device", help="auto, cpu, cuda[:n]")
    s.add_argument("--operating-point", metavar="NAME", help=OPERATING_POINT_HELP)

    s = sub.add_parser("explain", help="Grad-CAM heatmaps over the X-ray, one PNG per image")
    s.add_argument("ckpt", help="checkpoint or ensemble dir (an ensemble: its class, its members' maps averaged)")
    s.add_argument("paths", nargs="*", help="image files or folders")
    s.add_argument("--out", required=True)
    s.add_argument("--class", dest="target_class", help="class to explain (default: the predicted one)")
    s.add_argument("--batch-size", type=_positive_int, default=32)
    s.add_argument("--tta", action="store_true", help="decide as `predict --tta` does (the map is of the image)")
    s.add_argument("--no-xray-check", action="store_true",
                   help="explain every readable image, even ones predict would refuse as not a radiograph")
    s.add_argument("--device", default="auto")
    s.add_argument("--operating-point", metavar="NAME", help=OPERATING_POINT_HELP + " (also read: "
                   "$BONEFRAC_OPERATING_POINT)")

    s = sub.add_parser("calibrate", help="re-fit temperature and operating points on val; rewrites the JSON")
    s.add_argument("ckpt", help="checkpoint dir")
    s.add_argument("--manifest", required=True)
    s.add_argument("--device", default="auto")

    s = sub.add_parser("ensemble", help="fit ensemble weights and threshold on val; writes an ensemble dir")
    s.add_argument("models", nargs="+", help="member checkpoint dirs")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="auto")

    s = sub.add_parser("augment", help="offline augmentation of the TRAIN split only; writes a new manifest")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--balance", action="store_true", help="raise every class to the largest class's count")
    s.add_argument("--target", type=_positive_int, help="raise every class to at least this many train images "
                   "(default: none; give --balance, --target or --factor)")
    s.add_argument("--factor", type=float, help="multiply every class's train images by this, >= 1 (e.g. 4; "
                   "default: none)")
    s.add_argument("--config", help="YAML whose `augment` section sets the transforms (default: reference)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. augment.rotate_deg=15")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the copies' random transforms and of how "
                   "copies are spread over source images (default %(default)s)")
    s.add_argument("--format", choices=["png", "webp"], default="png", help="image format of the copies "
                   "(default %(default)s; webp: quality 90)")
    s.add_argument("--workers", type=_positive_int, default=None)
    for command in sub.choices.values():  # `bonefrac predict -v ...` too; SUPPRESS keeps a -v given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    p.command_parsers = sub.choices  # read by parse_args
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a bonefrac command line; positionals may also follow options (`explain CKPT --out DIR a.png b.png`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills a list positional (images, checkpoints) once, so names after an option were left over:
        # parse the command's own arguments again with options and positionals intermixed.
        argv = sys.argv[1:] if argv is None else list(argv)
        at = argv.index(args.command)
        before = [a for a in extra if a in argv[:at]]
        if before:  # only -v may come before the command
            parser.error(f"unrecognized arguments: {' '.join(before)}")
        rest = argv[at + 1:]
        vars(args).update(vars(parser.command_parsers[args.command].parse_intermixed_args(rest)))
    return args
