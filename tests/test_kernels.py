"""The fused ConvNeXt V2 MLP/GRN kernels (bonefrac.kernels): same outputs as timm's blocks, safe fallbacks.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined, hence
a subprocess); on a CUDA machine the compiled kernels are checked against timm too (skipped elsewhere)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

kernels = pytest.importorskip("bonefrac.kernels")
if not kernels.triton_available():
    pytest.skip("Triton is not installed", allow_module_level=True)

from timm.models.convnext import ConvNeXt, ConvNeXtBlock  # noqa: E402


def _interpreter_takes_int_arguments() -> bool:
    """False for Triton < 3.7 under NumPy >= 2.x: its interpreter passes int arguments as 1-element arrays and
    `range(0, K, BK)` calls int() on them, which that NumPy refuses (every launch fails; Triton 3.7 squeezes)."""
    import numpy as np
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return True
    try:
        int(np.array([1]))
    except TypeError:
        return False
    return True


needs_interpreter = pytest.mark.skipif(not _interpreter_takes_int_arguments(),
                                       reason="this Triton's interpreter cannot launch kernels under this NumPy")


def fell_back(model) -> int:
    """Blocks that gave up on the kernels after a failed launch (their output is timm's, so it matches anyway)."""
    return sum(bool(m.__dict__.get("_bonefrac_failed")) for m in model.modules())


def small_convnext(conv_mlp: bool, layer_scale=None, seed: int = 0):
    """A 4-stage ConvNeXt V2-style model with GRN weights far from their zero init (zero GRN is the identity)."""
    torch.manual_seed(seed)
    model = ConvNeXt(depths=(1, 2, 1, 1), dims=(32, 48, 64, 96), use_grn=True, ls_init_value=layer_scale,
                     conv_mlp=conv_mlp, num_classes=3).eval()
    for module in model.modules():
        if hasattr(module, "grn"):
            torch.nn.init.normal_(module.grn.weight, std=0.5)
            torch.nn.init.normal_(module.grn.bias, std=0.2)
    return model


INTERPRETED = r"""
import copy, json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_kernels import fell_back, small_convnext
from bonefrac import kernels
calls = []
real = kernels.grn_mlp_residual
kernels.grn_mlp_residual = lambda *a: calls.append(a[-2]) or real(*a)
out = {}
for name, conv_mlp, ls in (("linear", False, None), ("conv", True, None), ("layer_scale", False, 0.3)):
    model = small_convnext(conv_mlp, ls)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fused = kernels.fuse_grn_blocks(model)
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ref(x)
        del calls[:]
        got = model.half().to(memory_format=torch.channels_last)(x.half()).float()
        timm_half = ref.half()(x.half()).float()
    out[name] = {"fused": fused, "calls": list(calls), "same_keys": keys == list(model.state_dict()),
                 "fell_back": fell_back(model),
                 "err": (got - want).abs().max().item(), "timm_half_err": (timm_half - want).abs().max().item(),
                 "scale": want.abs().max().item()}
print(json.dumps(out))
"""


@needs_interpreter
def test_interpreted_kernels_match_timm_blocks():
    """Every block is fused and runs the kernels (one launch pair per block), and the half-precision result is as
    close to timm's float32 output as timm's own half-precision forward is. (Tiles that end inside an image are
    the per-block test's job below: here every stage's pixels per image divide the 128-row tile.)"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        assert r["fused"] == 5, name
        assert r["calls"] == [256, 64, 64, 16, 4], name  # pixels per image, block by block
        assert r["same_keys"], name
        assert r["fell_back"] == 0, name  # a failed launch runs timm's forward, which would pass the check below
        assert r["err"] <= 2 * r["timm_half_err"] + 1e-3 * r["scale"], (name, r)


BLOCK_TAIL = r"""
import json, sys, torch
import torch.nn.functional as F
from bonefrac import kernels
out = {}
# tiles end inside images; masked and even K; 7 pixels per image: 19 images a tile, summed one by one (no slots)
for hw, c, batch in ((49, 40, 5), (196, 64, 3), (324, 40, 5), (7, 24, 40)):
    g = torch.Generator().manual_seed(hw)
    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).half()
    x, res = r(batch * hw, c), r(batch * hw, c)
    w1, b1, w2, b2 = r(4 * c, c, s=c ** -0.5), r(4 * c, s=0.1), r(c, 4 * c, s=(4 * c) ** -0.5), r(c, s=0.1)
    gamma, beta = r(4 * c, s=0.5), r(4 * c, s=0.2)
    bias = kernels.fold_grn_bias(w2, b2, beta)
    got = kernels.grn_mlp_residual(x, w1, b1, w2, bias, gamma, res, hw, 1e-6).double()
    # float64 reference with the kernels' two roundings to half (the stored activation, the scaled tile)
    h = F.gelu(x.double() @ w1.double().T + b1.double()).half().double()
    n = h.view(batch, hw, -1).pow(2).sum(1).sqrt()
    scale = 1 + gamma.double() * n / (n.mean(-1, keepdim=True) + 1e-6)
    a = (h.view(batch, hw, -1) * scale[:, None]).half().double().view(batch * hw, -1)
    want = a @ w2.double().T + b2.double() + w2.double() @ beta.double() + res.double()
    one = kernels.grn_mlp_residual(x[2 * hw:3 * hw], w1, b1, w2, bias, gamma, res[2 * hw:3 * hw], hw, 1e-6)
    out[f"{hw}x{c}"] = {"err": (got - want).abs().max().item(), "scale": want.abs().max().item(),
                        "alone": (one.double() - got[2 * hw:3 * hw]).abs().max().item()}
