"""Parts of the training loop that are not the story itself: optimizer and schedule construction, weight EMA,
the hang watchdog and the distributed-run plumbing. train.py reads top to bottom without them."""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from .config import OPTIMIZERS, SCHEDULES, one_of_error
from .errors import BonefracError

log = logging.getLogger(__name__)


def make_optimizer(model, ocfg, global_batch: int, device: torch.device):
    """AdamW/Adam with the learning rate scaled linearly by batch size when `lr_base_batch` is set.

    Norms and biases get no weight decay (decaying them only hurts); fused kernels on CUDA.
    """
    lr = ocfg.lr * (global_batch / ocfg.lr_base_batch if ocfg.lr_base_batch else 1.0)
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


def make_scheduler(optimizer, ocfg, steps_per_epoch: int, epochs: int):
    """Per-step cosine with linear warm-up, per-epoch ReduceLROnPlateau (mode max), or constant."""
    if ocfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=ocfg.plateau_factor,
                                                          patience=ocfg.plateau_patience)
    if ocfg.schedule not in SCHEDULES:
        raise BonefracError(one_of_error("optim.schedule", ocfg.schedule, SCHEDULES))
    total = max(1, steps_per_epoch * epochs)
    warmup = int(ocfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if ocfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    validation batch and checkpoint save. It saves nothing itself: mid-epoch weights under the last completed
    epoch's number would make a resume repeat steps on top of them (train.py keeps `last` as it is).
    """

    EXIT_CODE = 75

    def __init__(self, timeout_s: float, on_timeout, exit_process: bool = True):
        self.timeout_s, self.on_timeout, self.exit_process = timeout_s, on_timeout, exit_process
        self.last = time.monotonic()
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if timeout_s and timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="bonefrac-watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            if time.monotonic() - self.last > self.timeout_s:
                log.error("watchdog: no progress (training step, validation batch or checkpoint save) in %.0f s; "
                          "stopping (continue with --resume)", self.timeout_s)
                self.fired.set()
                try:
                    self.on_timeout()
                finally:
                    if self.exit_process:
                        os._exit(self.EXIT_CODE)
                return


class GradAllReduce:
    """Data parallelism without DistributedDataParallel: call it after `loss.backward()` to average every
    gradient over all ranks in ONE all-reduce; `sync_buffers(module)` averages BatchNorm statistics.

    Why: a compiled model's backward hands all gradients to autograd at once, so DDP's per-bucket hooks cannot
    overlap communication with compute anyway, while they add per-parameter copies and launches, and DDP does
    not work with CUDA graphs (`compile_mode: reduce-overhead`). Construction broadcasts rank 0's weights
    and buffers so every rank starts identical; identical averaged gradients keep them identical.
    """

    def __init__(self, model: torch.nn.Module):
        self.world = dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:  # a parameter unused on this rank still takes part, or the all-reduce would hang
                p.grad = torch.zeros_like(p)
        self._average([p.grad for p in self.params])

    def sync_buffers(self, module: torch.nn.Module) -> None:
        self._average([b for b in module.buffers() if b.is_floating_point()])

    def _average(self, tensors: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)  # SUM then divide: gloo (CPU) has no AVG
            flat.div_(self.world)
            parts = flat.split([t.numel() for t in group])
            torch._foreach_copy_(group, [part.view_as(t) for part, t in zip(parts, group)])


def distributed_setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array over all ranks (rank order), for validation metrics on the whole split."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered]) for i in range(len(arrays)))
