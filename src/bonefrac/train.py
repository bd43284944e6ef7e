"""The training loop, readable in one sitting.

`train(manifest, out_dir, cfg, resume=False)` trains on the manifest's `train` split, selects on `val`, and
writes `out_dir/best` and `out_dir/last` checkpoints, `metrics.csv` and TensorBoard logs in `out_dir/tb`.
Run under `torchrun --nproc_per_node=N -m bonefrac train ...` it trains data-parallel (DDP): each rank sees its
own shard of every epoch, rank 0 logs and saves, validation predictions are gathered from all ranks.
It never reads the `test` split: only `evaluate` does.

`resume=True` continues the run in `out_dir` from `last` with the same configuration: only the keys in
`runfolder.RESUME_MAY_CHANGE` may differ from the saved one (more epochs, patience, the watchdog, where it runs
and decodes); anything else would mix two experiments in one run, so it is refused. After a changed
`train.epochs` a cosine schedule decays from the learning rate it had reached to the new end, without a jump. A
run killed before its first epoch finished has nothing to resume: `resume` then starts it afresh. Without
`resume` an `out_dir` that holds a run is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint, metrics
from .calibration import calibration_meta
from .config import Config, to_dict
from .data import Batches
from .distributed import GradAllReduce, distributed_setup, gather_arrays, parallelize, sync_buffers, wait_for_rank0
from .errors import BonefracError, ConfigError
from .manifest import class_names_for, load_manifest, manifest_sha256
from .models import WithBoxHead, build_model, check_arch, use_flipped_dgrad
from .predict import infer_logits, resolve_device
from .runfolder import (append_metrics, check_resume_config, open_tensorboard, prepare_resume, refuse_existing_run,
                        resume_hint, run_folder_lock, why_no_best)
from .seen import seen_images
from .sources import box_masks
from .trainstate import restore, save_last
from .trainutil import Ema, Watchdog, check_val_classes, decode_caches, lesion_loss, make_optimizer, make_scheduler
from .transforms import augment, normalize

log = logging.getLogger(__name__)


def train(manifest: str | Path, out_dir: str | Path, cfg: Config, resume: bool = False) -> Path:
    """Train a model; returns the path of the best checkpoint (chosen on validation)."""
    check_arch(cfg.model.arch)  # before minutes of decoding images into the cache
    table = load_manifest(manifest)  # read once: the checks below and the data all come from this table
    class_names = class_names_for(manifest, table)
    if cfg.train.positive_class is not None:  # likewise before decoding
        check_positive_class(class_names, cfg.train.positive_class)
    rank, world = distributed_setup()
    with run_folder_lock(Path(out_dir), rank):  # two trainers writing one folder would corrupt both runs
        return _train((manifest, table, class_names), Path(out_dir), cfg, resume, rank, world)


def _train(data, out_dir: Path, cfg: Config, resume: bool, rank: int, world: int) -> Path:
    """`data` = (manifest path, its table, its class names in index order)."""
    manifest, _, class_names = data
    last = None
    if resume:
        resume = prepare_resume(out_dir, rank, world)  # False: killed in its first epoch, nothing to resume
        if resume:
            check_resume_config(out_dir / "last", cfg, manifest, class_names)
            # Read now, not after minutes of decoding images: a corrupt file should stop the run at once.
            last = (*checkpoint.load(out_dir / "last"), checkpoint.load_train_state(out_dir / "last"))
            if last[1].get("manifest_sha256") != manifest_sha256(manifest):
                raise BonefracError(f"{out_dir / 'last'} was trained on a different manifest; resume with the "
                                    "same --manifest")
    else:
        refuse_existing_run(out_dir)
    if world > 1:
        dist.barrier()  # every rank has looked at the folder before rank 0 writes to it
    if rank:
        logging.getLogger("bonefrac").setLevel(logging.WARNING)  # rank 0 tells the story; others only warn
    elif not resume:  # first, so a run killed while decoding images can be resumed without naming its --config
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    # Data, model, optimizer, loss; and the schedule, unless resuming (then trainstate.restore builds it).
    # Decoding takes minutes on a large data set and can hang too (a stalled network drive): watched like the
    # steps, on rank 0, which decodes while the others wait for it.
    decoding = Watchdog(cfg.train.watchdog_s if rank == 0 else 0, on_timeout=lambda: log.error(
        "no image was decoded for train.watchdog_s (nor re-checked against the manifest, for a reused cache); "
        "nothing was trained yet: --resume starts the run again"))
    try:
        run = _build_run(data, out_dir, cfg, device, rank, world, resume, beat=decoding.beat)
    finally:
        decoding.stop()
    if resume:
        restore(run, *last)
    run.step_model, run.grad_sync = parallelize(run.net, cfg, device, world)
    _start_outputs(run, manifest)

    # On a hang no checkpoint is written: the weights have moved on since `last` (the end of the last completed
    # epoch), so saving them under that epoch would make --resume repeat steps on top of them.
    watchdog = Watchdog(cfg.train.watchdog_s, on_timeout=lambda: log.error("%s", resume_hint(run.out_dir)))
    try:
        for epoch in range(run.state["epoch"], cfg.train.epochs):
            # Checked before each epoch, not after: a --resume of a run that stopped early must not train more.
            if cfg.train.patience and run.state["bad_epochs"] >= cfg.train.patience:
                log.info("early stopping: no %s improvement for %d epochs", run.monitor, run.state["bad_epochs"])
                break
            gen = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)  # resumable: seed per epoch
            t0 = time.perf_counter()
            train_loss, seen = _train_pass(run, gen, epoch, watchdog)
            val_logits, val_y = _val_logits(run.eval_model, run.val_batches, run.prep, cfg, world,
                                            len(run.class_names), watchdog.beat)
            elapsed = time.perf_counter() - t0
            score, row = _score_epoch(run, epoch, train_loss, val_logits, val_y, seen, elapsed)
            _save_epoch(run, epoch, score, row, val_logits, val_y, watchdog)
    except KeyboardInterrupt:
        log.warning("interrupted; %s", resume_hint(run.out_dir))
        raise
    finally:
        watchdog.stop()
        if run.writer:
            run.writer.close()
    return _finish(run)


@dataclass
class _Run:
    """What the epochs share: the data, the model and its optimisation, where it saves, and its progress."""

    cfg: Config
    out_dir: Path
    rank: int
    world: int
    class_names: list
    pos: int | None  # index of the positive class (metrics.positive_class_index)
    monitor: str  # the validation metric that selects `best`
    train_batches: Batches
    val_batches: Batches
    steps_per_epoch: int
    prep: dict  # preprocessing, saved with the checkpoints
    model: torch.nn.Module  # the classifier, what the checkpoints hold
    net: torch.nn.Module  # what the optimizer updates: `model`, or a WithBoxHead around it under box supervision
    optimizer: torch.optim.Optimizer
    scheduler: object  # None only until trainstate.restore builds a resumed run's
    weight: torch.Tensor | None  # class weights of the loss
    ema: Ema | None
    state: dict = field(default_factory=lambda: {"epoch": 0, "best_score": -math.inf, "bad_epochs": 0})
    step_model: torch.nn.Module | None = None  # what a step calls: `net`, compiled and/or in DDP
    grad_sync: GradAllReduce | None = None
    lr_anchor: tuple[int, float] | None = None  # make_scheduler's anchor after a resume that changed train.epochs
    base_meta: dict = field(default_factory=dict)  # checkpoint metadata common to every epoch
    seen: dict = field(default_factory=dict)  # {sha256: split} of the train/val images, saved beside each checkpoint
    writer: object = None  # TensorBoard, on rank 0 when installed

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is validated and saved as `best`: the weight average when there is one."""
        return self.ema.module if self.ema else self.model


