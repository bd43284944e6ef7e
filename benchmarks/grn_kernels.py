"""Per-stage timing of bonefrac's fused ConvNeXt V2 MLP/GRN kernels (bonefrac.kernels) on a GPU, for several tile
shapes, against the same block tail in stock PyTorch ops compiled by torch.compile, and cuBLAS's two matmuls alone.

    python benchmarks/grn_kernels.py [--batch 256] [--stages 1,2,3,4]

Shapes are ConvNeXt V2 Base's four stages at 224 px (pixels per image x channels, blocks per stage); inputs are
random fp16. Prints one JSON line per stage (per tile shape: milliseconds per call, max |difference| from
the stock result, milliseconds of the first and of the second kernel alone) and the totals over the model's 36
blocks timed (all 36 unless --stages leaves some out). Results: benchmarks/RESULTS.md.
"""

import argparse
import json

import torch
import torch.nn.functional as F

STAGES = ((3136, 128, 3), (784, 256, 3), (196, 512, 27), (49, 1024, 3))
TILES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
         (128, 256, 32, 8, 5))  # BM, BN, BK, warps, pipeline stages


def stock(x, w1, b1, w2, b2, gamma, beta, res, hw, batch):
    """The block tail as timm computes it (fc1, GELU, GRN, fc2) plus the residual add."""
    h = F.gelu(F.linear(x, w1, b1)).view(batch, hw, -1)
    g = h.float().norm(dim=1, keepdim=True)
    nx = g / (g.mean(-1, keepdim=True) + 1e-6)
    h = (h + beta + gamma * (h * nx.to(h.dtype))).view(batch * hw, -1)
    return F.linear(h, w2, b2) + res


def fused(args, tiles, only: str = "", gather: bool = False):
    """bonefrac.kernels' two kernels launched with the given tile shape (`only` "fc1" or "fc2": that kernel alone,
    to see which of the two is slow; `gather`: the second kernel loads one scale per row, the general path)."""
    from bonefrac import kernels

    x, w1, b1, w2, b2, gamma, beta, res, hw, _ = args
    meta = dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), tiles))
    if only == "fc1":
        return kernels.gelu_sumsq(x, w1, b1, hw, meta)[0]
    if only == "fc2":  # the first kernel's outputs are made once per shape (see stage_row)
        h, scale = args[-1]
    else:
        h, ss = kernels.gelu_sumsq(x, w1, b1, hw, meta)
        scale = kernels.grn_scale(ss, gamma, 1e-6)
    return kernels.scaled_residual(h, scale, w2, kernels.fold_grn_bias(w2, b2, beta), res, hw, meta, gather=gather)


def stage_row(hw: int, c: int, blocks: int, batch: int, compiled_stock) -> dict:
    from triton.testing import do_bench

    from bonefrac import kernels

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.float16) * scale

    m = batch * hw
    args = (rand(m, c), rand(4 * c, c, scale=c ** -0.5), rand(4 * c, scale=0.1), rand(c, 4 * c, scale=(4 * c) ** -0.5),
            rand(c, scale=0.1), rand(4 * c, scale=0.3), rand(4 * c, scale=0.1), rand(m, c), hw, batch)
    want = compiled_stock(*args)
    hidden = F.linear(args[0], args[1], args[2])
    h, ss = kernels.gelu_sumsq(args[0], args[1], args[2], hw)
    args2 = args[:-1] + ((h, kernels.grn_scale(ss, args[5], 1e-6)),)  # fc2 alone reads these
    row = {"hw": hw, "C": c, "blocks": blocks, "stock_ms": round(do_bench(lambda: compiled_stock(*args)), 4),
           "cublas_fc1_ms": round(do_bench(lambda: F.linear(args[0], args[1], args[2])), 4),
           "cublas_fc2_ms": round(do_bench(lambda: F.linear(hidden, args[3], args[4])), 4)}
    for tiles in TILES:
        try:  # a tile shape can exceed the shared memory of a card ("out of resources")
            diff = (fused(args, tiles).float() - want.float()).abs().max().item()
            row[str(tiles)] = [round(do_bench(lambda: fused(args, tiles)), 4), round(diff, 4),
                               round(do_bench(lambda: fused(args, tiles, "fc1")), 4),
                               round(do_bench(lambda: fused(args2, tiles, "fc2")), 4)]
        except Exception as e:  # noqa: BLE001 - recorded, the other shapes still run
            row[str(tiles)] = [float("inf"), type(e).__name__]
    row["fc2_gather_ms_128x256"] = round(do_bench(lambda: fused(args2, TILES[1], "fc2", gather=True)), 4)
    x, w1, b1, w2, b2, gamma, beta, res = args[:8]
    bias = kernels.fold_grn_bias(w2, b2, beta)
    row["product_ms"] = round(do_bench(lambda: kernels.grn_mlp_residual(x, w1, b1, w2, bias, gamma, res, hw, 1e-6)), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--stages", default="1,2,3,4", help="which of the four stages to time, e.g. 4")
    args = p.parse_args()
    batch = args.batch
    picked = [i.strip() for i in args.stages.split(",")]
    if not all(i in ("1", "2", "3", "4") for i in picked):
        p.error(f"--stages takes numbers 1-4 separated by commas, not {args.stages!r}")
    chosen = [STAGES[int(i) - 1] for i in picked]
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU (none found)")
    torch.manual_seed(0)
    # dynamic=False: one compiled function meets four stage shapes, and after the second dynamo would compile a
    # dynamic-shape graph for all later ones, timing the stock baseline with kernels not specialised to the stage
    compiled_stock = torch.compile(stock, dynamic=False)
    rows = []
    for hw, c, blocks in chosen:
        rows.append(stage_row(hw, c, blocks, batch, compiled_stock))
        print(json.dumps(rows[-1]), flush=True)
    total = {k: round(sum(r[k] * r["blocks"] for r in rows), 2) for k in ("stock_ms", "product_ms")}
    total["best_tiles_ms"] = round(sum(min(r[str(t)][0] for t in TILES) * r["blocks"] for r in rows), 2)
    print(json.dumps({"device": torch.cuda.get_device_name(), "batch": batch, "stages": args.stages,
                      "blocks_timed": total}))


if __name__ == "__main__":
    main()
