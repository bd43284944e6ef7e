"""GPU inference throughput at batch 256: eager fp32 (baseline) against bf16 + channels_last + torch.compile,
same run, same GPU; plus ONNX Runtime's CUDA/TensorRT providers when the installed onnxruntime has them.

    python benchmarks/infer_throughput.py [--archs tf_efficientnetv2_s,convnextv2_base] [--size 224] [--json F]
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


def timed(fn, x, reps: int) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    torch.cuda.synchronize()
    return reps * x.shape[0] / (time.perf_counter() - t)


def bench_arch(arch: str, size: int, batch: int, reps: int) -> dict:
    model = create(arch, 3).cuda().eval()
    x = torch.rand(batch, 3, size, size, device="cuda")
    with torch.no_grad():
        eager = timed(model, x, reps // 2)
        model_cl = model.to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        row = {"arch": arch, "size": size, "batch": batch, "eager_fp32_img_s": round(eager, 1)}
        for mode in ("default", "reduce-overhead"):
            compiled = torch.compile(model_cl, mode=mode)

            def run(inp, compiled=compiled):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return compiled(inp)

            ips = timed(run, xcl, reps)
            row[f"compile_{mode}_bf16_img_s"] = round(ips, 1)
            row[f"ratio_{mode}"] = round(ips / eager, 2)
            log.info("%s", row)
        row["bf16_frozen_img_s"] = round(frozen_bf16(model_cl, xcl, reps), 1)
        row["ratio_bf16_frozen"] = round(row["bf16_frozen_img_s"] / eager, 2)
        log.info("%s", row)
    row.update(onnxruntime_providers(model, size))
    return row


def frozen_bf16(model, x, reps: int) -> float:
    """bf16 weights (no autocast casts), inductor freezing (folds BatchNorm into convolutions, constant-folds
    weights), CUDA graphs: the deployment configuration."""
    import copy

    import torch._inductor.config as inductor_config

    m = copy.deepcopy(model).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with inductor_config.patch(freezing=True):
        compiled = torch.compile(m, mode="reduce-overhead")
        return timed(compiled, xb, reps)


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
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cudnn.benchmark = True
    rows = [bench_arch(a, args.size, args.batch, args.reps) for a in args.archs.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