def _build_run(data, out_dir: Path, cfg: Config, device: torch.device, rank: int, world: int,
               resume: bool = False, beat=None) -> _Run:
    """A fresh run: data, model, optimizer, schedule and loss weights (`resume`: trainstate.restore adds the
    schedule)."""
    class_names = data[2]
    y_tr, monitor, train_batches, val_batches, seen = _load_data(*data, cfg, device, rank, world, beat)
    model, net, prep = _build_model(cfg, class_names, train_batches.masks is not None, device)
    steps_per_epoch = min(len(train_batches), cfg.train.max_steps_per_epoch or len(train_batches))
    optimizer = make_optimizer(net, cfg.optim, cfg.data.batch_size * world, device)
    scheduler = None if resume else make_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    weight = None
    if cfg.train.class_weights:
        counts = np.bincount(y_tr, minlength=len(class_names)).clip(min=1)
        weight = torch.tensor(len(y_tr) / (len(class_names) * counts), dtype=torch.float32, device=device)
    ema = Ema(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    pos = _positive_class(class_names, cfg.train.positive_class)
    return _Run(cfg=cfg, out_dir=out_dir, rank=rank, world=world, class_names=class_names,
                pos=pos, monitor=monitor, train_batches=train_batches,
                val_batches=val_batches, steps_per_epoch=steps_per_epoch, prep=prep, model=model, net=net,
                optimizer=optimizer, scheduler=scheduler, weight=weight, ema=ema, seen=seen)


def check_positive_class(class_names: list[str], chosen: str | None) -> int | None:
    """The positive class's index: train.positive_class (`chosen`, which must name one of two classes), else
    metrics' naming rule; a ConfigError for a `chosen` that does not fit."""
    if chosen is not None and len(class_names) != 2:
        raise ConfigError(f"train.positive_class applies to two-class models; these classes are {class_names}")
    return metrics.positive_class_index(class_names, chosen)


def _positive_class(class_names: list[str], chosen: str | None) -> int | None:
    """check_positive_class, logged: a warning when the naming rule fell back to the second class, since every
    threshold and sensitivity is then about finding it."""
    pos = check_positive_class(class_names, chosen)
    if pos is not None and chosen is None and metrics.positive_by_position(class_names):
        log.warning("positive class '%s' chosen by position: neither or both of %s are named like a negative "
                    "(no_fracture, normal, ...); thresholds and sensitivity are about finding it (set "
                    "train.positive_class to choose)", class_names[pos], class_names)
    elif pos is not None:
        log.info("positive class: '%s'", class_names[pos])
    return pos


def _load_data(manifest, df, class_names, cfg: Config, device: torch.device, rank: int, world: int, beat=None):
    """(train labels, selection metric, train batches, val batches, seen_images) from the manifest's
    train and val rows (`df`, its table), decoded into uint8 caches (train's with a margin for augmentation, and
    lesion masks with box_loss)."""
    index = {c: i for i, c in enumerate(class_names)}
    tr, va = df[df.split == "train"], df[df.split == "val"]
    if tr.empty or va.empty:
        raise BonefracError(f"{manifest}: training needs rows in both the train and val splits "
                            f"(found {len(tr)} train, {len(va)} val)")
    y_tr, y_va = tr.label.map(index).to_numpy(), va.label.map(index).to_numpy()
    monitor = cfg.train.monitor if cfg.train.monitor != "auto" else metrics.default_selection_metric(
        len(class_names))
    check_val_classes(monitor, class_names, y_va)
    train_size = int(round(cfg.data.size * cfg.data.cache_margin))
    caches = decode_caches(manifest, cfg, {"train": (tr, train_size), "val": (va, cfg.data.size)}, rank, world,
                           beat)
    masks = _lesion_masks(cfg, tr, train_size, class_names)
    train_batches = Batches(caches["train"], y_tr, cfg.data.batch_size, device, cfg.data.sampler,
                            cfg.data.device_cache_gib, rank, world, masks=masks)
    val_batches = Batches(caches["val"], y_va, cfg.train.eval_batch_size, device, "shuffle",
                          cfg.data.device_cache_gib, rank, world, drop_last=False)
    if len(train_batches) == 0:
        raise BonefracError(f"train split has {len(tr)} images, fewer than one batch of {cfg.data.batch_size} "
                            f"per process; lower data.batch_size")
    return y_tr, monitor, train_batches, val_batches, seen_images(df)


def _lesion_masks(cfg, rows, cache_size: int, class_names):
    """(masks, weights) for box supervision at a quarter of the cache's resolution, or None when off."""
    if cfg.train.box_loss <= 0:
        return None
    if not cfg.data.boxes:
        raise BonefracError("train.box_loss needs data.boxes (a CSV of image, x, y, w, h lesion boxes)")
    return box_masks(rows, cfg.data.boxes, max(8, cache_size // 4), metrics.negative_class(class_names))


def _build_model(cfg: Config, class_names: list[str], box_head: bool, device: torch.device):
    """(model, net, prep): the classifier; what the optimizer updates, on `device` (with a lesion-map head when
    `box_head`: only `model` is saved); and the preprocessing the checkpoints record."""
    model, mean, std = build_model(cfg.model, len(class_names), class_names)
    if cfg.train.flip_depthwise_grad:
        log.info("flipped-filter input gradient for %d depthwise convolutions", use_flipped_dgrad(model))
    prep = {"size": cfg.data.size, "mean": mean, "std": std, "channels": cfg.model.in_chans}
    net = WithBoxHead(model) if box_head else model
    net = net.to(device)
    if cfg.train.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return model, net, prep


def _start_outputs(run: _Run, manifest) -> None:
    """Set the checkpoints' common metadata; rank 0 writes config.json (again: a resume may change some keys) and
    opens TensorBoard."""
    cfg, pos = run.cfg, run.pos
    run.base_meta = {"arch": cfg.model.arch, "class_names": run.class_names, "positive_index": pos,
                     "positive_class": run.class_names[pos] if pos is not None else None, "preprocess": run.prep,
                     "config": to_dict(cfg), "manifest_sha256": manifest_sha256(manifest)}
    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        run.writer = open_tensorboard(run.out_dir)


def _train_pass(run: _Run, gen: torch.Generator, epoch: int, watchdog: Watchdog) -> tuple[float, int]:
    """One epoch of training on this rank's shard; returns (mean loss over all ranks, images this rank saw)."""
    aug_gen = gen  # one process: the epoch's generator draws the order, then the augmentations, as always
    if run.rank:
        # `gen` (the order, shared so that the shards partition it) would give every rank the same augmentations
        # and dropout: other ranks draw theirs from their own streams, seeded per epoch so a resume repeats them.
        seed = (run.cfg.train.seed * 100_003 + epoch) * 1_000_003 + run.rank
        aug_gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
    train_loss, seen = _train_epoch(run.step_model, run.net, run.train_batches, gen, run.steps_per_epoch,
                                    run.optimizer, run.scheduler, run.cfg, run.prep, run.weight, run.ema, watchdog,
                                    epoch, run.rank, run.grad_sync, aug_gen)
    if run.world > 1:  # BatchNorm statistics differ with each rank's data (DDP syncs gradients, not buffers)
        sync_buffers(run.net)
        if run.ema:
            sync_buffers(run.ema.module)
    return train_loss, seen


def _train_epoch(step_model, model, batches, gen, steps, optimizer, scheduler, cfg, prep, weight, ema,
                 watchdog, epoch, rank, grad_sync=None, aug_gen=None):
    """One pass over the training shard in `gen`'s order, augmented from `aug_gen` (default `gen`); returns (mean
    loss, images seen by this rank)."""
    aug_gen = gen if aug_gen is None else aug_gen
    from tqdm.auto import tqdm

    step_model.train()
    device = batches.device
    total, count, seen, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=rank != 0, leave=False,
               dynamic_ncols=True, unit="step")
    for step, (x, y, *masks) in enumerate(batches.epoch(gen)):
        if step >= steps:
            break
        loss = train_step(step_model, model, x, y, aug_gen, optimizer, scheduler, cfg, prep, weight, ema, grad_sync,
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


def _val_logits(model, batches, prep, cfg, world, classes: int, beat=None):
    """Validation logits (N, `classes`) and labels, gathered from every rank in a distributed run; `beat()` after
    each batch tells the watchdog that validation is progressing (a pass can take longer than train.watchdog_s)."""
    model.eval()
    logits, ys = [], []
    for x, y in batches.epoch(None):
        logits.append(infer_logits(model, x, prep, amp=cfg.train.amp))
        ys.append(y)
        if beat:
            beat()
    if logits:
        out = torch.cat(logits).cpu().numpy(), torch.cat(ys).cpu().numpy()
    else:  # a val split smaller than the number of processes leaves a rank without images: it adds none
        out = np.zeros((0, classes), np.float32), np.zeros(0, np.int64)
    return gather_arrays(*out) if world > 1 else out


def _score_epoch(run: _Run, epoch: int, train_loss: float, val_logits, val_y, seen: int, elapsed: float):
    """(selection score, metrics row) of an epoch from its validation logits; steps a plateau schedule."""
    val_probs = metrics.softmax(val_logits)
    score = metrics.selection_score(run.monitor, val_y, val_probs)
    val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_y)))
    if run.cfg.optim.schedule == "plateau":
        run.scheduler.step(score)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss}
    if run.monitor != "loss":  # the "loss" score is -val_loss: one column, and it keeps the real loss
        row[f"val_{run.monitor}"] = score
    row.update(lr=run.optimizer.param_groups[0]["lr"], images_per_s=seen * run.world / elapsed, time_s=elapsed)
    return score, row


