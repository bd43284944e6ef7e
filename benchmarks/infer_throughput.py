"""GPU inference throughput at batch 256: eager fp32 (baseline) against bf16 + channels_last + torch.compile,
same run, same GPU; deployment variants (frozen low-precision weights, 1x1 convolutions as matmuls, autotuned
kernels); plus ONNX Runtime's CUDA/TensorRT providers when the installed onnxruntime has them.

    python benchmarks/infer_throughput.py [--archs tf_efficientnetv2_s,convnextv2_base] [--size 224]
        [--variants eager,default,reduce-overhead,frozen] [--profile-dir DIR] [--json F]

--profile-dir writes the top CUDA kernels of each compiled variant (torch.profiler over 5 batches) to
DIR/infer_ARCH_VARIANT.txt: where the time goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from bonefrac.models import create

log = logging.getLogger("bench")


def timed(fn, x, reps: int, profile_to: str | None = None) -> float:
    """images/s of `fn(x)` over `reps` calls after 3 warm-up calls; then, with `profile_to`, a kernel table there."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    torch.cuda.synchronize()
    ips = reps * x.shape[0] / (time.perf_counter() - t)
    if profile_to:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(x)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
        Path(profile_to).write_text(table)
    return ips


VARIANTS = ("eager", "amp", "amp-grn", "default", "reduce-overhead", "frozen")
# amp: eager bf16 autocast over float32 weights, not compiled: what `bonefrac predict` runs on CUDA (amp-grn: with
# bonefrac's fused ConvNeXt V2 kernels, see `grn` below).
# Options a "frozen" variant may add, joined with "-" (e.g. frozen-fp16-mm): fp16 instead of bf16 weights, 1x1
# convolutions as matmuls (they fuse with their BN/activation epilogues), max-autotune kernel selection (every
# convolution too: slow to compile), autotuned Triton matmul templates only (`gemm`: with `mm` they take the
# pointwise ops around them as prologues/epilogues), Triton matmul templates *only* (`tritonmm`: every matmul
# takes its neighbours' pointwise work, even where cuBLAS alone is faster; convolutions stay cuDNN, not autotuned),
# coordinate-descent tuning of the generated kernels (`cdt`), bonefrac's fused Triton kernels for ConvNeXt V2's
# MLP + GRN + residual (`grn`, bonefrac.kernels; other architectures are unchanged by it).
FROZEN_OPTIONS = ("fp16", "mm", "autotune", "gemm", "tritonmm", "cdt", "grn")


def bench_arch(arch: str, size: int, batch: int, reps: int, variants: list[str], profile_dir: str | None = None,
               grn_min_pixels: int = 0) -> dict:
    """img/s of each variant for one architecture; ratios are against eager fp32 measured in the same run."""
    model = create(arch, 3).cuda().eval()
    x = torch.rand(batch, 3, size, size, device="cuda")
    row = {"arch": arch, "size": size, "batch": batch}
    with torch.no_grad():
        # the same number of calls as every variant: a baseline timed over fewer calls is noisier (and reps // 2
        # was 0 calls, 0 img/s, for --reps 1)
        row["eager_fp32_img_s"] = eager = round(timed(model, x, reps), 1)
        model_cl = model.to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        for variant in [v for v in variants if v != "eager"]:
            try:
                prof = f"{profile_dir}/infer_{arch}_{variant}.txt" if profile_dir else None
                ips = run_variant(variant, model_cl, xcl, reps, prof, grn_min_pixels)
            except Exception as exc:  # one failing variant must not lose the others' numbers
                log.exception("%s %s failed", arch, variant)
                row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            row[f"{variant}_img_s"] = round(ips, 1)
            row[f"ratio_{variant}"] = ratio(ips, eager)
            log.info("%s", row)
    row.update(onnxruntime_providers(model, size))
    return row


def ratio(ips: float, baseline: float) -> float | None:
    """ips / baseline to 2 decimals; None when the baseline is 0 (rounded from a very slow run), so that one
    missing ratio does not lose the whole run's numbers to a ZeroDivisionError."""
    return round(ips / baseline, 2) if baseline > 0 else None


