"""One predictor interface over PyTorch, ONNX Runtime and TorchScript, plus the "is this an X-ray?" check.

    predictor = load_backend("model.onnx")          # or a checkpoint dir, or a TorchScript .pt file
    probs = predictor.predict_arrays([gray_uint8])  # (n, K) calibrated probabilities
    check = check_radiograph(gray_uint8, colourfulness_of(raw_bytes))
    if not check.ok: ...                            # check.reason says why it is not a radiograph

Every backend exposes what `bonefrac.predict.Predictor` does: `class_names`, `positive_index`, `threshold`,
`size`, `meta`, `version` and `predict_arrays(list of 2-D uint8) -> (n, K)`; `use_operating_point(predictor,
"screening")` moves any of them to one of the decision thresholds saved with the model. Exported files carry the
checkpoint's JSON (classes, preprocessing, temperature, thresholds) inside them, so nothing else is needed.
Exported graphs take float32 (B, 1, S, S) raw pixel values 0..255 and return logits; normalisation is inside.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import modelid
from .checkpoint import check_format, is_threshold
from .errors import BonefracError, ImageReadError
from .io import decode_image_and_colour
from .predict import _softmax, decide, parse_device, resolve_device
from .transforms import resize_batch

log = logging.getLogger(__name__)

META_KEY = "bonefrac"  # ONNX metadata_props key / TorchScript extra file stem holding the checkpoint JSON
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


class _GraphPredictor:
    """Shared part of exported-graph predictors: metadata handling, batching, temperature, softmax."""

    backend = "graph"

    def __init__(self, meta: dict, path, batch_size: int = 32):
        self.meta, self.batch_size = meta, batch_size
        self.size = int(meta["preprocess"]["size"])
        self.class_names = list(meta["class_names"])
        self.positive_index = meta.get("positive_index")
        self.threshold = meta.get("threshold")
        self.temperature = float(meta.get("temperature") or 1.0)
        # The whole file, hashed once at load: its metadata (read from inside it, never from the sidecar) included.
        variant = (meta.get("export") or {}).get("variant", "fp32")
        self._version = modelid.file_version(path, meta, f"+{self.backend}-{variant}")

    @property
    def version(self) -> str:
        """`<arch>@<8 hex of the file>+<backend>-<variant>`, e.g. `resnet18@1a2b3c4d+onnx-int8`."""
        return self._version

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, K) probabilities for decoded 2-D uint8 images of any size."""
        if not images:
            return np.zeros((0, len(self.class_names)))
        x = resize_batch(images, self.size).numpy().astype(np.float32)
        logits = np.concatenate([self._logits(x[i:i + self.batch_size])
                                 for i in range(0, len(x), self.batch_size)])
        # float64 as Predictor's: a float32 copy of a score equal to the threshold can land just below it.
        return _softmax(logits.astype(np.float64) / self.temperature)


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def onnx_providers(device: str = "auto") -> list:
    """ONNX Runtime providers for a --device value, for InferenceSession(providers=...): "cpu" the CPU alone;
    "cuda" / "cuda:N" TensorRT and CUDA on GPU N (0), then the CPU for what they cannot run; "auto" the same, or
    the CPU alone when ONNX Runtime has no GPU provider (onnxruntime-gpu not installed). BonefracError for any
    other name, and for a GPU asked for by name that ONNX Runtime cannot use."""
    import onnxruntime as ort

    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "mps":
        raise BonefracError(f"device '{device}': ONNX models run on auto, cpu, cuda or cuda:N (no MPS provider)")
    gpu = [(p, {"device_id": index or 0}) for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    if not gpu and kind == "cuda":
        raise BonefracError(f"device '{device}' requested but ONNX Runtime has no CUDA provider (available: "
                            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu, or use cpu")
    if not gpu:
        log.info("ONNX Runtime has no GPU provider: running on the CPU")
    return gpu + ["CPUExecutionProvider"]


def _check_gpu_started(session, providers: list, device: str) -> None:
    """ONNX Runtime falls back to the CPU, with only its own warning, when a GPU provider fails to start (CUDA
    libraries missing, say): an error when the GPU was asked for by name, an INFO line for "auto"."""
    wanted = [p[0] for p in providers if isinstance(p, tuple)]
    if not wanted or set(wanted) & set(session.get_providers()):
        return
    if parse_device(device)[0] == "cuda":
        raise BonefracError(f"device '{device}' requested but ONNX Runtime could not start {' or '.join(wanted)} "
                            "(see its warning above); use cpu, or fix the CUDA installation")
    log.info("ONNX Runtime could not start %s: running on the CPU", " or ".join(wanted))


class OnnxPredictor(_GraphPredictor):
    """An exported .onnx file run by ONNX Runtime (dynamic batch axis)."""

    backend = "onnx"

    def __init__(self, path, device: str = "auto", batch_size: int = 32, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = onnx_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise BonefracError(f"{path}: cannot load ONNX model: {exc}") from None
        _check_gpu_started(self.session, providers, device)
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        super().__init__(_parse_meta(raw, path), path, batch_size)
        self._check_graph(path)

    def _check_graph(self, path) -> None:
        """The metadata must describe this graph (a hand-edited file or another tool's would otherwise drop a class
        name silently, or fail at the first request with ONNX Runtime's own error): fixed input and output sizes
        are compared with the preprocessing size and the number of classes."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if INPUT_NAME not in [i.name for i in inputs] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise BonefracError(f"{path}: not a bonefrac export (graph input '{INPUT_NAME}' and output "
                                f"'{OUTPUT_NAME}' expected; it has {[i.name for i in inputs]} -> "
                                f"{[o.name for o in outputs]})")
        spatial = next(i for i in inputs if i.name == INPUT_NAME).shape[2:]
        classes = next(o for o in outputs if o.name == OUTPUT_NAME).shape[-1:]
        if any(isinstance(d, int) and d != self.size for d in spatial):
            raise BonefracError(f"{path}: its metadata says {self.size} px input but the graph takes {spatial}")
        if any(isinstance(d, int) and d != len(self.class_names) for d in classes):
            raise BonefracError(f"{path}: its metadata names {len(self.class_names)} classes "
                                f"({', '.join(self.class_names)}) but the graph outputs {classes[0]}")

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


class TorchScriptPredictor(_GraphPredictor):
    """An exported TorchScript .pt file (checkpoint JSON in its extra files)."""

    backend = "torchscript"

    def __init__(self, path, device: str = "auto", batch_size: int = 32):
        import torch

        self.device = resolve_device(device)  # as for checkpoints: "auto" is the GPU when there is one
        extra = {f"{META_KEY}.json": ""}
        try:
            self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra).eval()
        except Exception as exc:  # torch.jit raises RuntimeError and friends for non-TorchScript files
            raise BonefracError(f"{path}: cannot load TorchScript model: {exc}") from None
        super().__init__(_parse_meta(extra[f"{META_KEY}.json"], path), path, batch_size)
        self._check_graph(path)

    def _check_graph(self, path) -> None:
        """As OnnxPredictor's: a traced graph states no sizes, so one blank image at the metadata's size must run
        and give one score per class named."""
        try:
            out = self._logits(np.zeros((1, 1, self.size, self.size), np.float32))
        except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError and friends for a wrong size
            raise BonefracError(f"{path}: its metadata says {self.size} px input but the graph does not run on it "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if out.shape[-1] != len(self.class_names):
            raise BonefracError(f"{path}: its metadata names {len(self.class_names)} classes "
                                f"({', '.join(self.class_names)}) but the graph outputs {out.shape[-1]}")

    def _logits(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


def _parse_meta(raw, path) -> dict:
    if not raw:
        raise BonefracError(f"{path}: exported model carries no bonefrac metadata; re-export it with "
                            "`bonefrac export`")
    try:
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BonefracError(f"{path}: its bonefrac metadata is not valid JSON ({exc}); re-export the model") from None
    for key in ("arch", "class_names", "preprocess"):
        if key not in (meta if isinstance(meta, dict) else {}):
            raise BonefracError(f"{path}: bonefrac metadata lacks '{key}'")
    if not isinstance(meta["preprocess"], dict) or "size" not in meta["preprocess"]:
        raise BonefracError(f"{path}: bonefrac metadata lacks 'preprocess.size'")
    check_format(meta, path)
    return meta


def load_backend(path, device: str = "auto", batch_size: int = 32):
    """A predictor for a checkpoint or ensemble directory (PyTorch), a .onnx file (ONNX Runtime) or a
    TorchScript .pt file."""
    from .predict import default_model_path, load_predictor

    path = Path(path) if path else default_model_path()
    if path.is_dir():
        return load_predictor([str(path)], device, batch_size=batch_size)
    if not path.is_file():
        raise BonefracError(f"{path}: no such model file or checkpoint directory")
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, device, batch_size)
    if path.suffix.lower() in (".pt", ".ts", ".torchscript"):
        return TorchScriptPredictor(path, device, batch_size)
    raise BonefracError(f"{path}: unknown model format (expected a checkpoint dir, .onnx or TorchScript .pt)")


# --- operating points ------------------------------------------------------------------------------------

DEFAULT_POINT = "default"


def use_operating_point(predictor, name: str | None) -> float | None:
    """Make `predictor` decide at its saved operating point `name` (e.g. "screening", "high_sensitivity") and
    return the threshold now in use. None or "default" change nothing (a model decides at its own validation
    threshold as loaded).

    Works for whatever `load_backend` returns: checkpoints, ensemble directories and exported files all carry the
    named thresholds chosen on validation in `meta["operating_points"]`. Raises BonefracError, naming the model
    and listing the points it has, for an unknown name, a model without saved points or a multi-class model.
    """
    if name is None or name == DEFAULT_POINT:
        return predictor.threshold
    points = _saved_points(predictor)
    available = f"available: {_listed(points)}"
    if name not in points:
        raise BonefracError(f"model {predictor.version} has no operating point '{name}'; {available}")
    threshold = points[name]
    if not is_threshold(threshold):  # a hand-edited JSON: refuse rather than decide at a nonsense value
        raise BonefracError(f"model {predictor.version}: operating point '{name}' is {threshold!r}, not a "
                            f"threshold from 0 to 1; {available}")
    log.info("operating point '%s': threshold %.4g (was %s)", name, threshold, _shown(predictor.threshold))
    predictor.threshold = float(threshold)
    return predictor.threshold


def _saved_points(predictor) -> dict:
    """The model's named thresholds; BonefracError saying why when it has none to choose from."""
    names, model = predictor.class_names, f"model {predictor.version}"
    if predictor.positive_index is None or len(names) != 2:
        raise BonefracError(f"{model} has {len(names)} classes ({', '.join(names)}) and predicts the most probable "
                            f"one; operating points apply to two-class models only (available: {DEFAULT_POINT})")
    points = (getattr(predictor, "meta", None) or {}).get("operating_points")  # stand-ins may have no meta
    if not isinstance(points, dict) or not points:
        raise BonefracError(f"{model} has no saved operating points (available: {DEFAULT_POINT}); fit them on "
                            "validation with `bonefrac calibrate CKPT --manifest MANIFEST` (then re-export)")
    return points


def _listed(points: dict) -> str:
    """"default (0.0894), high_sensitivity (0.0495), ...": every name the caller may pass, with its saved threshold
    ("default" is always accepted, saved or not)."""
    saved = [f"{k} ({_shown(v)})" for k, v in points.items()]
    return ", ".join(saved if DEFAULT_POINT in points else [DEFAULT_POINT, *saved])


def _shown(threshold) -> str:
    return f"{threshold:.4g}" if is_threshold(threshold) else repr(threshold)


# --- is it a radiograph? ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class XrayLimits:
    """Thresholds of the radiograph check, set from FracAtlas X-rays against natural photos, documents and
    synthetic images (see tests/test_export.py). Bone radiographs are grey, mostly dark background, smooth.
    Real radiographs refused (2026-12-06): FracAtlas 7 of 4,083, hbfmid3 19 of 1,334, bonebreak 152 of 1,094,
    nearly all by `max_mean` (bright, tightly cropped films); raising it lets grey photos through (skimage's
    camera, text and clock differ from those films only in mean brightness)."""

    min_std: float = 6.0            # below: blank or nearly uniform
    min_neighbour_corr: float = 0.75  # below: noise or fine texture (X-rays are smooth at 128 px)
    max_colourfulness: float = 12.0   # above: a colour photo or screenshot (X-rays are grey)
    max_mean: float = 120.0           # above: a bright scene or a document (X-rays are dark on average)
    max_white_fraction: float = 0.35  # above: a white page / screenshot background
    min_side: int = 32                # below (pixels): an icon, too small to read a fracture from
    max_aspect: float = 10.0          # above: a strip or banner (long-leg films stay near 1:4)


@dataclass(frozen=True)
class RadiographCheck:
    ok: bool
    reason: str | None = None
    stats: dict = field(default_factory=dict)


def colourfulness_of(data: bytes, name: str = "upload") -> float:
    """Colourfulness (Hasler & Suesstrunk 2003) of encoded image bytes; 0.0 for grey or undecodable files.

    Computed on the colour thumbnail of `io.decode_image_and_colour`: the grey decoder discards colour, which
    is the strongest cue that a file is a photo or screenshot rather than a radiograph.
    """
    try:
        thumb = decode_image_and_colour(data, name)[1]
    except ImageReadError:  # the grey decoder reports unreadable files; colour is only a hint
        return 0.0
    return 0.0 if thumb is None else colourfulness(thumb)


def colourfulness(rgb: np.ndarray) -> float:
    """Colourfulness of an (H, W, 3) array (any dtype): 0 for grey images, ~15 slightly tinted, >40 photos."""
    rgb = np.asarray(rgb, dtype=np.float32)  # uint8 differences would wrap around
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def image_stats(gray: np.ndarray) -> dict:
    """Statistics of a 2-D uint8 image at 128 x 128 that separate radiographs from other pictures."""
    g = resize_batch([gray], 128).numpy()[0, 0].astype(np.float64)
    std = float(g.std())
    left, right = g[:, :-1].ravel(), g[:, 1:].ravel()
    corr = float(np.corrcoef(left, right)[0, 1]) if left.std() > 0 and right.std() > 0 else 1.0
    return {"mean": round(float(g.mean()), 2), "std": round(std, 2), "neighbour_corr": round(corr, 4),
            "white_fraction": round(float((g >= 230).mean()), 4)}


def check_radiograph(gray: np.ndarray, colourfulness_value: float = 0.0,
                     limits: XrayLimits = XrayLimits()) -> RadiographCheck:
    """Whether a decoded image plausibly is a bone radiograph; `reason` explains a refusal in plain words."""
    stats = {**image_stats(gray), "colourfulness": round(colourfulness_value, 2)}
    height, width = gray.shape[:2]
    rules = [
        (min(height, width) < limits.min_side, f"too small ({width}x{height} px; radiographs are larger)"),
        (max(height, width) > limits.max_aspect * min(height, width), f"implausible shape ({width}x{height} px)"),
        (stats["std"] < limits.min_std, "blank or nearly uniform image"),
        (stats["colourfulness"] > limits.max_colourfulness, "colour image (radiographs are greyscale)"),
        (stats["neighbour_corr"] < limits.min_neighbour_corr, "looks like noise or texture, not anatomy"),
        (stats["white_fraction"] > limits.max_white_fraction, "mostly white: looks like a document or screenshot"),
        # The one rule that also refuses real radiographs: bright, tightly cropped ones (14 % of bonebreak).
        (stats["mean"] > limits.max_mean, "too bright overall for a radiograph (looks like a photo; a tightly "
                                          "cropped bright radiograph can too)"),
    ]
    for failed, reason in rules:
        if failed:
            return RadiographCheck(False, f"not an X-ray: {reason}", stats)
    return RadiographCheck(True, None, stats)


def needs_review(probs: np.ndarray, positive_index: int | None, threshold: float | None,
                 margin: float = 0.15) -> np.ndarray:
    """Per-image refer flag from the model's own uncertainty. Binary: the positive probability, rescaled
    piecewise-linearly so that the decision threshold sits at 0.5 (0 and 1 stay put), lies within `margin` of 0.5;
    at a threshold of 0.5 that is plain |p - 0.5| < margin, and a low threshold (0.14, say) no longer flags every
    negative call. Multi-class: the top two probabilities within 2 * margin of each other."""
    if probs.size == 0:
        return np.zeros(0, bool)
    if positive_index is not None and probs.shape[1] == 2:
        t = 0.5 if threshold is None else float(threshold)
        p = probs[:, positive_index]
        # The floors only keep a threshold of exactly 0 or 1 from dividing by zero (that side is then empty).
        centred = np.where(p >= t, 0.5 + 0.5 * (p - t) / max(1 - t, 1e-12), 0.5 * p / max(t, 1e-12))
        return np.abs(centred - 0.5) < margin  # p == t (decided positive) sits at 0.5: referred
    top = np.sort(probs, axis=1)
    return (top[:, -1] - top[:, -2]) < 2 * margin


def prediction_rows(probs: np.ndarray, predictor, refer_margin: float) -> list[dict]:
    """The result of each image (rows of `probs`), as `bonefrac predict` and the service report it: status "ok",
    the prediction (the validation threshold decides for 2 classes), its confidence, the refer flag
    (`needs_review`) and every class probability, rounded to 6 decimals."""
    pos, threshold, names = predictor.positive_index, predictor.threshold, predictor.class_names
    labels = decide(probs, pos, threshold)
    refer = needs_review(probs, pos, threshold, refer_margin)
    finite = np.isfinite(probs).all(axis=1)
    # A NaN compares false with every threshold: without this it would read as a confident negative.
    broken = {"status": "error", "refer": True, "message": "the model produced non-finite output (NaN/inf) for this "
              "image; no prediction (check the model file and its export)"}
    return [{"status": "ok", "prediction": names[lab], "confidence": round(float(row[lab]), 6), "refer": bool(flag),
             "probabilities": {c: round(float(v), 6) for c, v in zip(names, row)}} if ok else dict(broken)
            for row, lab, flag, ok in zip(probs, labels, refer, finite)]


def csv_writer(class_names):
    """A function writing one `prediction_rows` row, as `bonefrac predict --format csv` does, to stdout (after the
    header, written now). `refer` is true/false as in the JSON lines."""
    w = csv.writer(sys.stdout)
    w.writerow(["path", "status", "prediction", "confidence", "refer", *[f"p_{c}" for c in class_names], "threshold",
                "message"])

    def write(row: dict) -> None:
        probs = row.get("probabilities", {})
        refer = json.dumps(bool(row["refer"])) if "refer" in row else ""  # the JSON lines' spelling, not True/False
        w.writerow([row["path"], row["status"], row.get("prediction", ""), row.get("confidence", ""),
                    refer, *[probs.get(c, "") for c in class_names],
                    "" if row.get("threshold") is None else row["threshold"],
                    row.get("error") or row.get("message") or ""])
        sys.stdout.flush()
    return write
