"""A training run's folder: one trainer at a time (a lock), no fresh run over an old one, a resume that trains what
the run trained (same configuration, except RESUME_MAY_CHANGE; same class order), and the epoch log
(`metrics.csv`, TensorBoard)."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, to_dict
from .errors import BonefracError
from .manifest import class_names_for, load_manifest

log = logging.getLogger(__name__)


# Config keys that may differ on --resume: they change how long or where the run goes, not what it trains.
RESUME_MAY_CHANGE = frozenset({"train.epochs", "train.patience", "train.watchdog_s", "train.device",
                               "data.decode_workers", "data.cache_dir", "data.device_cache_gib"})


# What a run leaves in its out dir (with checkpoint.SIBLINGS): any of them means "this folder holds a run".
RUN_FILES = ("last", "best", "metrics.csv", "config.json")


def prepare_resume(out_dir: Path, rank: int, world: int) -> bool:
    """Before a --resume: on rank 0, put back checkpoints a kill left half-swapped (once, before any rank reads
    them). Returns False when there is nothing to resume: the run stopped during its first epoch, before `last`
    existed; its metrics.csv (rows of an epoch never saved) is removed and the caller starts afresh there."""
    last = out_dir / "last"
    if rank == 0:
        for name in ("last", "best"):
            checkpoint.recover(out_dir / name)
    if world > 1:
        torch.distributed.barrier()
    if (last / checkpoint.META_FILE).is_file():
        return True
    if (done := finished_epochs(out_dir)) > 1:  # more than a kill in epoch 1 can leave: refuse, lose nothing
        raise BonefracError(f"{out_dir}: cannot resume, {last} is missing, but the folder holds {done} finished "
                            "epochs (best/, metrics.csv) that a fresh start would overwrite; train into a new --out "
                            "(or move this folder away)")
    log.warning("%s holds no finished epoch to resume from (no run yet, or it stopped during its first epoch): "
                "starting the run afresh in the same folder", out_dir)
    if rank == 0:
        (out_dir / "metrics.csv").unlink(missing_ok=True)
    return False


def resume_hint(out_dir: Path) -> str:
    """What a --resume of the run in `out_dir` goes on from, for the messages of a stopped run. Read from `last` on
    disk, not from the epochs this process counted: the other ranks finish an epoch before rank 0 has saved it."""
    epoch = _kept_epoch(out_dir / "last")
    if epoch is None:
        return "no epoch was completed; --resume starts the run afresh in the same folder"
    return f"the last completed epoch ({epoch}) is kept in {out_dir / 'last'}; continue with --resume"


def _kept_epoch(last: Path) -> int | None:
    """The epoch of `last`, or, while a save swaps it (or a kill left it swapped), of the sibling checkpoint.recover
    would put back; None when none is saved. Only reads: rank 0 may be saving it right now."""
    for folder in (last, *(last.with_name(last.name + s) for s in checkpoint.SIBLINGS)):
        try:
            return int(json.loads((folder / checkpoint.META_FILE).read_text())["epoch"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


def finished_epochs(out_dir: Path) -> int:
    """The most epochs a run folder shows as finished: best/'s epoch or metrics.csv's last row (0 for none)."""
    done = 0
    if (out_dir / "best" / checkpoint.META_FILE).is_file():
        try:
            done = int(checkpoint.read_meta(out_dir / "best").get("epoch") or 0)
        except (BonefracError, ValueError, TypeError):
            done = 2  # an unreadable best/ still holds something a fresh start would replace
    file = out_dir / "metrics.csv"
    if file.is_file():
        with file.open() as fh:
            epochs = [r.get("epoch") for r in csv.DictReader(fh)]
        done = max([done] + [int(e) for e in epochs if e and e.isdigit()])
    return done


@contextlib.contextmanager
def run_folder_lock(out_dir: Path, rank: int):
    """Hold an exclusive lock on `out_dir/.lock` (rank 0; created with the folder) while the block runs; a
    BonefracError when another process holds it (e.g. workers a killed torchrun launcher left running). No-op
    where file locks are unavailable (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if rank != 0 or fcntl is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BonefracError(f"{out_dir} is being written by another training process; wait for it to end (or "
                                "stop it) before training or resuming here") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def refuse_existing_run(out_dir: Path) -> None:
    """Raise if `out_dir` holds any part of a run: a fresh run must not overwrite a run's checkpoints or append
    to its metrics, even a half-saved one."""
    found = [out_dir / (name + suffix) for name in RUN_FILES for suffix in ("", *checkpoint.SIBLINGS)]
    found = [p.name for p in found if p.exists()]
    if found == ["config.json"]:  # e.g. a run stopped by a check before any image was decoded
        raise BonefracError(f"{out_dir} already holds a run that finished no epoch (only config.json); pass --resume "
                            "to start it afresh there with these settings, or choose another --out")
    if found:
        raise BonefracError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue it "
                            f"or choose another --out")