def _save_epoch(run: _Run, epoch: int, score: float, row: dict, val_logits, val_y, watchdog: Watchdog) -> None:
    """Record a finished epoch: its progress in `run.state`, `best` (calibrated) when `score` improved, the
    metrics row, and `last`; the other ranks wait for rank 0's saves, their watchdogs paused (rank 0's watches)."""
    state = run.state
    improved = score > state["best_score"]
    if improved:
        state["best_score"], state["bad_epochs"] = score, 0
        if run.rank == 0:
            meta = {**run.base_meta, "epoch": epoch + 1,
                    **calibration_meta(val_logits, val_y, run.class_names, run.pos, run.monitor, score)}
            watchdog.beat()  # fitting the calibration can take a while on a large val split
            checkpoint.save(run.out_dir / "best", run.eval_model, meta, seen=run.seen)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    if run.rank == 0:
        append_metrics(run.out_dir, row, run.writer)
        log.info("epoch %d  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch") + "%s",
                 row["epoch"], "  (best)" if improved else "")
    watchdog.beat()
    save_last(run, epoch + 1)
    watchdog.beat()
    if run.world > 1:  # else they would wait in the next epoch's first step, their watchdogs counting the saves
        wait_for_rank0(watchdog)


def _finish(run: _Run) -> Path:
    """Leave the process group once every rank is done; returns `best`, or raises when no epoch wrote it."""
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not (run.out_dir / "best" / checkpoint.META_FILE).is_file():
        raise BonefracError(why_no_best(run.cfg, run.state, run.monitor, run.out_dir))
    return run.out_dir / "best"
