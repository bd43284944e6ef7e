"""Parts of the training loop that are not the story itself: optimizer, schedule and box-supervision loss, weight
EMA, the hang watchdog, the distributed-run plumbing (decoding the caches once, compile and gradient sync), and the
run directory's bookkeeping (refusing to overwrite a run, checking a resume's configuration, metrics.csv).
train.py reads top to bottom without them."""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint
from .config import COMPILE_SWITCH, GRAD_SYNC, OPTIMIZERS, SCHEDULES, Config, one_of_error, to_dict
from .data import build_cache
from .errors import BonefracError
from .manifest import class_names_for, load_manifest

log = logging.getLogger(__name__)

# Config keys that may differ on --resume: they change how long or where the run goes, not what it trains.
RESUME_MAY_CHANGE = frozenset({"train.epochs", "train.patience", "train.watchdog_s", "train.device",
                               "data.decode_workers", "data.cache_dir", "data.device_cache_gib"})
# What a run leaves in its out dir (with checkpoint.SIBLINGS): any of them means "this folder holds a run".
RUN_FILES = ("last", "best", "metrics.csv", "config.json")


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
            if time.monotonic() - self.last > self.timeout_s:
                log.error("watchdog: no progress (training step, validation batch or checkpoint save) in %.0f s; "
                          "stopping (continue with --resume)", self.timeout_s)
                self.fired.set()
                try:
                    if self.on_timeout is not None:  # None: stopped meanwhile
                        self.on_timeout()
                finally:
                    if self.exit_process:
                        os._exit(self.EXIT_CODE)
                return


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


def decode_caches(manifest, cfg: Config, splits: dict, rank: int, world: int) -> dict:
    """{split: uint8 image cache} for `splits` = {split: (manifest rows, image size)}."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(manifest).parent / "cache"
    caches = {}
    for name, (rows, size) in splits.items():
        if rank == 0:  # one process decodes; the others wait and then map the finished files
            caches[name] = build_cache(rows.path.tolist(), rows.sha256.tolist(), size, cache_dir,
                                       cfg.data.decode_workers)
        if world > 1:
            dist.barrier()
        if rank != 0:
            caches[name] = build_cache(rows.path.tolist(), rows.sha256.tolist(), size, cache_dir, progress=False)
    return caches


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
    if found:
        raise BonefracError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue it "
                            f"or choose another --out")


def check_resume_config(last_dir: Path, cfg: Config, manifest=None) -> None:
    """Refuse a --resume whose configuration differs from the run's, except in RESUME_MAY_CHANGE, and, given the
    `manifest` it would resume on, one whose class names (in index order) differ from the run's."""
    meta = checkpoint.read_meta(last_dir)
    if manifest is not None:
        check_resume_classes(last_dir, meta.get("class_names"), manifest)
    saved = _flatten(meta.get("config") or {})
    now = _flatten(to_dict(cfg))
    # A key absent from the saved config was added by newer code; its default cannot contradict the run.
    changed = [k for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if changed:
        diff = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise BonefracError(f"--resume with a changed configuration ({diff}); resume with the run's settings "
                            f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change) or start a new --out")


def check_resume_classes(last_dir: Path, saved, manifest) -> None:
    """Refuse to resume a run trained with class names `saved` on `manifest` when its class order (from its
    prepare_report.json) differs. The manifest's bytes, and so its hash, stay the same when only the class order
    changed (labels are written as names), yet every class index would then mean another class."""
    now = class_names_for(manifest, load_manifest(manifest))
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


def check_val_classes(monitor: str, class_names, y_va) -> None:
    """AUROC is undefined (nan) when val lacks a class: refuse before training rather than never save `best`."""
    missing = [c for i, c in enumerate(class_names) if not (y_va == i).any()]
    if monitor == "auroc" and missing:
        raise BonefracError(f"the val split has no images of class {', '.join(map(repr, missing))}, so the "
                            f"train.monitor AUROC is undefined; re-split the data or set another train.monitor")
    if missing:
        log.warning("the val split has no images of class %s: per-class metrics, thresholds and (with fewer than "
                    "two classes) the calibration cannot be fitted for it; re-split the data if you can",
                    ", ".join(map(repr, missing)))


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
