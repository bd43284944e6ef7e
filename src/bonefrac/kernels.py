"""Fused GPU inference kernels for ConvNeXt V2's MLP with Global Response Norm (GRN).

`fuse_grn_blocks(model)` makes every eligible ConvNeXt V2 block of a timm model run its MLP as two Triton
kernels in fp16/bf16 inference on CUDA; anything else (training, float32, CPU, other layouts) runs timm's own
forward unchanged, so calling it is always safe. Weights, state_dict keys and outputs stay the model's own.

Why: GRN scales each image's hidden channels by their spatial L2 norm, so stock PyTorch and inductor write the
4x-wide hidden activation, read it back for the norm, read and write it again to scale it, and read it once more
in the second matmul: five passes over the block's largest tensor (20 % of ConvNeXt V2 Base's inference time on
an H100, benchmarks/RESULTS.md). Here the first matmul's epilogue applies GELU, stores the activation once and
accumulates each image's per-channel sum of squares; a tiny step turns those into GRN's per-image scale; the
second matmul scales its input tiles as it loads them (prologue) and adds the bias and the block's residual in its
epilogue: two passes. GRN's bias is folded into the second matmul's bias (fc2(h*s + b) = (h*s) W^T + (W b + c)).

Numerics: the matmuls accumulate in float32 like cuBLAS; the norm is computed in float32 from the rounded
activation; the per-image sums use atomic adds, so the last bits of a result can differ between runs.
"""

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """True when Triton imports (it ships with CUDA builds of torch) and torch can wrap its kernels (>= 2.6)."""
    return triton is not None and hasattr(torch.library, "triton_op")


try:  # Triton ships with CUDA builds of torch; without it nothing here is used (fuse_grn_blocks does nothing)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only torch builds, or a broken Triton install: kernels unavailable
    triton = None

