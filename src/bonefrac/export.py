"""Export a checkpoint or an ensemble directory to ONNX (fp32, fp16 or INT8) or TorchScript, checked against
PyTorch on real images.

    report = export("runs/a/best", "model.onnx", manifest="work/data/manifest.csv", int8=True)

The exported graph takes float32 (B, 1, S, S) raw pixels 0..255 (dynamic batch axis) and returns logits; the
normalisation is inside the graph and the checkpoint JSON (classes, preprocessing, temperature, thresholds) is in
the file's metadata, so `bonefrac.backends.load_backend(file)` needs nothing else. A sidecar `FILE.json` holds the
same JSON plus the export report (size, parity, validation-metric change).

An ensemble directory (`bonefrac ensemble`) exports as one graph: the input is as above at the largest member
size, each member is resized to its own size inside the graph (bilinear, no antialias), normalised and scaled by
its temperature, and the output is log(sum_i w_i softmax(logits_i / T_i)): logits whose softmax (temperature 1
in the metadata) is the weighted average of the members' calibrated probabilities. The metadata carries the
ensemble's classes, threshold, operating points, weights and members.

Parity: probabilities of the exported model and of the PyTorch checkpoint (or ensemble) on real images (a sample
of the manifest's val split spread over its labels, or `images`) must agree within `tolerance` (max absolute
difference), else BonefracError; the report adds how many decisions agree at the model's threshold and at each
operating point (exportcheck.py).
INT8 uses ONNX Runtime static quantization (QDQ, per-channel weights, MinMax ranges) calibrated on training
images, with two groups of nodes left in float (`_int8_float_nodes`):
- the shape arithmetic (nodes computing from Shape outputs, e.g. the dynamic "same" padding of timm's tf_* models):
  quantizing it rounds the pad amounts, which shifts or resizes feature maps (the shipped EfficientNet-Lite2 lost
  pixel alignment from its third block on: per-image probability changes up to 0.51);
- the input side up to the first `int8_float_convs` convolutions (default 4: in an EfficientNet-Lite the stem,
  the first block's depthwise and projection convs and the second block's expansion), their activations and the
  input normalisation. These few high-resolution layers carry most of the INT8 error and little of the compute
  (2 were enough for the first shipped model; its successor lost 0.011 validation AUROC with 2, 0.005 with 4:
  benchmarks/RESULTS.md). Nothing upstream of them is quantized, so ONNX Runtime
  cannot re-quantize their float weights per tensor at load time (its WeightBiasQuantization pass does that to a
  float Conv that sits between DequantizeLinear and QuantizeLinear).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backends import INPUT_NAME, META_KEY, OUTPUT_NAME
from .errors import BonefracError
from .exportcheck import check_tolerance, reference_images, verify
from .predict import ENSEMBLE_FILE, Ensemble, load_predictor
from .transforms import resize_batch

log = logging.getLogger(__name__)

OPSET = 17
INT8_FLOAT_CONVS = 4  # convolutions on the input side kept in float by INT8 exports


class _Deployable(torch.nn.Module):
    """Checkpoint model with its normalisation: raw pixels (B, 1, S, S) 0..255 -> logits."""

    def __init__(self, model, prep: dict):
        super().__init__()
        self.model, self.channels = model, int(prep["channels"])
        self.register_buffer("mean", torch.tensor(prep["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(prep["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels / 255.0
        if self.channels > 1:  # grey replicated, as transforms.normalize does
            x = x.expand(-1, self.channels, -1, -1)
        return self.model((x - self.mean) / self.std)


class _EnsembleDeployable(torch.nn.Module):
    """Raw pixels (B, 1, S, S) 0..255 -> log of the weighted average of the members' calibrated probabilities."""

    def __init__(self, ens: Ensemble, size: int):
        super().__init__()
        self.members = torch.nn.ModuleList(_Deployable(m.model, m.prep) for m in ens.members)
        self.size, self.sizes = size, [m.size for m in ens.members]
        self.temperatures = [m.temperature for m in ens.members]
        self.weights = [float(w) for w in ens.weights]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mix = None
        for member, size, temp, weight in zip(self.members, self.sizes, self.temperatures, self.weights):
            x = pixels if size == self.size else F.interpolate(
                pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
            p = weight * torch.softmax(member(x) / temp, dim=1)
            mix = p if mix is None else mix + p
        return torch.log(mix.clamp_min(1e-30))  # softmax of this is the mix; the clamp only guards log(0)


def _deployable(source, ckpt) -> tuple[torch.nn.Module, dict]:
    """(graph module, metadata for the exported file) for a Predictor or an Ensemble loaded from `ckpt`."""
    if not isinstance(source, Ensemble):
        return _Deployable(source.model, source.prep).eval(), source.meta
    size = max(m.size for m in source.members)
    if any(m.size != size for m in source.members):
        log.warning("members take %s px: the %d px input is resized inside the graph, while PyTorch resizes "
                    "the original image, so parity differs slightly (raise --tolerance if it fails)",
                    sorted({m.size for m in source.members}), size)
    try:
        paths = json.loads((Path(ckpt) / ENSEMBLE_FILE).read_text())["members"]
    except (OSError, ValueError, KeyError, TypeError):
        paths = [None] * len(source.members)
    weights = [float(w) for w in source.weights]
    members = [{"path": str(path) if path is not None else None, "arch": m.meta["arch"], "weight": w,
                "temperature": m.temperature, "threshold": m.threshold, "preprocess": m.prep,
                "manifest_sha256": m.meta.get("manifest_sha256")}
               for path, m, w in zip(paths, source.members, weights)]
    meta = {**source.meta, "arch": "+".join(m.meta["arch"] for m in source.members),
            "preprocess": {"size": size, "input": "raw grey pixels 0..255; member normalisation in the graph"},
            "temperature": 1.0, "threshold": source.threshold, "weights": weights, "members": members,
            "graph_output": "log_probabilities"}
    for key in ("val_metrics", "test_metrics"):  # the first member's, not the ensemble's
        meta.pop(key, None)
    return _EnsembleDeployable(source, size).eval(), meta


def export(ckpt, out, fmt: str = "onnx", int8: bool = False, fp16: bool = False, manifest=None,
           images=None, tolerance: float | None = None, n_calib: int = 64, n_parity: int = 64,
           int8_float_convs: int = INT8_FLOAT_CONVS) -> dict:
    """Write the exported model to `out` (and its report to `out`.json) and return the report; raises
    BonefracError when parity fails, leaving any earlier `out` and its sidecar untouched.

    `manifest` (a sample of its train split calibrates INT8, one of its val split checks parity, decisions and the
    metric change; see exportcheck.py) or `images` (a folder or list of image files, split into disjoint
    calibration and parity halves) must name real images; `n_calib`/`n_parity` images at most.
    `int8_float_convs`: how many convolutions on the input side INT8 keeps in float (0 quantizes them all; see
    the module docstring).
    """
    fmt, variant = _check_options(fmt, int8, fp16)
    tolerance = check_tolerance(tolerance)
    if int(int8_float_convs) < 0:
        raise BonefracError(f"int8_float_convs must be >= 0, got {int8_float_convs}")
    out = _check_out(out, fmt)  # before the slow part: a bad --out must not cost a whole export
    source = load_predictor([ckpt], "cpu")  # a Predictor, or an Ensemble for an ensemble directory
    wrapped, meta = _deployable(source, ckpt)
    calib, parity, labels, described = reference_images(manifest, images, meta, n_calib, n_parity, variant == "int8")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"format": fmt, "variant": variant, "opset": OPSET if fmt == "onnx" else None,
              "source": str(ckpt), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "reference_images": described}
    # Built and checked under a temporary name beside `out` (same file system, so os.replace is atomic): a
    # failed export must not destroy a previous good one, nor leave a sidecar describing another model.
    staged = out.with_name(f".{out.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{out.suffix}")
    staged_sidecar = _sidecar(staged)
    try:
        _write_model(wrapped, meta, fmt, variant, calib, int(int8_float_convs), staged, report)
        report.update(verify(source, staged, parity, labels, meta, tolerance, variant))
        _store_final_report(staged, fmt, meta, report)
        os.replace(staged, out)
        os.replace(staged_sidecar, _sidecar(out))
    finally:
        staged.unlink(missing_ok=True)
        staged_sidecar.unlink(missing_ok=True)
    log.info("exported %s (%s, %.1f MB); report in %s", out, variant, report["size_bytes"] / 1e6, _sidecar(out))
    return report