def check_resume_config(last_dir: Path, cfg: Config, manifest=None, class_names=None) -> None:
    """Refuse a --resume whose configuration differs from the run's, except in RESUME_MAY_CHANGE, and, given the
    `manifest` it would resume on, one whose class names (in index order; read from the manifest unless given as
    `class_names`) differ from the run's."""
    meta = checkpoint.read_meta(last_dir)
    if manifest is not None:
        now = class_names_for(manifest, load_manifest(manifest)) if class_names is None else class_names
        check_resume_classes(last_dir, meta.get("class_names"), manifest, now)
    saved = _flatten(meta.get("config") or {})
    now = _flatten(to_dict(cfg))
    # A key absent from the saved config was added by newer code; its default cannot contradict the run.
    changed = [k for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if changed:
        diff = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise BonefracError(f"--resume with a changed configuration ({diff}); resume with the run's settings "
                            f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change) or start a new --out")


def check_resume_classes(last_dir: Path, saved, manifest, now) -> None:
    """Refuse to resume a run trained with class names `saved` on `manifest`, whose class order (from its
    prepare_report.json) is now `now`, when the two differ. The manifest's bytes, and so its hash, stay the same
    when only the class order changed (labels are written as names), yet every class index would then mean
    another class."""
    if saved is not None and list(saved) != list(now):
        raise BonefracError(f"--resume: {last_dir} was trained with the classes {list(saved)} (in index order), but "
                            f"{manifest} now names {list(now)}; resuming would train on swapped labels. Prepare the "
                            f"manifest again with --class-names {','.join(map(str, saved))} or start a new --out")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a.b": value} for a nested {"a": {"b": value}}; tuples become lists, as they read back from JSON."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value  # JSON has no tuples
    return out


def why_no_best(cfg, state, monitor, out_dir) -> str:
    """Why a finished run has no `best` checkpoint, for the error that says so."""
    if state["epoch"] == 0:
        return f"train.epochs={cfg.train.epochs}: no epoch ran, so {out_dir / 'best'} was not written"
    return (f"no epoch gave a valid validation {monitor} (nan every epoch; see {out_dir / 'metrics.csv'}), "
            f"so {out_dir / 'best'} was not written")


def trim_metrics(file: Path, epochs_done: int) -> None:
    """Drop rows of epochs that the resumed run will redo (logged just before a kill)."""
    if not file.exists():
        return
    with file.open() as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if int(r["epoch"]) <= epochs_done]
    if rows and len(keep) != len(rows):
        with file.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)


def append_metrics(out_dir: Path, row: dict, writer) -> None:
    """Append an epoch's `row` to `out_dir/metrics.csv` (header on the first) and, with a TensorBoard `writer`,
    each value but the epoch as a scalar at that epoch."""
    file = out_dir / "metrics.csv"
    new = not file.exists()
    with file.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    if writer:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])


def open_tensorboard(out_dir: Path):
    """A TensorBoard writer logging to `out_dir/tb`, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(out_dir / "tb"))

