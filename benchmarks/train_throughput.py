"""Training throughput: bonefrac's pipeline against the seed-style loop, same GPU, same run.

    python benchmarks/train_throughput.py --images DIR [--archs tf_efficientnetv2_s,convnextv2_base] \
        [--size 224] [--batch 256] [--steps 60] [--json OUT.json]
    torchrun --nproc_per_node=2 benchmarks/train_throughput.py --images DIR --seed-steps 0 ...   # multi-GPU

Under torchrun every rank runs bonefrac's step on its own GPU and shard, with the batch per GPU; images/s counts
all ranks. Gradients are averaged over NCCL by `bonefrac.distributed.GradAllReduce`, one all-reduce after the
backward (--grad-sync allreduce, the default; what `bonefrac train` picks for a compiled model), or by
DistributedDataParallel around the compiled model (--grad-sync ddp; allreduce,ddp for a same-run comparison).
Compare with a one-process run of the same flags for the scaling.

Seed-style: PIL decoding + torchvision transforms in 12 DataLoader workers, fp32 at PyTorch's default precision
(TF32 off for matmuls, allowed for cuDNN convolutions, as a stock script runs), batch 32, Adam.
bonefrac: the decoded uint8 cache on the GPU, batched GPU augmentation, bf16 autocast, channels_last,
fused AdamW, torch.compile (exactly `bonefrac.train.train_step`), with TF32 allowed for the float32 work outside
autocast (`bonefrac train` leaves PyTorch's default). Reports images/s, the ratio, and achieved TFLOP/s (3x the
forward FLOPs counted by torch.utils.flop_counter) as a fraction of a bf16 8192^3 matmul timed in the run.
Models are randomly initialised: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bonefrac.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from bonefrac.cache import build_cache
from bonefrac.data import Batches
from bonefrac.io import IMAGE_EXTENSIONS
from bonefrac.models import create, use_flipped_dgrad
from bonefrac.train import train_step
from bonefrac.distributed import GradAllReduce, distributed_setup
from bonefrac.trainutil import make_optimizer, make_scheduler

log = logging.getLogger("bench")


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def train_flops_per_image(arch: str, size: int) -> float:
    """3x the forward FLOPs (backward = 2x forward). torch.utils.flop_counter counts the forward exactly, but
    (torch 2.11-2.14) counts depthwise-convolution backward as dense, overstating EfficientNets ~4.7x."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create(arch, 2).cuda().eval()
    x = torch.randn(4, 3, size, size, device="cuda")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops() / 4


def images_per_s(epoch, step, warm: int, steps: int, batch: int, sync=None):
    """Run `step(x, y)` over `epoch()` passes until `warm` + `steps` steps are done; images/s of the last `steps`
    (timed between device synchronisations) and the last batch."""
    sync = sync or torch.cuda.synchronize
    done, t0 = 0, None
    while True:
        for x, y in epoch():
            step(x, y)
            done += 1
            if done == warm:
                sync()
                t0 = time.perf_counter()
            if done >= warm + steps:
                sync()
                return steps * batch / (time.perf_counter() - t0), (x, y)