OUT_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}


def _check_out(out, fmt: str) -> Path:
    out = Path(out)
    if out.is_dir():
        raise BonefracError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.suffix.lower() not in OUT_SUFFIXES[fmt]:  # the service and predict pick the back-end by suffix
        raise BonefracError(f"--out {out}: a {fmt} export needs a name ending in {' or '.join(OUT_SUFFIXES[fmt])}")
    return out


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_model(wrapped, meta: dict, fmt: str, variant: str, calib, float_convs: int, out: Path,
                 report: dict) -> None:
    if fmt == "torchscript":
        _write_torchscript(wrapped, meta, out, report)
        return
    size = int(meta["preprocess"]["size"])
    with tempfile.TemporaryDirectory() as tmp:  # intermediate graphs (fp32, pre-processed, quantized)
        fp32_path = Path(tmp) / "fp32.onnx"
        _write_onnx(wrapped, size, fp32_path)
        final = _convert(fp32_path, variant, calib, size, Path(tmp), float_convs, report)
        _store_onnx_meta(final, out, meta, report)


def _check_options(fmt: str, int8: bool, fp16: bool) -> tuple[str, str]:
    if fmt not in ("onnx", "torchscript"):
        raise BonefracError(f"unknown export format '{fmt}' (onnx or torchscript)")
    if int8 and fp16:
        raise BonefracError("choose --int8 or --fp16, not both")
    if fmt == "torchscript" and (int8 or fp16):
        raise BonefracError("--int8/--fp16 apply to ONNX exports; TorchScript is exported in fp32")
    return fmt, "int8" if int8 else "fp16" if fp16 else "fp32"


