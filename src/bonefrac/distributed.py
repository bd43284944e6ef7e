"""How a training step runs across processes: `torch.compile` when asked, then either DDP or one all-reduce of all
gradients per step (GradAllReduce), plus the process-group setup, the gathering of validation outputs and the
waits for work only rank 0 does.
One process (no torchrun) uses only `parallelize`, which then just compiles or not."""

from __future__ import annotations

import datetime
import functools
import os

import numpy as np
import torch
import torch.distributed as dist

from .config import COMPILE_SWITCH, GRAD_SYNC, Config, one_of_error
from .errors import BonefracError


class GradAllReduce:
    """Data parallelism without DistributedDataParallel: call it after `loss.backward()` to average every
    gradient over all ranks in ONE all-reduce (`sync_buffers(module)` averages BatchNorm statistics, in either mode).

    Why: a compiled model's backward hands all gradients to autograd at once, so DDP's per-bucket hooks cannot
    overlap communication with compute anyway, while they add per-parameter copies and launches, and DDP does
    not work with CUDA graphs (`compile_mode: reduce-overhead`). Construction broadcasts rank 0's weights
    and buffers so every rank starts identical; identical averaged gradients keep them identical.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:  # a parameter unused on this rank still takes part, or the all-reduce would hang
                p.grad = torch.zeros_like(p)
        average_over_ranks([p.grad for p in self.params])


def sync_buffers(module: torch.nn.Module) -> None:
    """Average `module`'s floating buffers (BatchNorm statistics) over all ranks, in place."""
    average_over_ranks([b for b in module.buffers() if b.is_floating_point()])


def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over all ranks: one all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)  # SUM then divide: gloo (CPU) has no AVG
        flat.div_(dist.get_world_size())
        parts = flat.split([t.numel() for t in group])
        torch._foreach_copy_(group, [part.view_as(t) for part, t in zip(parts, group)])


# Rank 0 alone decodes the image caches and saves the checkpoints while the other ranks wait for it. A large data
# set's decode outlasts the process group's default timeout (NCCL 10 min, gloo 30 min), which killed such runs at
# every --resume. Those waits use a gloo group of their own with this timeout instead: a rank 0 that hangs meanwhile
# is stopped by its own watchdog (train.watchdog_s), and torchrun then ends the others.
RANK0_WAIT_TIMEOUT = datetime.timedelta(days=7)


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
    rank0_wait_group()  # now, while every rank is here
    return dist.get_rank(), dist.get_world_size()


def wait_for_rank0(watchdog=None) -> None:
    """Return once every rank got here: rank 0 comes last, after work only it does (decoding, saving checkpoints),
    however long that takes. On the other ranks `watchdog` (a trainutil.Watchdog) is paused meanwhile: rank 0's
    own watches that work, and a slow but progressing save must not read as a hang here."""
    group = rank0_wait_group()
    if watchdog is None or dist.get_rank() == 0:
        dist.barrier(group=group)
        return
    with watchdog.paused():
        dist.barrier(group=group)


def rank0_wait_group():
    """The gloo group, with RANK0_WAIT_TIMEOUT, that `wait_for_rank0` waits in; made once per process group (a
    collective: every rank calls this at the same point)."""
    return _wait_group(dist.group.WORLD)


@functools.lru_cache(maxsize=1)  # one process group at a time; a new one (tests) gets its own wait group
def _wait_group(world):
    return dist.new_group(backend="gloo", timeout=RANK0_WAIT_TIMEOUT)


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array over all ranks (rank order), for validation metrics on the whole split."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered]) for i in range(len(arrays)))


def use_compile(cfg, device) -> bool:
    """Whether to torch.compile the model: train.compile "on", or "auto" on CUDA."""
    mode = cfg.train.compile
    if mode not in COMPILE_SWITCH:
        raise BonefracError(one_of_error("train.compile", mode, COMPILE_SWITCH))
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def grad_sync_mode(cfg, compiled: bool) -> str:
    """How ranks share gradients: DDP overlaps communication with an eager backward; a compiled backward
    (and CUDA graphs) is served better by one all-reduce after it (GradAllReduce)."""
    mode = cfg.train.grad_sync
    if mode not in GRAD_SYNC:
        raise BonefracError(one_of_error("train.grad_sync", mode, GRAD_SYNC))
    return ("allreduce" if compiled else "ddp") if mode == "auto" else mode


def parallelize(net, cfg: Config, device: torch.device, world: int):
    """(step_model, grad_sync): `net` compiled when train.compile says so and, across ranks, either wrapped in DDP
    or paired with a GradAllReduce (per train.grad_sync; grad_sync is None otherwise)."""
    step_model, grad_sync = net, None
    compiled = use_compile(cfg, device)
    sync_mode = grad_sync_mode(cfg, compiled)  # checked on one process too, like train.compile
    if compiled:
        step_model = torch.compile(net, mode=cfg.train.compile_mode)
    if world > 1 and sync_mode == "ddp":
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index]
                                                               if device.type == "cuda" else None)
    elif world > 1:
        grad_sync = GradAllReduce(net)
    return step_model, grad_sync