if triton is not None:

    @triton.jit
    def tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        # Grouped tile order: neighbouring programs share weight tiles in L2.
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m

    @triton.jit
    def fc1_gelu_sumsq(x_ptr, w_ptr, b_ptr, h_ptr, ss_ptr, M, N, K, HW, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, SLOTS: tl.constexpr = 0):
        """h = GELU(x @ w.T + b) for rows of all images; ss[image, n] += sum over the tile's rows of h**2. SLOTS > 0:
        a tile spans at most SLOTS images, whose row sums come from one small (SLOTS x BM) one-hot matmul; 0: one
        masked reduction per image."""
        pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        row = rm.to(tl.int64)  # M x N passes 2**31 elements in large batches (stage 1 at 512 px: batch 257)
        a_ptrs = x_ptr + row[:, None] * K + rk[None, :]
        b_ptrs = w_ptr + rn[None, :] * K + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            if EVEN_K:  # no K masks: the loads stay plain, vectorised copies
                a = tl.load(a_ptrs, mask=rm[:, None] < M, other=0.0)
                b = tl.load(b_ptrs, mask=rn[None, :] < N, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k < K), other=0.0)
                b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (rk[:, None] + k < K), other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        h = (0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))).to(h_ptr.dtype.element_ty)
        valid = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(h_ptr + row[:, None] * N + rn[None, :], h, mask=valid)
        hf = h.to(tl.float32)
        sq = tl.where(valid, hf * hf, 0.0)
        img = rm // HW
        first = (pid_m * BM) // HW
        last = (tl.minimum(pid_m * BM + BM, M) - 1) // HW
        if SLOTS > 0:  # tensor cores sum the rows: 0.45 against 0.53 ms for stage 3 of ConvNeXt V2 Base (H100)
            t = tl.arange(0, SLOTS)
            onehot = (t[:, None] == tl.where(rm < M, img - first, SLOTS)[None, :]).to(tl.float32)
            part = tl.dot(onehot, sq, input_precision="tf32")  # tf32 keeps 10 bits, as the half-precision h does
            tl.atomic_add(ss_ptr + (first + t[:, None]) * N + rn[None, :], part,
                          mask=(t[:, None] <= last - first) & (rn[None, :] < N))
        else:
            for j in range(first, last + 1):  # a tile may hold the end of one image and the start of the next
                part = tl.sum(tl.where((img == j)[:, None], sq, 0.0), axis=0)
                tl.atomic_add(ss_ptr + j * N + rn, part, mask=rn < N)

    @triton.jit
    def fc2_scaled_residual(h_ptr, s_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, N, K, HW, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                            IMGS: tl.constexpr = 0):
        """o = (h * s[image]) @ w.T + b + r: GRN's per-image channel scale applied to each loaded tile. IMGS > 0:
        a tile spans at most IMGS images, whose scale rows are loaded as vectors; 0: one gathered scale per row."""
        pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        img = tl.where(rm < M, rm // HW, 0)
        row = rm.to(tl.int64)
        a_ptrs = h_ptr + row[:, None] * K + rk[None, :]
        s_ptrs = s_ptr + img[:, None] * K + rk[None, :]
        b_ptrs = w_ptr + rn[None, :] * K + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        first = (pid_m * BM) // HW
        for k in range(0, K, BK):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=rm[:, None] < M, other=0.0)
                b = tl.load(b_ptrs, mask=rn[None, :] < N, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k < K), other=0.0)
                b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (rk[:, None] + k < K), other=0.0)
            if IMGS > 0:  # a few K-vectors instead of a (BM, BK) float32 gather: a quarter of the A tile's bytes
                s = tl.zeros((BM, BK), dtype=tl.float32)
                for t in tl.static_range(IMGS):
                    sv = tl.load(s_ptr + (first + t) * K + k + rk, mask=(first + t < M // HW) & (rk + k < K),
                                 other=0.0)
                    s = tl.where((img == first + t)[:, None], sv[None, :], s)
            elif EVEN_K:
                s = tl.load(s_ptrs)
            else:
                s = tl.load(s_ptrs, mask=rk[None, :] + k < K, other=0.0)
            a = (a.to(tl.float32) * s).to(w_ptr.dtype.element_ty)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            s_ptrs += BK
            b_ptrs += BK
        valid = (rm[:, None] < M) & (rn[None, :] < N)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(r_ptr + row[:, None] * N + rn[None, :], mask=valid, other=0.0).to(tl.float32)
        tl.store(o_ptr + row[:, None] * N + rn[None, :], acc.to(o_ptr.dtype.element_ty), mask=valid)


def _launch(M: int, N: int, K: int, tiles: dict | None = None) -> tuple[dict, tuple]:
    """Tile sizes for an (M x K) @ (K x N) product and its 1-D grid. 128 x 256 tiles were fastest for ConvNeXt V2
    Base's stages 2-4 on an H100 (benchmarks/RESULTS.md); no autotuning, because autotuning reruns the kernel and
    the atomic sums would count twice. `tiles` overrides BM/BN/BK/num_warps/num_stages (benchmarks)."""
    bn = 256 if N >= 256 else max(16, 1 << (N - 1).bit_length())
    bk = 64 if K >= 64 else max(16, 1 << (K - 1).bit_length())
    meta = {"BM": 128, "BN": bn, "BK": bk, "GROUP_M": 8, "num_warps": 8, "num_stages": 3, **(tiles or {})}
    meta["EVEN_K"] = K % meta["BK"] == 0
    return meta, (-(-M // meta["BM"]) * -(-N // meta["BN"]),)


def tile_images(bm: int, hw: int, most: int = 4) -> int:
    """The most images `bm` consecutive rows can touch at `hw` rows per image (fc2's IMGS), or 0 past `most`."""
    n = -(-(bm - 1) // hw) + 1
    return n if n <= most else 0


def fold_grn_bias(w2: torch.Tensor, b2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """fc2's bias with GRN's bias folded through fc2 (fc2(h*s + beta) = (h*s) @ w2.T + (w2 @ beta + b2)), in
    float32 also under autocast: what `grn_mlp_residual` takes as `bias`."""
    with torch.autocast(w2.device.type, enabled=False):
        return b2.float() + w2.float() @ beta.float()


def gelu_sumsq(x, w1, b1, hw: int, tiles: dict | None = None, kernel=None):
    """The first kernel: h = GELU(x @ w1.T + b1) (x's dtype) and each image's per-channel sum of h**2 (float32,
    images x hidden). `kernel`: the launchable to use (wrap_triton's when traced)."""
    M, C = x.shape
    hidden = w1.shape[0]
    h = torch.empty((M, hidden), device=x.device, dtype=x.dtype)
    ss = torch.zeros((M // hw, hidden), device=x.device, dtype=torch.float32)
    meta, grid = _launch(M, hidden, C, tiles)
    slots = 16 if tile_images(meta["BM"], hw, most=16) else 0  # tl.dot needs 16+ rows
    (kernel or fc1_gelu_sumsq)[grid](x, w1, b1, h, ss, M, hidden, C, hw, SLOTS=slots, **meta)
    return h, ss


def grn_scale(ss: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """GRN's per-image, per-channel factor 1 + gamma * N(h) from `gelu_sumsq`'s sums of squares (float32)."""
    g = ss.sqrt()
    return (1.0 + gamma.float() * (g / (g.mean(dim=-1, keepdim=True) + eps))).contiguous()


def scaled_residual(h, scale, w2, bias, residual, hw: int, tiles: dict | None = None, kernel=None,
                    gather: bool = False):
    """The second kernel: (h * scale[image]) @ w2.T + bias + residual. `gather`: one scale load per row (the
    general path, for benchmarks) instead of the tile's few per-image vectors."""
    M, hidden = h.shape
    out = torch.empty((M, w2.shape[0]), device=h.device, dtype=h.dtype)
    meta, grid = _launch(M, w2.shape[0], hidden, tiles)
    imgs = 0 if gather else tile_images(meta["BM"], hw)
    (kernel or fc2_scaled_residual)[grid](h, scale, w2, bias, residual, out, M, w2.shape[0], hidden, hw, IMGS=imgs,
                                          **meta)
    return out


def grn_mlp_residual(x, w1, b1, w2, bias, gamma, residual, hw: int, eps: float, traced: bool = False,
                     tiles: dict | None = None):
    """The fused block tail: fc2(GRN(GELU(fc1(x)))) + residual, for x and residual of shape (M, C) whose rows are
    images' pixels in order (M = images * hw); `bias` is `fold_grn_bias(w2, fc2 bias, GRN bias)`. Runs the Triton
    kernels (CUDA, or CPU under TRITON_INTERPRET=1); `traced` when torch.compile traces the call (the custom op
    below), else the kernels are launched directly (wrap_triton's own bookkeeping cost ~0.25 ms a launch in eager
    mode on an H100). `tiles` overrides the tile shape (benchmarks)."""
    fc1, fc2 = fc1_gelu_sumsq, fc2_scaled_residual
    if traced:
        from torch.library import wrap_triton

        fc1, fc2 = wrap_triton(fc1), wrap_triton(fc2)
    h, ss = gelu_sumsq(x, w1, b1, hw, tiles, fc1)
    return scaled_residual(h, grn_scale(ss, gamma, eps), w2, bias, residual, hw, tiles, fc2)


@functools.cache
def _op():
    """`grn_mlp_residual` registered as a custom op, so torch.compile sees the Triton kernels, not a graph break."""

    @torch.library.triton_op("bonefrac::grn_mlp_residual", mutates_args=())
    def op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor,
           gamma: torch.Tensor, residual: torch.Tensor, hw: int, eps: float) -> torch.Tensor:
        return grn_mlp_residual(x, w1, b1, w2, bias, gamma, residual, hw, eps, traced=True)

    return op


def _kernel_dtype(block, x: torch.Tensor):
    """The half dtype the fused kernels would run this block in, or None when timm's forward must run instead."""
    if block.training or (torch.is_grad_enabled() and (x.requires_grad or block.mlp.fc1.weight.requires_grad)):
        return None  # no backward for the fused kernels
    if x.shape[0] < block.__dict__.get("_bonefrac_min_images", 1) or block.__dict__.get("_bonefrac_failed"):
        return None
    if x.shape[-2] * x.shape[-1] < block.__dict__.get("_bonefrac_min_pixels", 0):
        return None
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return None
    if x.dtype in _HALF:
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None  # float32 stays timm's exact float32 forward


def _eligible(block) -> bool:
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.mlp import GlobalResponseNormMlp

    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, GlobalResponseNormMlp):
        return False
    exact_gelu = type(mlp.act) is TimmGELU or (type(mlp.act) is torch.nn.GELU and mlp.act.approximate == "none")
    return exact_gelu and mlp.fc1.bias is not None and mlp.fc2.bias is not None


def _cache_key(dt: torch.dtype, params) -> tuple | None:
    """What identifies the current values of `params`: storage and in-place version counter of each (None when a
    parameter has no version counter, e.g. one made under torch.inference_mode: then nothing is cached)."""
    try:
        return dt, tuple(None if p is None else (p.data_ptr(), p._version) for p in params)
    except RuntimeError:
        return None


@functools.cache
def _fused_block_class():
    from timm.models.convnext import ConvNeXtBlock

    class FusedGrnConvNeXtBlock(ConvNeXtBlock):
        """A ConvNeXt V2 block whose MLP, GRN and residual add run as the fused kernels when it can."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dt = _kernel_dtype(self, x)
            if dt is None:
                return super().forward(x)
            shortcut = self.shortcut(x)
            y = self.conv_dw(x)  # 1x1-convolution MLPs (the small V2 models) normalise before the permute
            y = self.norm(y).permute(0, 2, 3, 1) if self.use_conv_mlp else self.norm(y.permute(0, 2, 3, 1))
            b, h, w, c = y.shape
            w1, b1, w2, bias = self._operands(dt)
            residual = shortcut.permute(0, 2, 3, 1).reshape(b * h * w, -1).contiguous()
            args = (y.reshape(-1, c).to(dt).contiguous(), w1, b1, w2, bias, self.mlp.grn.weight, residual, h * w,
                    self.mlp.grn.eps)
            if torch.compiler.is_compiling():  # the custom op: compiled graphs hold the kernels, no graph break
                out = torch.ops.bonefrac.grn_mlp_residual(*args)
            else:
                try:
                    out = grn_mlp_residual(*args)
                except Exception as exc:  # noqa: BLE001 - e.g. tiles needing more shared memory than this GPU has
                    log.warning("fused GRN kernels failed on this GPU (%s: %s); this block runs timm's forward from "
                                "now on", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    self.__dict__["_bonefrac_failed"] = True
                    return super().forward(x)
            return out.view(b, h, w, -1).permute(0, 3, 1, 2)

        def _operands(self, dt: torch.dtype) -> tuple:
            """fc1's weight and bias and fc2's weight in `dt` (layer scale folded into fc2) and the folded float32
            bias. Kept between eager calls, rebuilt when a parameter changes (in place or replaced): casting and
            folding every call would move more bytes than the activations at small batches. Compiled graphs
            compute them in the graph (frozen graphs fold them into constants)."""
            mlp = self.mlp
            params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.grn.bias, self.gamma)
            compiling = torch.compiler.is_compiling()
            key = None if compiling else _cache_key(dt, params)
            if key is not None:
                cached = self.__dict__.get("_bonefrac_operands")
                if cached is not None and cached[0] == key:
                    return cached[1]
            w2, b2 = mlp.fc2.weight.flatten(1), mlp.fc2.bias
            if self.gamma is not None:  # layer scale (ConvNeXt V1-style blocks with GRN)
                w2, b2 = w2 * self.gamma[:, None], b2 * self.gamma
            operands = (mlp.fc1.weight.flatten(1).to(dt).contiguous(), mlp.fc1.bias.to(dt), w2.to(dt).contiguous(),
                        fold_grn_bias(w2, b2, mlp.grn.bias))
            if key is not None:
                self.__dict__["_bonefrac_operands"] = (key, operands)
            return operands

    # Found by pickle (a fused model pickled whole, e.g. handed to another process) through __getattr__ below.
    FusedGrnConvNeXtBlock.__module__, FusedGrnConvNeXtBlock.__qualname__ = __name__, "FusedGrnConvNeXtBlock"
    return FusedGrnConvNeXtBlock


def __getattr__(name: str):
    if name == "FusedGrnConvNeXtBlock":  # built on first use: importing this module must not import timm
        return _fused_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse_grn_blocks(model: torch.nn.Module, min_images: int = 1, min_pixels: int = 0) -> int:
    """Switch every eligible ConvNeXt V2 block of `model` (in place) to the fused inference kernels; returns how
    many. The blocks keep their parameters and state_dict keys; they fall back to timm's forward whenever the
    kernels do not apply (see the module docstring), for batches of fewer than `min_images` images or feature
    maps of fewer than `min_pixels` pixels per image, and for good once a launch fails (a warning says why)."""
    from timm.models.convnext import ConvNeXtBlock

    if not triton_available():
        return 0
    _op()  # registered here, eagerly: torch.compile traces the forward, which only looks the op up
    fused = _fused_block_class()
    n = 0
    for module in model.modules():
        if type(module) is ConvNeXtBlock and _eligible(module):
            module.__class__ = fused
            module.__dict__["_bonefrac_min_images"] = int(min_images)
            module.__dict__["_bonefrac_min_pixels"] = int(min_pixels)
            n += 1
    return n


# Below this many images per batch the fused blocks run timm's forward: on an H100 (benchmarks/RESULTS.md) the
# kernels lost 22 % at batch 8 (launch-bound) and won 23 % at 16, 59 % at 32 and 80 % at 256 in predict's bf16 path.
FUSED_MIN_IMAGES = 16


def fuse_for_inference(model: torch.nn.Module) -> int:
    """What `Predictor` calls for a model on CUDA unless $BONEFRAC_FUSED_KERNELS turns it off
    (`predict.fused_kernels_wanted`): `fuse_grn_blocks` for batches of FUSED_MIN_IMAGES or more, logged, or a
    warning when Triton cannot run. Returns the number of blocks fused."""
    if not triton_available():
        log.warning("fused GRN kernels need Triton (and torch >= 2.6), which are missing: timm's forward runs")
        return 0
    n = fuse_grn_blocks(model, min_images=FUSED_MIN_IMAGES)
    if n:
        log.info("%d ConvNeXt V2 blocks run fused GRN kernels for batches of %d+ images (BONEFRAC_FUSED_KERNELS=0 "
                 "turns them off)", n, FUSED_MIN_IMAGES)
    return n
