"""A run's `last` checkpoint beyond its weights, and how --resume puts a run back from it: optimizer, schedule
(anchored when train.epochs changed), EMA, box head, random-number streams and progress (epoch, best score, epochs
without improvement). `save_last` and `restore` are each other's inverse; train.py calls one after every epoch and
the other once, when resuming."""

from __future__ import annotations

import logging

import torch

from . import checkpoint
from .models import WithBoxHead
from .runfolder import trim_metrics
from .trainutil import lr_scale, make_scheduler, rescale_schedule_state, resume_anchor

log = logging.getLogger(__name__)


def save_last(run, epoch_done: int) -> None:
    """On rank 0, save `last`: the weights after `epoch_done` epochs and all that --resume needs to go on."""
    if run.rank == 0:
        state = run.state
        train_state = {"epoch": epoch_done, "best_score": state["best_score"], "bad_epochs": state["bad_epochs"],
                       "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                       "ema": run.ema.state_dict() if run.ema else {}, "torch_rng": torch.get_rng_state(),
                       "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                       "world": run.world, "lr_anchor": run.lr_anchor, "lr_scale": _lr_scale(run, run.world),
                       "box_head": run.net.box_head.state_dict() if run.net is not run.model else {}}
        checkpoint.save(run.out_dir / "last", run.model, {**run.base_meta, "epoch": epoch_done}, train_state,
                        seen=run.seen)


def _lr_scale(run, world: int) -> float:
    """The factor make_optimizer scales optim.lr by for `world` processes (1 without optim.lr_base_batch)."""
    return lr_scale(run.cfg.optim, run.cfg.data.batch_size * world)


def restore(run, trained: torch.nn.Module, meta: dict, state: dict) -> None:
    """Load `last` (its model, metadata and training state) into the run: weights, optimizer, schedule, EMA, RNG
    and progress; drop metrics rows of the epochs it will redo."""
    cfg = run.cfg
    new_world = state.get("world", run.world) != run.world
    if new_world:
        log.warning("resuming a run of %d processes with %d: the data shards change, so the run will not match an "
                    "uninterrupted one; the learning-rate schedule goes on from the same epoch, at the rates of the "
                    "new global batch (optim.lr_base_batch)", state["world"], run.world)
        rescale_schedule_state(state, run.steps_per_epoch)
    saved_epochs = (meta.get("config") or {}).get("train", {}).get("epochs", cfg.train.epochs)
    run.lr_anchor = resume_anchor(state, cfg.optim, run.steps_per_epoch, saved_epochs, cfg.train.epochs)
    # Once, and before the optimizer's state is loaded: building a schedule sets the learning rate to its first
    # step's, which that state then replaces by the saved one (built after it, the next step ran at the first's).
    run.scheduler = make_scheduler(run.optimizer, cfg.optim, run.steps_per_epoch, cfg.train.epochs, run.lr_anchor)
    if isinstance(run.net, WithBoxHead):
        run.net.model.load_state_dict(trained.state_dict())
        if state.get("box_head"):  # absent when the run was started without box supervision
            run.net.box_head.load_state_dict(state["box_head"])
    else:
        run.net.load_state_dict(trained.state_dict())
    base_lrs = list(getattr(run.scheduler, "base_lrs", []))  # this run's: lr_base_batch scales with the world
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if new_world and base_lrs:
        run.scheduler.base_lrs = base_lrs
        for group, base, factor in zip(run.optimizer.param_groups, base_lrs, run.scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(run.scheduler.last_epoch)
    elif new_world:  # plateau: the saved rates, reduced or not, were scaled for the old world's global batch
        # A `last` saved without lr_scale has this run's data.batch_size and optim.lr_base_batch (fixed on resume).
        factor = _lr_scale(run, run.world) / (state.get("lr_scale") or _lr_scale(run, state["world"]))
        for group in run.optimizer.param_groups:
            group["lr"] *= factor
    if run.ema and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])  # dropout / drop-path go on with their stream
    run.state = {k: state[k] for k in ("epoch", "best_score", "bad_epochs")}
    if run.rank == 0:
        trim_metrics(run.out_dir / "metrics.csv", run.state["epoch"])
    log.info("resuming at epoch %d (best %s so far %.4f)", run.state["epoch"] + 1, run.monitor,
             run.state["best_score"])

