"""The training loop, readable in one sitting.

`train(manifest, out_dir, cfg, resume=False)` trains on the manifest's `train` split, selects on `val`, and
writes `out_dir/best` and `out_dir/last` checkpoints, `metrics.csv` and TensorBoard logs in `out_dir/tb`.
Run under `torchrun --nproc_per_node=N -m bonefrac train ...` it trains data-parallel (DDP): each rank sees its
own shard of every epoch, rank 0 logs and saves, validation predictions are gathered from all ranks.
It never reads the `test` split: only `evaluate` does.

`resume=True` continues the run in `out_dir` from `last` with the same configuration: only the keys in
`RESUME_MAY_CHANGE` may differ from the saved one (more epochs, patience, the watchdog, where it runs and
decodes); anything else would mix two experiments in one run, so it is refused. A larger `train.epochs` also
stretches a cosine schedule from the resumed step on. Without `resume` an `out_dir` that holds a run is refused.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint, metrics
from .config import COMPILE_SWITCH, GRAD_SYNC, Config, one_of_error, to_dict
from .data import Batches, box_masks, build_cache
from .errors import BonefracError
from .manifest import class_names_for, load_manifest, manifest_sha256
from .models import WithBoxHead, build_model, use_flipped_dgrad
from .predict import infer_logits, resolve_device
from .trainutil import (Ema, GradAllReduce, Watchdog, distributed_setup, gather_arrays, make_optimizer,
                        make_scheduler)
from .transforms import augment, normalize

log = logging.getLogger(__name__)

# Config keys that may differ on --resume: they change how long or where the run goes, not what it trains.
RESUME_MAY_CHANGE = frozenset({"train.epochs", "train.patience", "train.watchdog_s", "train.device",
                               "data.decode_workers", "data.cache_dir", "data.device_cache_gib"})
# What a run leaves in its out dir (with checkpoint.SIBLINGS): any of them means "this folder holds a run".
RUN_FILES = ("last", "best", "metrics.csv", "config.json")


def train(manifest: str | Path, out_dir: str | Path, cfg: Config, resume: bool = False) -> Path:
    """Train a model; returns the path of the best checkpoint (chosen on validation)."""
    rank, world = distributed_setup()
    out_dir = Path(out_dir)
    if resume:
        _check_resume_config(out_dir / "last", cfg)
    else:
        _refuse_existing_run(out_dir)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    # --- data: manifest rows -> decoded uint8 caches (train has a margin for augmentation) ---------------
    df = load_manifest(manifest)
    class_names = class_names_for(manifest, df)
    index = {c: i for i, c in enumerate(class_names)}
    tr, va = df[df.split == "train"], df[df.split == "val"]
    if tr.empty or va.empty:
        raise BonefracError(f"{manifest}: training needs rows in both the train and val splits "
                            f"(found {len(tr)} train, {len(va)} val)")
    y_tr, y_va = tr.label.map(index).to_numpy(), va.label.map(index).to_numpy()
    monitor = cfg.train.monitor if cfg.train.monitor != "auto" else metrics.default_selection_metric(
        len(class_names))
    _check_val_classes(monitor, class_names, y_va)
    size = cfg.data.size
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(manifest).parent / "cache"
    train_size = int(round(size * cfg.data.cache_margin))
    caches = {}
    for name, rows, sz in (("train", tr, train_size), ("val", va, size)):
        if rank == 0:  # one process decodes; the others wait and then map the finished files
            caches[name] = build_cache(rows.path.tolist(), rows.sha256.tolist(), sz, cache_dir,
                                       cfg.data.decode_workers)
        if world > 1:
            dist.barrier()
        if rank != 0:
            caches[name] = build_cache(rows.path.tolist(), rows.sha256.tolist(), sz, cache_dir, progress=False)
    masks = _lesion_masks(cfg, tr, train_size, class_names)
    train_batches = Batches(caches["train"], y_tr, cfg.data.batch_size, device, cfg.data.sampler,
                            cfg.data.device_cache_gib, rank, world, masks=masks)
    val_batches = Batches(caches["val"], y_va, cfg.train.eval_batch_size, device, "shuffle",
                          cfg.data.device_cache_gib, rank, world, drop_last=False)
    if len(train_batches) == 0:
        raise BonefracError(f"train split has {len(tr)} images, fewer than one batch of {cfg.data.batch_size} "
                            f"per process; lower data.batch_size")

    # --- model, optimizer, schedule, loss --------------------------------------------------------------
    model, mean, std = build_model(cfg.model, len(class_names))
    if cfg.train.flip_depthwise_grad:
        log.info("flipped-filter input gradient for %d depthwise convolutions", use_flipped_dgrad(model))
    prep = {"size": size, "mean": mean, "std": std, "channels": cfg.model.in_chans}
    # With box supervision the optimised network also has a lesion-map head; `model` alone is saved.
    net = WithBoxHead(model) if masks is not None else model
    net = net.to(device)
    if cfg.train.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    steps_per_epoch = min(len(train_batches), cfg.train.max_steps_per_epoch or len(train_batches))
    optimizer = make_optimizer(net, cfg.optim, cfg.data.batch_size * world, device)
    scheduler = make_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    weight = None
    if cfg.train.class_weights:
        counts = np.bincount(y_tr, minlength=len(class_names)).clip(min=1)
        weight = torch.tensor(len(y_tr) / (len(class_names) * counts), dtype=torch.float32, device=device)
    ema = Ema(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    pos = metrics.positive_class_index(class_names)

    # --- resume -----------------------------------------------------------------------------------------
    state = {"epoch": 0, "best_score": -math.inf, "bad_epochs": 0}
    if resume:
        state = _resume(out_dir / "last", net, optimizer, scheduler, ema, manifest)
        _trim_metrics(out_dir / "metrics.csv", state["epoch"])
        log.info("resuming at epoch %d (best %s so far %.4f)", state["epoch"] + 1, monitor, state["best_score"])

    step_model, grad_sync = net, None
    compiled = _use_compile(cfg, device)
    sync_mode = _grad_sync_mode(cfg, compiled)  # checked on one process too, like train.compile
    if compiled:
        step_model = torch.compile(net, mode=cfg.train.compile_mode)
    if world > 1 and sync_mode == "ddp":
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index]
                                                               if device.type == "cuda" else None)
    elif world > 1:
        grad_sync = GradAllReduce(net)
    base_meta = {"arch": cfg.model.arch, "class_names": class_names, "positive_index": pos,
                 "positive_class": class_names[pos] if pos is not None else None, "preprocess": prep,
                 "config": to_dict(cfg), "manifest_sha256": manifest_sha256(manifest)}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    writer = _tensorboard(out_dir) if rank == 0 else None

    def save_last(epoch_done: int):
        if rank == 0:
            train_state = {"epoch": epoch_done, "best_score": state["best_score"], "bad_epochs": state["bad_epochs"],
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "ema": ema.state_dict() if ema else {}, "torch_rng": torch.get_rng_state(),
                           "box_head": net.box_head.state_dict() if net is not model else {}}
            checkpoint.save(out_dir / "last", model, {**base_meta, "epoch": epoch_done}, train_state)

    # On a hang no checkpoint is written: the weights have moved on since `last` (the end of the last completed
    # epoch), so saving them under that epoch would make --resume repeat steps on top of them.
    watchdog = Watchdog(cfg.train.watchdog_s, on_timeout=lambda: log.error(
        "the last completed epoch (%d) is kept in %s; continue with --resume", state["epoch"], out_dir / "last"))
    # --- the epochs ---------------------------------------------------------------------------------------
    try:
        for epoch in range(state["epoch"], cfg.train.epochs):
            gen = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)  # resumable: seed per epoch
            t0 = time.perf_counter()
            train_loss, seen = _train_epoch(step_model, net, train_batches, gen, steps_per_epoch, optimizer,
                                            scheduler, cfg, prep, weight, ema, watchdog, epoch, rank, grad_sync)
            if grad_sync:  # BatchNorm statistics differ with each rank's data
                grad_sync.sync_buffers(net)
                if ema:
                    grad_sync.sync_buffers(ema.module)
            eval_model = ema.module if ema else model
            val_logits, val_y = _val_logits(eval_model, val_batches, prep, cfg, world, watchdog.beat)
            elapsed = time.perf_counter() - t0
            val_probs = metrics.softmax(val_logits)
            score = metrics.selection_score(monitor, val_y, val_probs)
            val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_y)))
            if cfg.optim.schedule == "plateau":
                scheduler.step(score)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss}
            if monitor != "loss":  # the "loss" score is -val_loss: one column, and it keeps the real loss
                row[f"val_{monitor}"] = score
            row.update(lr=optimizer.param_groups[0]["lr"], images_per_s=seen * world / elapsed, time_s=elapsed)
            improved = score > state["best_score"]
            if improved:
                state["best_score"], state["bad_epochs"] = score, 0
                if rank == 0:
                    meta = {**base_meta, "epoch": epoch + 1,
                            **calibration_meta(val_logits, val_y, class_names, pos, monitor, score)}
                    watchdog.beat()  # fitting the calibration can take a while on a large val split
                    checkpoint.save(out_dir / "best", eval_model, meta)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            if rank == 0:
                _log_epoch(out_dir, row, writer, improved)
            watchdog.beat()
            save_last(epoch + 1)
            watchdog.beat()
            if cfg.train.patience and state["bad_epochs"] >= cfg.train.patience:
                log.info("early stopping: no %s improvement for %d epochs", monitor, state["bad_epochs"])
                break
    except KeyboardInterrupt:
        log.warning("interrupted; the last completed epoch is saved in %s (use --resume)", out_dir / "last")
        raise
    finally:
        watchdog.stop()
        if writer:
            writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not (out_dir / "best" / checkpoint.META_FILE).is_file():
        raise BonefracError(_why_no_best(cfg, state, monitor, out_dir))
    return out_dir / "best"


def _why_no_best(cfg, state, monitor, out_dir) -> str:
    if state["epoch"] == 0:
        return f"train.epochs={cfg.train.epochs}: no epoch ran, so {out_dir / 'best'} was not written"
    return (f"no epoch gave a valid validation {monitor} (nan every epoch; see {out_dir / 'metrics.csv'}), "
            f"so {out_dir / 'best'} was not written")


def _check_val_classes(monitor: str, class_names, y_va) -> None:
    """AUROC is undefined (nan) when val lacks a class: refuse before training rather than never save `best`."""
    missing = [c for i, c in enumerate(class_names) if not (y_va == i).any()]
    if monitor == "auroc" and missing:
        raise BonefracError(f"the val split has no images of class {', '.join(map(repr, missing))}, so the "
                            f"train.monitor AUROC is undefined; re-split the data or set another train.monitor")


def _refuse_existing_run(out_dir: Path) -> None:
    """A fresh run must not overwrite a run's checkpoints or append to its metrics, even a half-saved one."""
    found = [out_dir / (name + suffix) for name in RUN_FILES for suffix in ("", *checkpoint.SIBLINGS)]
    found = [p.name for p in found if p.exists()]
    if found:
        raise BonefracError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue it "
                            f"or choose another --out")


