"""The `bonefrac` command. Thin: each subcommand parses its flags (cliargs.py) and calls one stage's function.

Errors the user can fix (BonefracError) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .cliargs import parse_args
from .errors import BonefracError

log = logging.getLogger("bonefrac")


def _prepare(args) -> None:
    from .manifest import prepare

    if args.source is None and args.labels is None:
        raise BonefracError("give an image folder SOURCE or --labels FILE.csv (or both: the CSV's paths are "
                            "then relative to SOURCE)")
    class_names = _names(args.class_names) if args.class_names else None
    copies = {} if args.match_copies is None else {"match_copies": args.match_copies}  # unset: prepare decides
    report = prepare(args.out, source=args.source, labels_csv=args.labels, path_col=args.path_col,
                     label_col=args.label_col, group_col=args.group_col, class_names=class_names, seed=args.seed,
                     keep_folder_split=args.keep_folder_split, split_all=args.split_all,
                     near_dup_threshold=args.near_dup_threshold, workers=args.workers, overwrite=args.overwrite,
                     **copies)
    log.info("manifest: %s/manifest.csv (%d images, %d groups, %d rejected)", args.out, report["n_images"],
             report["n_groups"], len(report.get("rejected", [])))


def _names(text: str) -> list[str]:
    """`--class-names "a, b"` -> ["a", "b"]; BonefracError for an empty name ("a,,b", a trailing comma)."""
    if not all(names := [name.strip() for name in text.split(",")]):
        raise BonefracError(f"--class-names {text!r} holds an empty name; give comma-separated names, e.g. a,b")
    return names


def _train(args) -> None:
    from .config import load_config
    from .train import train

    config = args.config
    saved = Path(args.out) / "config.json"
    if args.resume and config is None:  # resume as the run was started, --set on top
        if not saved.is_file():  # a wrong --out: it would be a new run with the defaults
            raise BonefracError(f"--resume: {args.out} holds no run to resume (no config.json) and no --config "
                                "was given; check --out, or start a new run")
        log.info("resuming with the run's own configuration, %s", saved)
        config = saved
    cfg = load_config(config, args.set)
    best = train(args.manifest, args.out, cfg, resume=args.resume)
    log.info("best checkpoint: %s", best)


def _evaluate(args) -> None:
    from .evaluate import evaluate

    models = _models_or_default(args.model + args.model_opt)  # CKPT... and --model CKPT
    result = evaluate(models, args.manifest, split=args.split, out_dir=args.out, positive_class=args.positive_class,
                      tta=args.tta, device=args.device, n_boot=args.bootstrap, reference=args.reference)
    log.info("metrics: %s/metrics.json  report: %s/report.html", args.out, args.out)
    summary = {k: result[k] for k in ("n", "accuracy", "balanced_accuracy", "auroc") if k in result}
    print(json.dumps(summary))


def _predict(args) -> None:
    from .backends import DEFAULT_POINT, csv_writer
    from .predict import load_predictor, predict_files

    if not args.paths:
        raise BonefracError("name at least one image file or folder to predict")
    averaged = len(args.model or []) > 1  # several checkpoints, averaged with equal weights
    named, args.operating_point = args.operating_point, _operating_point(args.operating_point, averaged)
    if averaged and args.operating_point not in (None, DEFAULT_POINT):
        # The points were chosen for one model's probabilities, not for this unfitted average of several.
        raise BonefracError("--operating-point needs one checkpoint or an ensemble directory; build an ensemble "
                            "with its own operating points from these checkpoints with `bonefrac ensemble`")
    predictor = load_predictor(_models_or_default(args.model), args.device, args.tta, args.batch_size)
    _decide_at(predictor, args.operating_point, named)
    if averaged:
        _warn_average(len(args.model), predictor.threshold, args.operating_point)
    rows = predict_files(predictor, args.paths, args.batch_size, xray_check=not args.no_xray_check)
    statuses = []
    write = csv_writer(predictor.class_names) if args.format == "csv" else (lambda r: print(json.dumps(r), flush=True))
    for row in rows:
        # An error row without `error` is a readable image the model gave NaN/inf for (backends.prediction_rows).
        statuses.append("non_finite" if row["status"] == "error" and "error" not in row else row["status"])
        write(row)
    _check_outcome(statuses, args.paths, "prediction")


def _warn_average(n: int, threshold, named_point: str | None) -> None:
    """Say how an unfitted average of `n` checkpoints decides, and that $BONEFRAC_OPERATING_POINT (a site-wide
    setting, so not an error) does not apply to it."""
    env_point = None if named_point else os.environ.get("BONEFRAC_OPERATING_POINT")
    ignored = (f"; BONEFRAC_OPERATING_POINT={env_point} ignored (an unfitted average has no saved operating "
               "points)") if env_point else ""
    decides = "by the most probable class" if threshold is None else f"at the first one's threshold {threshold:.4g}"
    log.warning("%d checkpoints averaged with equal weights, deciding %s%s; fit weights and threshold on validation "
                "with `bonefrac ensemble`", n, decides, ignored)


def _check_outcome(statuses: list[str], paths: list[str], what: str) -> None:
    """After predict or explain: warn how many inputs got no `what` and why (from each input's row status); a
    BonefracError (exit status 2) when none got one, or when `paths` held no image file at all."""
    counts = {status: statuses.count(status) for status in ("ok", "not_xray", "error", "non_finite")}
    failed = sum(counts.values()) - counts["ok"]
    if failed:
        nan = f", {counts['non_finite']} with non-finite model output" if counts["non_finite"] else ""
        log.warning("%d of %d inputs got no %s: %d unreadable, %d not an X-ray%s", failed, sum(counts.values()),
                    what, counts["error"], counts["not_xray"], nan)
    if not counts["ok"]:
        if not failed:
            raise BonefracError(f"no image files found in {', '.join(map(str, paths))}")
        raise BonefracError(f"no {what} made for any of the {sum(counts.values())} input(s)")


def _models_or_default(models: list[str] | None) -> list[str]:
    """The checkpoints named, else the default model (logged: $BONEFRAC_MODEL may stand in for the shipped one)."""
    if models:
        return models
    from .predict import default_model_path

    default = str(default_model_path())
    log.info("model: %s", default)
    return [default]


def _decide_at(predictor, point: str | None, named: str | None) -> None:
    """use_operating_point, except that a point from $BONEFRAC_OPERATING_POINT (site-wide, not `named` on the
    command line) is ignored with a warning for a multi-class model, which has no thresholds to choose from."""
    from .backends import use_operating_point

    if point is not None and named is None and len(predictor.class_names) > 2:
        log.warning("BONEFRAC_OPERATING_POINT=%s ignored: operating points apply to two-class models, and this one "
                    "has %d classes (it predicts the most probable class)", point, len(predictor.class_names))
        return
    use_operating_point(predictor, point)


def _operating_point(named: str | None, averaged: bool = False) -> str | None:
    """The operating point predict/explain decide at: the one named, else $BONEFRAC_OPERATING_POINT (as `serve`
    reads it), except for an unfitted average of checkpoints, which has no saved points."""
    env_point = os.environ.get("BONEFRAC_OPERATING_POINT")
    if named is not None or not env_point:
        return named
    if averaged:  # it has no saved points; _warn_average says so
        return None
    log.info("operating point '%s' from BONEFRAC_OPERATING_POINT", env_point)
    return env_point


def _export(args) -> None:
    from .export import INT8_FLOAT_CONVS, export

    float_convs = INT8_FLOAT_CONVS if args.int8_float_convs is None else args.int8_float_convs
    report = export(args.ckpt, args.out, fmt=args.format, int8=args.int8, fp16=args.fp16,
                    manifest=args.manifest, images=args.images, tolerance=args.tolerance,
                    n_calib=args.n_calib, n_parity=args.n_parity, int8_float_convs=float_convs)
    print(json.dumps({k: report.get(k) for k in ("variant", "size_bytes", "parity", "val_metric")}))


def _serve(args) -> None:
    from .serve.app import run
    from .serve.settings import Settings

    run(Settings.from_env(model=args.model, host=args.host, port=args.port, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, audit_db=args.audit_db, device=args.device,
                          operating_point=args.operating_point))


def _explain(args) -> None:
    from .explain import explain_files
    from .predict import load_predictor

    if not args.paths:
        raise BonefracError("name at least one image file or folder to explain")
    predictor = load_predictor([args.ckpt], args.device, args.tta, args.batch_size)
    _decide_at(predictor, _operating_point(args.operating_point), args.operating_point)  # as `predict` would
    rows = explain_files(predictor, args.paths, args.out, args.target_class, args.batch_size, not args.no_xray_check)
    _check_outcome([r["status"] for r in rows], args.paths, "explanation")  # as predict: 2 when none explained


def _calibrate(args) -> None:
    from .evaluate import calibrate

    fitted = calibrate(args.ckpt, args.manifest, args.device)
    print(json.dumps({k: fitted.get(k) for k in ("temperature", "threshold", "operating_points")}))


def _ensemble(args) -> None:
    from .evaluate import build_ensemble

    out = build_ensemble(args.models, args.manifest, args.out, args.device)
    log.info("ensemble checkpoint: %s (use it wherever a checkpoint is accepted)", out)


def _augment(args) -> None:
    from .augment import augment_manifest
    from .config import load_config

    acfg = load_config(args.config, args.set).augment
    report = augment_manifest(args.manifest, args.out, balance=args.balance, target=args.target,
                              factor=args.factor, seed=args.seed, acfg=acfg, fmt=args.format, workers=args.workers)
    log.info("manifest: %s/manifest.csv (%d copies; train %s)", args.out, report["n_copies"], report["train_after"])


COMMANDS = {"prepare": _prepare, "train": _train, "evaluate": _evaluate, "predict": _predict, "export": _export,
            "serve": _serve, "explain": _explain, "calibrate": _calibrate, "ensemble": _ensemble, "augment": _augment}


def run_logged(fn, *args, verbose: bool = False) -> int:
    """Run `fn(*args)` as a command-line entry point (the `bonefrac` command, scripts/ and benchmarks/):
    bonefrac's log format, and a BonefracError ends as one error line and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .io import quiet_image_metadata_logs

    quiet_image_metadata_logs()
    try:
        fn(*args)
    except BonefracError as exc:
        log.error("%s", exc)
        return 2
    return 0


def _env_checked(func):
    """`func`, after a warning about misspelt BONEFRAC_* variables (a misspelt operating-point variable would
    otherwise leave predict at the default point without a word); `serve` warns through its settings."""
    def run(args):
        if args.command != "serve":
            from .serve.settings import warn_unknown_variables

            warn_unknown_variables(os.environ)
        return func(args)
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a file name a non-UTF-8 terminal cannot show is escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return run_logged(_env_checked(COMMANDS[args.command]), args, verbose=args.verbose)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bonefrac predict ... | head`: the reader has all it wanted
        # stdout to the null device, or the flush at exit fails on the closed pipe again (Python's "Note on SIGPIPE")
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


if __name__ == "__main__":
    sys.exit(main())