# --- writing ---------------------------------------------------------------------------------------------


def _write_onnx(wrapped, size: int, path: Path) -> None:
    x = torch.rand(2, 1, size, size) * 255
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET)
    try:  # the TorchScript-based exporter is fast and its graphs quantize well
        torch.onnx.export(wrapped, (x,), str(path), dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
    except Exception as exc:  # e.g. a torch without the legacy exporter: the torch.export-based one
        log.info("legacy ONNX exporter failed (%s); using the dynamo exporter", exc)
        torch.onnx.export(wrapped, (x,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)


def _convert(fp32_path: Path, variant: str, calib: list[np.ndarray], size: int, tmp: Path,
             float_convs: int = INT8_FLOAT_CONVS, report: dict | None = None) -> Path:
    if variant == "fp32":
        return fp32_path
    if variant == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save(half, str(tmp / "fp16.onnx"))
        return tmp / "fp16.onnx"
    return _quantize_int8(fp32_path, calib, size, tmp, float_convs, report)


def _quantize_int8(fp32_path: Path, calib: list[np.ndarray], size: int, tmp: Path,
                   float_convs: int = INT8_FLOAT_CONVS, report: dict | None = None) -> Path:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            batches = resize_batch(calib, size).numpy().astype(np.float32)
            self._it = iter([{INPUT_NAME: batches[i:i + 8]} for i in range(0, len(batches), 8)])

        def get_next(self):
            return next(self._it, None)

    prep = tmp / "prep.onnx"
    try:  # auto_merge: an ensemble's members (e.g. TF-padded EfficientNets) name the batch axis differently
        quant_pre_process(str(fp32_path), str(prep), auto_merge=True)
    except Exception as exc:  # onnxruntime raises plain Exceptions here
        raise BonefracError(f"INT8 export: onnxruntime could not prepare the graph for quantization ({exc}); "
                            "export fp32 or fp16 instead") from None
    model = onnx.load(str(prep))
    for i, node in enumerate(model.graph.node):  # exclusion goes by node name
        node.name = node.name or f"bonefrac_node_{i}"
    onnx.save(model, str(prep))
    shape_nodes, input_nodes = _int8_float_nodes(model, float_convs)
    out = tmp / "int8.onnx"
    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=shape_nodes + input_nodes)
    kept = set(input_nodes)
    float_ops = [n.name for n in model.graph.node if n.name in kept and n.op_type in _MAC_OPS]
    log.info("INT8 calibrated on %d images; kept in float: %d shape-arithmetic nodes, %d input-side nodes "
             "(convolutions: %s)", len(calib), len(shape_nodes), len(input_nodes), ", ".join(float_ops) or "none")
    if report is not None:
        report["int8"] = {"calibration": "MinMax", "calibration_images": len(calib), "float_convs": float_convs,
                          "float_conv_nodes": float_ops, "float_shape_nodes": len(shape_nodes)}
    return out


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _int8_float_nodes(model, float_convs: int = INT8_FLOAT_CONVS) -> tuple[list[str], list[str]]:
    """(shape-arithmetic nodes, input-side nodes) of an ONNX graph, to keep in float when quantizing.

    Shape arithmetic: Shape nodes and every node whose inputs are all shape-derived or constant (the pad amounts
    of dynamic "same" padding, reshape targets). Input side: every other node whose output lies at most
    `float_convs` Conv/Gemm/MatMul nodes deep (counted along the deepest path from the graph input), i.e. the
    input normalisation, the first `float_convs` convolutions and their activations and pads. Every input of an
    input-side node comes from the input side too, so no quantized tensor feeds a float convolution.
    """
    g = model.graph
    const = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    shape_t, shape_nodes = set(), []
    for n in g.node:  # ONNX graphs are topologically sorted: one pass suffices
        ins = [i for i in n.input if i]
        if n.op_type == "Shape" or (n.op_type != "Constant" and any(i in shape_t for i in ins)
                                    and all(i in shape_t or i in const for i in ins)):
            shape_t.update(n.output)
            shape_nodes.append(n.name)
    depth, input_nodes, skip = {}, [], set(shape_nodes)
    for n in g.node:
        data_in = [i for i in n.input if i and i not in const and i not in shape_t]
        d = max((depth.get(i, 0) for i in data_in), default=0) + (n.op_type in _MAC_OPS)
        for o in n.output:
            depth[o] = d
        if n.name not in skip and n.op_type != "Constant" and d <= float_convs and float_convs > 0:
            input_nodes.append(n.name)
    return shape_nodes, input_nodes


def _store_onnx_meta(src: Path, out: Path, meta: dict, report: dict) -> None:
    import onnx

    model = onnx.load(str(src))
    _set_onnx_meta(model, meta, report)
    onnx.save(model, str(out))


def _set_onnx_meta(model, meta: dict, report: dict) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps({**meta, "export": report}, default=str)


def _write_torchscript(wrapped, meta: dict, out: Path, report: dict) -> None:
    size = int(meta["preprocess"]["size"])
    # No trace check (it reruns the model several times, slow on CPU): the parity check covers it.
    traced = torch.jit.trace(wrapped, torch.rand(2, 1, size, size) * 255, check_trace=False)
    extra = {f"{META_KEY}.json": json.dumps({**meta, "export": report}, default=str)}
    torch.jit.save(traced, str(out), _extra_files=extra)


def _store_final_report(out: Path, fmt: str, meta: dict, report: dict) -> None:
    """Record parity and metric change inside the file and in the sidecar JSON: a file copied without its sidecar
    still says how it was checked."""
    inside = {k: v for k, v in report.items() if k != "size_bytes"}
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(out))
        _set_onnx_meta(model, meta, inside)
        onnx.save(model, str(out))
    else:
        scripted = torch.jit.load(str(out), map_location="cpu")
        torch.jit.save(scripted, str(out), _extra_files={f"{META_KEY}.json": json.dumps({**meta, "export": inside},
                                                                                          default=str)})
    report["size_bytes"] = out.stat().st_size
    _sidecar(out).write_text(json.dumps({**meta, "export": report}, indent=2, default=str))