@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on or off inside the block, the previous settings after: the
    flags are process-wide, so set once for bonefrac's pipeline they also made the seed-style baseline use TF32
    matmuls, which a stock PyTorch script does not."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def seed_style(arch: str, files: list[Path], size: int, steps: int, batch: int = 32, workers: int = 12) -> float:
    """The reference loop: PIL + torchvision transforms in workers, fp32, Adam 1e-4."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((size, size)), T.RandomRotation(25), T.RandomHorizontalFlip(),
                    T.ColorJitter(0.2, 0.2), T.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10),
                    T.RandomApply([T.GaussianBlur(3)], p=0.1), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(files[i]).convert("RGB")), 0

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=True)
    model = create(arch, 3).cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    ips, _ = images_per_s(lambda: iter(loader), step, warm=5, steps=steps, batch=batch)
    return ips


def bonefrac_pipeline(arch: str, cache: np.ndarray, size: int, batch: int, steps: int, mode: str,
                      profile_to: str | None = None, rank: int = 0, world: int = 1, sync: str = "allreduce",
                      flip_dgrad: bool = False) -> float:
    """images/s of `bonefrac.train.train_step` (all ranks together under torchrun; `batch` is per GPU);
    `flip_dgrad` as `train.flip_depthwise_grad`."""
    cfg = Config(model=ModelConfig(arch=arch, pretrained="none"), data=DataConfig(size=size, batch_size=batch),
                 optim=OptimConfig(), train=TrainConfig(compile="on", compile_mode=mode))
    device = torch.device("cuda", torch.cuda.current_device())
    labels = np.arange(len(cache)) % 3
    batches = Batches(cache, labels, batch, device, "shuffle", 16.0, rank, world)
    model = create(arch, 3).to(device).to(memory_format=torch.channels_last).train()
    if flip_dgrad:
        use_flipped_dgrad(model)
    step_model = torch.compile(model, mode=mode)
    grad_sync = None
    if world > 1 and sync == "ddp":  # the same wrapping order as bonefrac.train: DDP around the compiled module
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index])
    elif world > 1:
        grad_sync = GradAllReduce(model)
    opt = make_optimizer(model, cfg.optim, batch * world, device)
    sched = make_scheduler(opt, replace(cfg.optim, schedule="constant"), 1000, 1)
    prep = {"mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3}
    gen = torch.Generator().manual_seed(0)
    step = lambda x, y: train_step(step_model, model, x, y, gen, opt, sched, cfg, prep,  # noqa: E731
                                   grad_sync=grad_sync)
    ips, (x, y) = images_per_s(lambda: batches.epoch(gen), step,
                               warm=8, steps=steps, batch=batch * world, sync=_sync_all if world > 1 else None)
    if profile_to:  # every rank steps (the all-reduce needs them all); rank 0 writes
        _profile(lambda: step(x, y), profile_to if rank == 0 else None)
    return ips


def _sync_all() -> None:
    torch.cuda.synchronize()
    torch.distributed.barrier()


def _profile(step, path: str | None, n: int = 5) -> None:
    """Top CUDA kernels over a few steps, to say where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    # CUDA activity only: the table lists kernels (not the CPU-side ops that launch them), so its rows add up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    if path is None:
        return
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    Path(path).write_text(table)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", required=True)
    p.add_argument("--archs", default="tf_efficientnetv2_s,convnextv2_base,tf_efficientnet_lite2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", default="256")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed-steps", type=int, default=40)
    p.add_argument("--modes", default="default", help="torch.compile modes to try, comma-separated")
    p.add_argument("--grad-sync", default="allreduce", help="under torchrun: ddp and/or allreduce, comma-separated")
    p.add_argument("--depthwise-grad", default="cudnn",
                   help="cudnn and/or flipped (train.flip_depthwise_grad), comma-separated: both = same-run A/B")
    p.add_argument("--profile-dir", help="write a kernel profile per run here")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU (none found)")
    rank, world = distributed_setup()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.backends.cudnn.benchmark = True
    files = sorted(f for f in Path(args.images).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    cache_dir = "/tmp/bench_cache"
    if rank == 0:  # one process decodes, the others map the finished file
        build_cache([str(f) for f in files], [""] * len(files), int(args.size * 1.15), cache_dir)
    if world > 1:
        torch.distributed.barrier()
    cache = build_cache([str(f) for f in files], [""] * len(files), int(args.size * 1.15), cache_dir,
                        progress=False)
    peak = matmul_tflops()
    rows = []
    for arch in args.archs.split(","):
        flops = train_flops_per_image(arch, args.size)
        with tf32(matmul=False, cudnn=True):  # PyTorch's defaults: what the seed's own fp32 script ran with
            seed = seed_style(arch, files, args.size, args.seed_steps) if args.seed_steps > 0 else float("nan")
        syncs = args.grad_sync.split(",") if world > 1 else ["none"]
        for batch, mode, sync, dw in [(int(b), m, g, d) for b in args.batch.split(",") for m in args.modes.split(",")
                                      for g in syncs for d in args.depthwise_grad.split(",")]:
            prof = f"{args.profile_dir}/profile_{arch}_{batch}_{mode}_{dw}.txt" if args.profile_dir else None
            with tf32(matmul=True, cudnn=True):
                ours = bonefrac_pipeline(arch, cache, args.size, batch, args.steps, mode, prof, rank, world, sync,
                                         flip_dgrad=dw == "flipped")
            tflops = ours * flops / 1e12 / world
            row = {"arch": arch, "size": args.size, "gpus": world, "grad_sync": sync, "batch_per_gpu": batch,
                   "compile_mode": mode, "depthwise_grad": dw,
                   "seed_style_img_s": round(seed, 1),
                   "bonefrac_img_s": round(ours, 1), "ratio": round(ours / seed, 2),
                   "train_gflop_per_img": round(flops / 1e9, 2), "achieved_tflops_per_gpu": round(tflops, 1),
                   "matmul_bf16_tflops": round(peak, 1), "fraction_of_matmul": round(tflops / peak, 3)}
            log.info("%s", row)
            rows.append(row)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    out = {"device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
