"""The GPU inference benchmark's variant names (the timings themselves need a GPU: benchmarks/RESULTS.md)."""

import sys
from pathlib import Path

import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from infer_throughput import inductor_patch, valid_variant  # noqa: E402


def test_variant_names():
    for ok in ("eager", "default", "reduce-overhead", "frozen", "frozen-fp16-mm-gemm", "frozen-fp16-cdt",
               "frozen-fp16-tritonmm", "frozen-fp16-grn", "amp", "amp-grn"):
        assert valid_variant(ok), ok
    for bad in ("frozen-int4", "eager-fp16", "compiled", "frozen-mm-", "amp-fp16"):
        assert not valid_variant(bad), bad


def test_options_map_onto_real_inductor_settings():
    patch = inductor_patch({"fp16", "mm", "gemm", "cdt"})
    assert patch["freezing"] and patch["conv_1x1_as_mm"] and patch["coordinate_descent_tuning"]
    assert "TRITON" in patch["max_autotune_gemm_backends"].split(",")
    with inductor_config.patch(patch):  # an unknown or misspelt setting raises here
        assert inductor_config.max_autotune_gemm
    assert inductor_patch(set()) == {"freezing": True, "conv_1x1_as_mm": False}
    only_triton = inductor_patch({"fp16", "tritonmm"})
    assert only_triton["max_autotune_gemm_backends"] == "TRITON" and only_triton["max_autotune_conv_backends"] == "ATEN"
    with inductor_config.patch(only_triton):
        assert inductor_config.max_autotune_conv_backends == "ATEN"