print(json.dumps(out))
"""


@needs_interpreter
def test_interpreted_block_tail_matches_a_float64_reference():
    """The kernels against a float64 reference (with the same two roundings to half) where 128-row tiles end inside
    images (7, 49, 196, 324 pixels per image) and K is and is not a multiple of the tile: each image's GRN norm must
    count all of its rows, in whichever tiles they fall, and an image alone must give what it gives in the batch."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_TAIL], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shape, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert r["err"] <= 2e-3 * r["scale"], (shape, r)  # fp16 output rounding is 1e-3 relative
        assert r["alone"] <= 2e-3 * r["scale"], (shape, r)


def _forward_with_fused_calls(model, x, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "grn_mlp_residual", lambda *a: calls.append(a) or pytest.fail("kernel ran"))
    with torch.no_grad():
        return model(x), calls


def test_float32_and_training_fall_back_to_timm_exactly(monkeypatch):
    """Float32 (the CPU predict path) and training run timm's own forward: outputs equal bit for bit."""
    model = small_convnext(conv_mlp=False)
    ref = copy.deepcopy(model)
    assert kernels.fuse_grn_blocks(model) == 5
    assert all(type(m).__name__ == "FusedGrnConvNeXtBlock" for m in model.modules() if isinstance(m, ConvNeXtBlock))
    x = torch.randn(2, 3, 64, 64)
    got, calls = _forward_with_fused_calls(model, x, monkeypatch)
    assert not calls and torch.equal(got, ref(x).detach())
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU half: no kernels without the interpreter either
    got, calls = _forward_with_fused_calls(copy.deepcopy(model).half(), x.half(), monkeypatch)
    assert not calls
    model.train()
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    assert torch.equal(y, ref.train()(x))
    y.sum().backward()  # gradients flow through timm's forward
    assert model.stages[0].blocks[0].mlp.grn.weight.grad is not None


def test_models_without_grn_are_left_alone():
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 16, 16, 16), use_grn=False, num_classes=2)
    assert kernels.fuse_grn_blocks(model) == 0
    assert not any(type(m).__name__ == "FusedGrnConvNeXtBlock" for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_match_timm(dtype):
    """ConvNeXt V2 Base's real widths on the GPU: half-precision weights eagerly and compiled, bf16 autocast over
    float32 weights (predict's path): within timm's own half-precision error of its float32 output."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("convnextv2_base", num_classes=3).cuda().eval()
    for module in ref.modules():
        if hasattr(module, "grn"):
            torch.nn.init.normal_(module.grn.weight, std=0.3)
            torch.nn.init.normal_(module.grn.bias, std=0.1)
    ref = ref.to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    fused = copy.deepcopy(ref)
    assert kernels.fuse_grn_blocks(fused) == 36
    with torch.no_grad():
        want = ref(x)
        timm_half = copy.deepcopy(ref).to(dtype)(x.to(dtype)).float()
        eager = copy.deepcopy(fused).to(dtype)
        got = eager(x.to(dtype)).float()
        compiled = torch.compile(copy.deepcopy(fused).to(dtype))(x.to(dtype)).float()
        with torch.autocast("cuda", dtype=dtype):
            autocast = fused(x).float()
            timm_autocast = ref(x).float()
    assert fell_back(eager) == 0 and fell_back(fused) == 0  # the kernels ran (a fallback is timm's own output)
    tol = 2 * (timm_half - want).abs().max().item() + 1e-3 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    assert (compiled - want).abs().max().item() <= tol
    assert (autocast - want).abs().max().item() <= 2 * (timm_autocast - want).abs().max().item() + tol


def test_fused_kernels_are_asked_for_by_one_environment_switch(monkeypatch):
    from bonefrac.predict import fused_kernels_wanted

    for value, wanted in ((None, True), ("0", False), ("off", False), (" No ", False), ("", True), ("1", True),
                          ("true", True)):
        if value is None:
            monkeypatch.delenv("BONEFRAC_FUSED_KERNELS", raising=False)
        else:
            monkeypatch.setenv("BONEFRAC_FUSED_KERNELS", value)
        assert fused_kernels_wanted() is wanted, value
    model = small_convnext(conv_mlp=False)
    assert kernels.fuse_for_inference(model) == 5
    assert {b._bonefrac_min_images for b in model.modules() if isinstance(b, ConvNeXtBlock)} == {
        kernels.FUSED_MIN_IMAGES}


def test_small_batches_and_failed_launches_run_timms_forward(monkeypatch, caplog):
    """Below min_images the block is timm's (the kernels lost at batch 8 on an H100); a launch that fails (e.g. a
    GPU with less shared memory than the tiles need) warns once and the block stays on timm's forward."""
    model = small_convnext(conv_mlp=False)
    ref = copy.deepcopy(model).half()
    kernels.fuse_grn_blocks(model, min_images=4)
    model = model.half()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets _kernel_dtype pick the kernels on the CPU
    x = torch.randn(2, 3, 64, 64).half()
    got, calls = _forward_with_fused_calls(model, x, monkeypatch)
    assert not calls and torch.equal(got, ref(x))
    monkeypatch.setattr(kernels, "grn_mlp_residual", lambda *a: (_ for _ in ()).throw(RuntimeError("no smem")))
    x = torch.randn(4, 3, 64, 64).half()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert caplog.text.count("fused GRN kernels failed on this GPU (RuntimeError: no smem)") == 5  # per block
        caplog.clear()
        assert torch.equal(model(x), ref(x)) and "failed" not in caplog.text  # not tried again