def run_variant(variant: str, model, x, reps: int, profile_to: str | None = None, grn_min_pixels: int = 0) -> float:
    if variant.startswith("amp"):
        import copy

        m = copy.deepcopy(model)
        if variant == "amp-grn":
            from bonefrac.kernels import fuse_grn_blocks

            fuse_grn_blocks(m, min_pixels=grn_min_pixels)

        def run(inp):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return m(inp)

        return timed(run, x, reps, profile_to)
    if variant in ("default", "reduce-overhead"):
        compiled = torch.compile(model, mode=variant)

        def run(inp):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(inp)

        return timed(run, x, reps, profile_to)
    options = set(variant.split("-")[1:])
    dtype = torch.float16 if "fp16" in options else torch.bfloat16
    mode = "max-autotune" if "autotune" in options else "reduce-overhead"
    return frozen(model, x, reps, dtype, inductor_patch(options), mode, profile_to,
                  fuse_grn=grn_min_pixels if "grn" in options else None)


def inductor_patch(options: set[str]) -> dict:
    """torch._inductor.config settings for a frozen variant's options."""
    patch = {"freezing": True, "conv_1x1_as_mm": "mm" in options}
    if "gemm" in options:
        patch.update(max_autotune_gemm=True, max_autotune_gemm_backends="TRITON,ATEN")
    if "tritonmm" in options:
        patch.update(max_autotune_gemm=True, max_autotune_gemm_backends="TRITON", max_autotune_conv_backends="ATEN")
    if "cdt" in options:
        patch["coordinate_descent_tuning"] = True
    return patch


def valid_variant(variant: str) -> bool:
    head, *options = variant.split("-") if variant.startswith("frozen") else (variant,)
    return head in VARIANTS and set(options) <= set(FROZEN_OPTIONS)


def frozen(model, x, reps: int, dtype, patch: dict, mode: str, profile_to: str | None = None,
           fuse_grn: int | None = None) -> float:
    """Low-precision weights (no autocast casts), inductor freezing (folds BatchNorm into convolutions,
    constant-folds weights), CUDA graphs: the deployment configuration. `fuse_grn`: bonefrac's fused blocks for
    maps of at least that many pixels per image (None: not fused)."""
    import copy

    import torch._inductor.config as inductor_config

    m = copy.deepcopy(model).to(dtype)
    if fuse_grn is not None:
        from bonefrac.kernels import fuse_grn_blocks

        log.info("fused GRN blocks: %d (maps of %d+ pixels)", fuse_grn_blocks(m, min_pixels=fuse_grn), fuse_grn)
    with inductor_config.patch(patch):
        compiled = torch.compile(m, mode=mode)
        return timed(compiled, x.to(dtype), reps, profile_to)


def onnxruntime_providers(model, size: int) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnxruntime": "not installed"}
    providers = ort.get_available_providers()
    return {"onnxruntime_providers": providers,
            "onnxruntime_gpu": "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="tf_efficientnetv2_s,convnextv2_base")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=40, help="timed calls per variant, eager fp32 included (>= 1)")
    p.add_argument("--variants", default="eager,default,reduce-overhead,frozen",
                   help=f"comma-separated, from {','.join(VARIANTS)}; frozen may add -{'/-'.join(FROZEN_OPTIONS)}")
    p.add_argument("--profile-dir", help="write each compiled variant's top CUDA kernels here")
    p.add_argument("--grn-min-pixels", type=int, default=0, help="-grn variants: fuse only blocks whose feature "
                   "maps have at least this many pixels per image (e.g. 100 leaves ConvNeXt's 7x7 last stage out)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.reps < 1:  # before the GPU check: a usage error is one whatever the machine
        p.error(f"--reps must be at least 1, got {args.reps}")
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU (none found)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cudnn.benchmark = True
    variants = args.variants.split(",")
    if unknown := [v for v in variants if not valid_variant(v)]:
        p.error(f"unknown variants {sorted(unknown)}")
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    rows = [bench_arch(a, args.size, args.batch, args.reps, variants, args.profile_dir, args.grn_min_pixels)
            for a in args.archs.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "grn_min_pixels": args.grn_min_pixels, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