def _check_resume_config(last_dir: Path, cfg: Config) -> None:
    """Refuse a --resume whose configuration differs from the run's, except in RESUME_MAY_CHANGE."""
    saved = _flatten(checkpoint.read_meta(last_dir).get("config") or {})
    now = _flatten(to_dict(cfg))
    # A key absent from the saved config was added by newer code; its default cannot contradict the run.
    changed = [k for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if changed:
        diff = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise BonefracError(f"--resume with a changed configuration ({diff}); resume with the run's settings "
                            f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change) or start a new --out")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value  # JSON has no tuples
    return out


def _train_epoch(step_model, model, batches, gen, steps, optimizer, scheduler, cfg, prep, weight, ema,
                 watchdog, epoch, rank, grad_sync=None):
    """One pass over the training shard; returns (mean loss, images seen by this rank)."""
    from tqdm.auto import tqdm

    step_model.train()
    device = batches.device
    total, count, seen, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=rank != 0, leave=False,
               dynamic_ncols=True, unit="step")
    for step, (x, y, *masks) in enumerate(batches.epoch(gen)):
        if step >= steps:
            break
        loss = train_step(step_model, model, x, y, gen, optimizer, scheduler, cfg, prep, weight, ema, grad_sync,
                          masks=masks or None)
        total += loss
        count += 1
        seen += len(y)
        watchdog.beat()
        if rank == 0 and (step % 10 == 0 or step == steps - 1):  # .item() syncs the GPU: only now and then
            bar.set_postfix(loss=f"{(total / count).item():.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.update(1)
    bar.close()
    mean_loss = total / max(count, 1)
    if dist.is_initialized():
        dist.all_reduce(mean_loss)
        mean_loss /= dist.get_world_size()
    return float(mean_loss), seen


def train_step(step_model, model, x, y, gen, optimizer, scheduler, cfg, prep, weight=None, ema=None,
               grad_sync=None, masks=None):
    """One optimisation step on a uint8 batch: augment, forward (bf16 on CUDA), backward, clip, update.

    `model` is what the optimizer updates (a `WithBoxHead` when `masks` = (lesion masks, weights) are given;
    `ema` averages its classifier). Returns the loss as a device tensor (no host sync); the throughput
    benchmark times exactly this.
    """
    device = x.device
    views = augment(x, cfg.data.size, cfg.augment, gen, masks[0] if masks else None)
    views, lesion = views if masks else (views, None)
    inp = normalize(views, prep["mean"], prep["std"], prep["channels"])
    if cfg.train.channels_last and device.type == "cuda":
        inp = inp.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda"):
        logits = step_model(inp)
    logits, lesion_logits = logits if masks else (logits, None)
    loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.train.label_smoothing)
    if masks:
        loss = loss + cfg.train.box_loss * lesion_loss(lesion_logits.float(), lesion, masks[1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_sync:
        grad_sync()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
    optimizer.step()
    if cfg.optim.schedule != "plateau":
        scheduler.step()
    if ema:
        ema.update(model.model if isinstance(model, WithBoxHead) else model)
    return loss.detach()


def lesion_loss(logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Box-supervision loss: BCE of the lesion map (B, 1, h, w) against the masks max-pooled to that grid,
    positive and negative cells weighted equally within an image (a fracture covers ~1 % of cells), averaged
    over the images whose masks are known (`weights`)."""
    target = (F.adaptive_max_pool2d(masks, logits.shape[-2:]) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1)
    target = target.flatten(1)
    pos = (bce * target).sum(1) / target.sum(1).clamp(min=1)
    neg = (bce * (1 - target)).sum(1) / (1 - target).sum(1).clamp(min=1)
    per_image = torch.where(target.sum(1) > 0, 0.5 * (pos + neg), neg)
    return (per_image * weights).sum() / weights.sum().clamp(min=1)


def _val_logits(model, batches, prep, cfg, world, beat=None):
    """Validation logits and labels, gathered from every rank in a distributed run; `beat()` after each batch
    tells the watchdog that validation is progressing (a pass can take longer than train.watchdog_s)."""
    model.eval()
    logits, ys = [], []
    for x, y in batches.epoch(None):
        logits.append(infer_logits(model, x, prep, amp=cfg.train.amp))
        ys.append(y)
        if beat:
            beat()
    out = torch.cat(logits).cpu().numpy(), torch.cat(ys).cpu().numpy()
    return gather_arrays(*out) if world > 1 else out


def calibration_meta(val_logits, val_y, class_names, pos, monitor, score) -> dict:
    """Temperature, decision threshold and operating points fitted on validation, for the checkpoint."""
    temperature = metrics.fit_temperature(val_logits, val_y)
    probs = metrics.softmax(val_logits, temperature)
    out = {"temperature": temperature, "threshold": None, "operating_points": None,
           "val_metrics": {"monitor": monitor, "score": score, "n": int(len(val_y))}}
    if pos is not None and len(np.unique(val_y)) == 2:
        y_bin = (val_y == pos).astype(int)
        points = metrics.operating_points(y_bin, probs[:, pos])
        # A screening point between the default (Youden) and the 0.95-sensitivity one.
        points["screening"] = metrics.threshold_for_sensitivity(y_bin, probs[:, pos], 0.90)
        out["operating_points"] = points
        out["threshold"] = points["default"]
    out["val_metrics"].update(metrics.classification_metrics(val_y, probs, class_names, pos, out["threshold"]))
    return out


def _resume(last_dir: Path, net, optimizer, scheduler, ema, manifest) -> dict:
    meta = checkpoint.read_meta(last_dir)
    if meta.get("manifest_sha256") != manifest_sha256(manifest):
        raise BonefracError(f"{last_dir} was trained on a different manifest; resume with the same --manifest")
    trained, _ = checkpoint.load(last_dir)
    state = checkpoint.load_train_state(last_dir)
    if isinstance(net, WithBoxHead):
        net.model.load_state_dict(trained.state_dict())
        if state.get("box_head"):  # absent when the run was started without box supervision
            net.box_head.load_state_dict(state["box_head"])
    else:
        net.load_state_dict(trained.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema and state.get("ema"):
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["torch_rng"])
    return {k: state[k] for k in ("epoch", "best_score", "bad_epochs")}


def _lesion_masks(cfg, rows, cache_size: int, class_names):
    """(masks, weights) for box supervision at a quarter of the cache's resolution, or None when off."""
    if cfg.train.box_loss <= 0:
        return None
    if not cfg.data.boxes:
        raise BonefracError("train.box_loss needs data.boxes (a CSV of image, x, y, w, h lesion boxes)")
    return box_masks(rows, cfg.data.boxes, max(8, cache_size // 4), metrics.negative_class(class_names))


def _trim_metrics(file: Path, epochs_done: int) -> None:
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


def _use_compile(cfg, device) -> bool:
    mode = cfg.train.compile
    if mode not in COMPILE_SWITCH:
        raise BonefracError(one_of_error("train.compile", mode, COMPILE_SWITCH))
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _grad_sync_mode(cfg, compiled: bool) -> str:
    """How ranks share gradients: DDP overlaps communication with an eager backward; a compiled backward
    (and CUDA graphs) is served better by one all-reduce after it (trainutil.GradAllReduce)."""
    mode = cfg.train.grad_sync
    if mode not in GRAD_SYNC:
        raise BonefracError(one_of_error("train.grad_sync", mode, GRAD_SYNC))
    return ("allreduce" if compiled else "ddp") if mode == "auto" else mode


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(out_dir / "tb"))


def _log_epoch(out_dir: Path, row: dict, writer, improved: bool) -> None:
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
    log.info("epoch %d  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch") + "%s",
             row["epoch"], "  (best)" if improved else "")