def test_block_operands_are_cached_until_a_parameter_changes():
    """Half-precision weights and the folded bias are made once per dtype and remade when a weight changes in place
    (load_state_dict, an optimiser step) or is replaced; their values are fc1/fc2's, with layer scale and GRN's bias
    folded into fc2."""
    model = small_convnext(conv_mlp=False, layer_scale=0.3)
    kernels.fuse_grn_blocks(model)
    block = model.stages[1].blocks[0]
    mlp = block.mlp
    ops = block._operands(torch.float16)
    assert block._operands(torch.float16) is ops
    assert block._operands(torch.bfloat16) is not ops
    ops = block._operands(torch.float16)
    w2 = mlp.fc2.weight.detach() * block.gamma.detach()[:, None]
    assert torch.equal(ops[0], mlp.fc1.weight.detach().half()) and torch.equal(ops[2], w2.half())
    want_bias = (mlp.fc2.bias * block.gamma + w2 @ mlp.grn.bias).detach()
    assert torch.allclose(ops[3], want_bias, atol=1e-6) and ops[3].dtype == torch.float32
    with torch.no_grad():
        mlp.fc2.weight.mul_(2)
    remade = block._operands(torch.float16)
    assert remade is not ops and torch.equal(remade[2], (2 * w2).half())
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert torch.equal(block._operands(torch.float16)[1], mlp.fc1.bias.detach().half())
    mlp.grn.bias = torch.nn.Parameter(torch.zeros_like(mlp.grn.bias))
    assert torch.allclose(block._operands(torch.float16)[3], (mlp.fc2.bias * block.gamma).detach(), atol=1e-6)


def test_feature_maps_below_min_pixels_run_timms_forward(monkeypatch):
    """ConvNeXt V2 Base's last stage (7 x 7 = 49 pixels per image at 224 px) was slower fused than compiled stock
    on an H100 (benchmarks/RESULTS.md): blocks whose maps are smaller than min_pixels keep timm's forward."""
    model = small_convnext(conv_mlp=False)
    kernels.fuse_grn_blocks(model, min_pixels=64)
    model = model.half()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    monkeypatch.setattr(kernels, "grn_mlp_residual",
                        lambda x, w1, b1, w2, bias, gamma, residual, hw, eps: seen.append(hw) or residual.clone())
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64).half())  # maps of 16x16, 8x8, 4x4 and 2x2 pixels
    assert seen == [256, 64, 64]  # stage 1 (one block) and stage 2 (two); stages 3 and 4 are timm's


def test_a_fused_model_can_be_pickled_whole():
    import pickle

    model = small_convnext(conv_mlp=False)
    kernels.fuse_grn_blocks(model, min_pixels=7)
    again = pickle.loads(pickle.dumps(model))
    blocks = [m for m in again.modules() if isinstance(m, ConvNeXtBlock)]
    assert all(type(b).__name__ == "FusedGrnConvNeXtBlock" and b._bonefrac_min_pixels == 7 for b in blocks)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
