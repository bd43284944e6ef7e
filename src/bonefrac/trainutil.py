"""Parts of the training loop that are not the story itself: optimizer and learning-rate schedule (and how a resume
goes on with it), the box-supervision loss, weight EMA, the hang watchdog and decoding the image caches once.
train.py reads top to bottom without them; distributed.py holds the multi-process plumbing and runfolder.py the
run folder's bookkeeping."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import OPTIMIZERS, SCHEDULES, Config, one_of_error
from .cache import build_cache
from .distributed import wait_for_rank0
from .errors import BonefracError
from .metrics import SELECTION_METRICS

log = logging.getLogger(__name__)


def make_optimizer(model, ocfg, global_batch: int, device: torch.device):
    """AdamW/Adam with the learning rate scaled linearly by batch size when `lr_base_batch` is set.

    Norms and biases get no weight decay (decaying them only hurts); fused kernels on CUDA.
    """
    lr = ocfg.lr * lr_scale(ocfg, global_batch)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": lr, "fused": True} if device.type == "cuda" else {"lr": lr}
    if ocfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if ocfg.name == "adam":
        # Adam's weight_decay is the L2 penalty of the reference recipe; keep it as configured.
        return torch.optim.Adam(groups, **kwargs)
    raise BonefracError(one_of_error("optim.name", ocfg.name, OPTIMIZERS))


def lr_scale(ocfg, global_batch: int) -> float:
    """The factor `make_optimizer` scales optim.lr by for a global batch of `global_batch` images."""
    return global_batch / ocfg.lr_base_batch if ocfg.lr_base_batch else 1.0


def make_scheduler(optimizer, ocfg, steps_per_epoch: int, epochs: int, anchor: tuple[int, float] | None = None):
    """Per-step cosine with linear warm-up, per-epoch ReduceLROnPlateau (mode max), or constant. `anchor`
    (step, factor): from that step on, decay from that factor instead (a resume that changed train.epochs)."""
    if ocfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=ocfg.plateau_factor,
                                                          patience=ocfg.plateau_patience)
    if ocfg.schedule not in SCHEDULES:
        raise BonefracError(one_of_error("optim.schedule", ocfg.schedule, SCHEDULES))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, ocfg, steps_per_epoch, epochs, anchor))


def lr_factor(step: int, ocfg, steps_per_epoch: int, epochs: int, anchor: tuple[int, float] | None = None) -> float:
    """The learning-rate multiplier of `make_scheduler`'s per-step schedules at `step`."""
    if ocfg.schedule == "constant":
        return 1.0
    total = max(1, steps_per_epoch * epochs)
    warmup = _warmup_steps(ocfg, steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    start, top = (warmup, 1.0) if anchor is None or step < anchor[0] else anchor
    progress = min(1.0, (step - start) / max(1, total - start))
    return ocfg.min_lr_ratio + (top - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _warmup_steps(ocfg, steps_per_epoch: int) -> int:
    return int(ocfg.warmup_epochs * steps_per_epoch)


def resume_anchor(state: dict, ocfg, steps_per_epoch: int, saved_epochs: int, epochs: int):
    """The schedule anchor for a resumed run (see make_scheduler): the saved one, or, when train.epochs changed
    after warm-up, the step reached and its factor, so the learning rate goes on decaying from where it was
    instead of jumping to where a schedule of the new length would be at that step."""
    anchor = tuple(state["lr_anchor"]) if state.get("lr_anchor") else None  # JSON may give it back as a list
    step = int(state["scheduler"].get("last_epoch", 0))
    if ocfg.schedule != "cosine" or saved_epochs == epochs or step < _warmup_steps(ocfg, steps_per_epoch):
        return anchor
    return step, lr_factor(step, ocfg, steps_per_epoch, saved_epochs, anchor)


def rescale_schedule_state(state: dict, steps_per_epoch: int) -> None:
    """Express a saved per-step schedule's position (and anchor) in `steps_per_epoch` steps, in place: resumed with
    another number of processes, an epoch has other steps, and the step count alone would put the learning rate
    elsewhere on the schedule (fewer processes: back up; more: at its floor). Plateau schedules count epochs."""
    sched, done = state["scheduler"], int(state["epoch"])
    if "lr_lambdas" not in sched or done == 0:
        return
    old_steps_per_epoch = max(1, int(sched.get("last_epoch", 0))) / done
    sched["last_epoch"] = done * steps_per_epoch
    if state.get("lr_anchor"):
        step, factor = state["lr_anchor"]
        state["lr_anchor"] = (round(step * steps_per_epoch / old_steps_per_epoch), factor)


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


class Ema:
    """Exponential moving average of the weights; `module` is the averaged copy used for validation."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model) -> None:
        ema_state, live = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ema_state.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema_state[k] for k in floats], [live[k] for k in floats], 1 - self.decay)
        for k, v in ema_state.items():
            if not v.is_floating_point():
                v.copy_(live[k])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class Watchdog:
    """Calls `on_timeout` and ends the process when no `beat()` came for `timeout_s` seconds.

    A training run once hung silently for 46 minutes; this turns such a hang into a clear error and an exit,
    so `--resume` continues from the last consistent checkpoint. The loop beats after every training step,
    validation batch and checkpoint save; ranks waiting for rank 0's saves pause theirs (`paused`), since rank 0's
    watches those. It saves nothing itself: mid-epoch weights under the last completed epoch's number would make a
    resume repeat steps on top of them (train.py keeps `last` as it is).
    """

    EXIT_CODE = 75

    def __init__(self, timeout_s: float, on_timeout, exit_process: bool = True):
        self.timeout_s, self.on_timeout, self.exit_process = timeout_s, on_timeout, exit_process
        self.last = time.monotonic()
        self.fired = threading.Event()
        self._paused = False
        self._stop = threading.Event()
        self._thread = None
        if timeout_s and timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="bonefrac-watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """Count no time while the block runs: a wait for another process, whose own watchdog watches its work.
        Counting starts afresh after it."""
        self.beat()
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self.beat()

    def stop(self) -> None:
        """End the watchdog thread and wait for it. Its callback (which holds the run: model, cached images) is
        released here, in the caller's thread: a daemon thread dropping the last reference to a tensor made from a
        numpy array while the interpreter shuts down aborted the process ("terminate called without an active
        exception", about one `make demo` in three)."""
        self._stop.set()
        self.on_timeout = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            if not self._paused and time.monotonic() - self.last > self.timeout_s:
                log.error("watchdog: no progress (image decoded or re-checked, training step, validation batch or "
                          "checkpoint save) in %.0f s; stopping (continue with --resume)", self.timeout_s)
                self.fired.set()
                try:
                    if self.on_timeout is not None:  # None: stopped meanwhile
                        self.on_timeout()
                finally:
                    if self.exit_process:
                        os._exit(self.EXIT_CODE)
                return


def decode_caches(manifest, cfg: Config, splits: dict, rank: int, world: int, beat=None) -> dict:
    """{split: uint8 image cache} for `splits` = {split: (manifest rows, image size)}; `beat()` after each image
    decoded or re-checked (on rank 0, the one that decodes; the others wait for it, beyond the process group's
    timeout: rank 0's watchdog, fed by `beat`, is what stops a hung decode)."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(manifest).parent / "cache"
    caches = {}
    for name, (rows, size) in splits.items():
        if rank == 0:  # one process decodes; the others wait and then map the finished files
            caches[name] = build_cache(rows.path.tolist(), rows.sha256.tolist(), size, cache_dir,
                                       cfg.data.decode_workers, beat=beat)
        if world > 1:
            wait_for_rank0()
        if rank != 0:
            caches[name] = build_cache(rows.path.tolist(), rows.sha256.tolist(), size, cache_dir, progress=False)
    return caches


def check_val_classes(monitor: str, class_names, y_va) -> None:
    """AUROC is undefined (nan) when val lacks a class: refuse before training rather than never save `best`."""
    missing = [c for i, c in enumerate(class_names) if not (y_va == i).any()]
    if monitor == "auroc" and missing:
        raise BonefracError(f"the val split has no images of class {', '.join(map(repr, missing))}, so the "
                            f"train.monitor AUROC is undefined; re-split the data or set another train.monitor "
                            f"({', '.join(m for m in SELECTION_METRICS if m != 'auroc')})")
    if missing:
        log.warning("the val split has no images of class %s: per-class metrics, thresholds and (with fewer than "
                    "two classes) the calibration cannot be fitted for it; re-split the data if you can",
                    ", ".join(map(repr, missing)))


