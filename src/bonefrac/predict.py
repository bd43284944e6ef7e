"""Checkpoint -> probabilities for images: the one predictor behind predict, evaluate, explain and serve.

    predictor = load_predictor(["runs/a/best"])       # or several paths for an ensemble
    probs = predictor.predict_arrays([read_image(p)])  # (n, K), calibrated
    labels = decide(probs, predictor.positive_index, predictor.threshold)

Everything the predictor needs (architecture, classes, preprocessing, temperature, threshold) comes from the
checkpoint's JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, modelid, shipped
from .data import progress_bar
from .errors import BonefracError, ImageReadError
from .io import image_files, printable_path, read_image_and_colour
from .transforms import hflip, normalize, resize_batch, to_unit

log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "fracatlas_effnet_lite"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a --device value: "auto" (this process's GPU, else the CPU), "cpu", "cuda", "cuda:N"
    or "mps"; BonefracError, before any work starts, for a name this machine cannot run on."""
    kind, index = parse_device(name)
    if kind == "auto":
        return torch.device(f"cuda:{_local_rank()}" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BonefracError(f"device '{name}' requested but CUDA is not available")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise BonefracError(f"device '{name}' requested but this machine has {count} CUDA device(s) "
                                f"(cuda:0 to cuda:{count - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BonefracError(f"device '{name}' requested but Apple MPS is not available")
    return torch.device(name)


DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def parse_device(name: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda" | "mps", GPU index or None) for a --device value, checked by its form only (the
    ONNX backend asks ONNX Runtime, not torch, whether it can use a GPU); BonefracError for any other name."""
    kind, colon, index = str(name).partition(":")
    if kind in ("auto", "cpu", "cuda", "mps") and not colon:
        return kind, None
    if kind == "cuda" and index.isdigit() and index.isascii():
        return kind, int(index)
    raise BonefracError(f"unknown device '{name}'; use {DEVICE_NAMES}")


def _local_rank() -> int:
    """The GPU of this process under torchrun ($LOCAL_RANK), else 0."""
    raw = os.environ.get("LOCAL_RANK")
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise BonefracError(f"LOCAL_RANK={raw!r} is not a whole number (it names this process's GPU under "
                            "torchrun); unset it or pass --device cuda:N") from None


def uses_autocast(device: torch.device, amp: bool = True) -> bool:
    """Whether an inference forward on `device` runs under bf16 autocast (on CUDA when `amp`); explain asks, to
    know whether its float32 Grad-CAM forward also gives predict's probabilities."""
    return amp and device.type == "cuda"


def forward_precision(device: torch.device, amp: bool = True):
    """The autocast context an inference forward runs in: bf16 where `uses_autocast`, else float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_autocast(device, amp))


def model_input(model, x: torch.Tensor, prep: dict) -> torch.Tensor:
    """The normalised float input for a uint8 (B, 1, S, S) batch, in the model's memory format."""
    inp = normalize(to_unit(x), prep["mean"], prep["std"], prep["channels"])
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        inp = inp.contiguous(memory_format=torch.channels_last)
    return inp


@torch.no_grad()
def infer_logits(model, x: torch.Tensor, prep: dict, amp: bool = True, tta: bool = False) -> torch.Tensor:
    """Float32 logits for a uint8 (B, 1, S, S) batch already at the model's size, on the model's device."""
    inp = model_input(model, x, prep)
    with forward_precision(inp.device, amp):
        logits = model(inp).float()
        if tta:
            logits = with_flipped_view(model, inp, logits)
    return logits


def with_flipped_view(model, inp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation as predict combines it: `logits` (float32, of the model input `inp`) averaged with
    the logits of its horizontally flipped view. Runs in the caller's grad and precision context; explain calls
    it with its own unflipped float32 logits, so the combination must live in one place."""
    return (logits + model(hflip(inp)).float()) / 2


def fused_kernels_wanted() -> bool:
    """Whether ConvNeXt V2 models on CUDA run the fused MLP/GRN kernels (bonefrac.kernels): yes unless
    $BONEFRAC_FUSED_KERNELS is "0", "false", "no" or "off" (the kernels are checked against timm on a GPU by
    tests/test_kernels.py; speed-ups in benchmarks/RESULTS.md)."""
    return os.environ.get("BONEFRAC_FUSED_KERNELS", "").strip().lower() not in ("0", "false", "no", "off")


def _has_grn_mlp(model) -> bool:
    """True for models with Global Response Norm MLPs (ConvNeXt V2), the only ones the fused kernels change."""
    return any(type(m).__name__ == "GlobalResponseNormMlp" for m in model.modules())


def decide(probs: np.ndarray, positive_index: int | None, threshold: float | None) -> np.ndarray:
    """Predicted class indices: the validation-chosen threshold on the positive class, else the argmax."""
    if positive_index is not None and threshold is not None and probs.shape[1] == 2:
        return np.where(probs[:, positive_index] >= threshold, positive_index, 1 - positive_index)
    return probs.argmax(axis=1)


class Predictor:
    """One checkpoint: uint8 images in, temperature-calibrated probabilities out."""

    def __init__(self, model, meta: dict, device: torch.device, tta: bool = False, batch_size: int = 32):
        self.model, self.meta, self.device, self.tta, self.batch_size = model, meta, device, tta, batch_size
        self.prep = meta["preprocess"]
        self.size = int(self.prep["size"])
        self.class_names = list(meta["class_names"])
        self.temperature = float(meta.get("temperature") or 1.0)
        self.threshold = meta.get("threshold")
        self.positive_index = meta.get("positive_index")
        self.path: Path | None = None  # the checkpoint folder, when loaded from one
        self._version: str | None = None  # set by from_checkpoint; a model built in memory hashes its weights

    @classmethod
    def from_checkpoint(cls, path, device: str = "auto", tta: bool = False, batch_size: int = 32):
        dev = resolve_device(device)
        model, meta = checkpoint.load(path, dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            if fused_kernels_wanted() and _has_grn_mlp(model):  # Triton is imported only then
                from .kernels import fuse_for_inference

                fuse_for_inference(model)
        predictor = cls(model, meta, dev, tta, batch_size)
        predictor.path = Path(path)
        # Hashed now, once: the files just loaded are the model answering every later request.
        predictor._version = modelid.checkpoint_version(checkpoint.recover(path), meta)
        return predictor

    @property
    def version(self) -> str:
        """`<arch>@<8 hex>` of the weights and the saved decision fields (see bonefrac.modelid)."""
        if self._version is None:
            self._version = modelid.module_version(self.model, self.meta)
        return self._version

    def logits_uint8(self, x: torch.Tensor) -> np.ndarray:
        """Logits for uint8 (B, 1, S, S) at this model's size (a progress bar when that takes many batches)."""
        out = []
        with progress_bar(len(x), "infer", enabled=len(x) >= 8 * self.batch_size) as bar:
            for i in range(0, len(x), self.batch_size):
                out.append(infer_logits(self.model, x[i:i + self.batch_size].to(self.device), self.prep, tta=self.tta))
                bar.update(len(out[-1]))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(self.class_names)), np.float32)

    def probs_uint8(self, x: torch.Tensor) -> np.ndarray:
        return self.calibrated(self.logits_uint8(x))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """(n, K) probabilities from this model's logits: temperature, then softmax in float64."""
        return _softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, K) probabilities for decoded 2-D uint8 images of any size."""
        return self.probs_uint8(resize_batch(images, self.size))


class Ensemble:
    """Several predictors with weights (fitted on validation); the same interface as Predictor."""

    def __init__(self, members: list[Predictor], weights=None, threshold: float | None = None):
        """`weights`: non-negative, one per member (equal by default); scaled to sum to 1, so the mix stays a
        probability whatever scale an ensemble.json gives them."""
        if len({tuple(m.class_names) for m in members}) != 1:
            listed = "; ".join(f"{m.path or f'member {i + 1}'}: {m.class_names}" for i, m in enumerate(members))
            raise BonefracError(f"ensemble members must share the same class names in the same order ({listed}); "
                                "retrain or re-prepare so that they do")
        self.members = members
        w = np.full(len(members), 1.0) if weights is None else np.asarray(weights, dtype=float)
        # Fitted weights already sum to 1 up to rounding: kept bit for bit, so the ensemble's version stays.
        self.weights = w if abs(w.sum() - 1.0) <= 1e-9 else w / w.sum()
        first = members[0]
        self.class_names, self.positive_index, self.size = first.class_names, first.positive_index, first.size
        self.threshold = first.threshold if threshold is None else threshold
        self.meta = {**first.meta, "ensemble": [m.meta["arch"] for m in members], "threshold": self.threshold}

    @property
    def version(self) -> str:
        """`<arch>+<arch>@<8 hex>` of the members' versions, the weights and the saved thresholds (its meta's)."""
        return modelid.ensemble_version([m.version for m in self.members], [m.meta["arch"] for m in self.members],
                                        self.weights, self.meta)

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        return self.combine([m.predict_arrays(images) for m in self.members])

    def combine(self, member_probs: list[np.ndarray]) -> np.ndarray:
        """The ensemble's (n, K) probabilities from its members' (in member order)."""
        return sum(w * p for w, p in zip(self.weights, member_probs))


ENSEMBLE_FILE = "ensemble.json"


def load_predictor(paths: list[str] | None, device: str = "auto", tta: bool = False, batch_size: int = 32):
    """A Predictor for one checkpoint, an Ensemble for several or for an ensemble directory (written by
    `bonefrac ensemble`: weights and thresholds fitted on validation), the shipped model for none."""
    paths = list(paths or [default_model_path()])
    if any((Path(p) / ENSEMBLE_FILE).is_file() for p in paths):
        if len(paths) > 1:
            raise BonefracError("an ensemble directory cannot be combined with other models; "
                                "build one ensemble from all members with `bonefrac ensemble`")
        return _load_ensemble_dir(Path(paths[0]), device, tta, batch_size)
    preds = [Predictor.from_checkpoint(p, device, tta, batch_size) for p in paths]
    return preds[0] if len(preds) == 1 else Ensemble(preds)


def _load_ensemble_dir(path: Path, device: str, tta: bool, batch_size: int) -> Ensemble:
    spec = _ensemble_spec(path / ENSEMBLE_FILE)
    # Outside the spec's checks: a member's own error (a broken bonefrac.json, say) names that member.
    members = [Predictor.from_checkpoint(path / m, device, tta, batch_size) for m in spec["members"]]
    if members[0].class_names != list(spec.get("class_names") or members[0].class_names):
        raise BonefracError(f"{path}: the members' class names differ from those in {ENSEMBLE_FILE}")
    for name, member, fitted in zip(spec["members"], members, spec.get("member_versions") or [None] * len(members)):
        if fitted is not None and member.version != fitted:  # e.g. a member calibrated after the fit
            raise BonefracError(f"{path / name} changed after the ensemble's weights and threshold were fitted "
                                f"(version {fitted} then, {member.version} now); rebuild it with `bonefrac ensemble`")
    ens = Ensemble(members, spec.get("weights"), spec.get("threshold"))
    # The ensemble's own validation-chosen points replace the first member's.
    ens.meta.update(operating_points=spec.get("operating_points"), ensemble_dir=str(path),
                    threshold=ens.threshold)
    return ens


def _ensemble_spec(file: Path) -> dict:
    """The checked contents of an ensemble.json; BonefracError naming the file and the faulty field."""
    import json

    try:
        spec = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BonefracError(f"{file}: cannot be read as JSON ({exc})") from None
    problem = _ensemble_problem(spec)
    if problem:
        raise BonefracError(f"{file}: not a valid ensemble description: {problem}; rebuild it with "
                            "`bonefrac ensemble`")
    return spec


def _ensemble_problem(spec) -> str | None:
    """What is wrong with a parsed ensemble.json, or None."""
    if not isinstance(spec, dict):
        return "expected a JSON object"
    members, weights, threshold = spec.get("members"), spec.get("weights"), spec.get("threshold")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        return f"'members' must be a non-empty list of member folders, got {members!r}"
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(members):
            return f"'weights' must hold one number per member ({len(members)}), got {weights!r}"
        if not all(checkpoint.is_number(w) and 0 <= w < np.inf for w in weights) or sum(weights) <= 0:
            return f"'weights' must be finite and non-negative with a positive sum, got {weights!r}"
    versions = spec.get("member_versions")
    if versions is not None and (not isinstance(versions, list) or len(versions) != len(members)
                                 or not all(isinstance(v, str) for v in versions)):
        return f"'member_versions' must hold one version string per member ({len(members)}), got {versions!r}"
    if threshold is not None and not checkpoint.is_threshold(threshold):
        return f"'threshold' must be a number from 0 to 1, got {threshold!r}"
    return None


def default_model_path() -> Path:
    """The model to use when none is named, a checkpoint or ensemble directory: $BONEFRAC_MODEL, else the shipped
    models/<DEFAULT_MODEL_NAME> of the source checkout, else its copy inside the installed package (in the order
    of shipped.candidates). BonefracError, naming where it looked, when there is none."""
    env = os.environ.get("BONEFRAC_MODEL")
    if env:
        return _model_from_env(env)
    path = shipped.find(DEFAULT_MODEL_NAME, checkpoint.META_FILE, ENSEMBLE_FILE)
    if path is None:
        looked = " or ".join(str(p) for p in shipped.candidates(DEFAULT_MODEL_NAME))
        raise BonefracError(f"no model named and no shipped model at {looked}; pass --model CKPT "
                            "or set BONEFRAC_MODEL")
    return path


def _model_from_env(env: str) -> Path:
    path = Path(env)
    if path.is_file():
        raise BonefracError(f"BONEFRAC_MODEL={env} is a file; this command needs a checkpoint or ensemble "
                            "directory (exported .onnx / TorchScript files are for `bonefrac serve`)")
    if not any((path / name).is_file() for name in (checkpoint.META_FILE, ENSEMBLE_FILE)):
        raise BonefracError(f"no model named and no model at BONEFRAC_MODEL={env}; pass --model CKPT "
                            "or set BONEFRAC_MODEL to a checkpoint or ensemble directory")
    return path


def _softmax(logits: np.ndarray) -> np.ndarray:
    # float64 like metrics.softmax, which chose the thresholds: a float32 copy of a score that equals the
    # threshold could land just below it.
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expand_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded recursively to their image and DICOM files (sorted)."""
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                log.warning("%s: folder holds no image files", path)
            out.extend(found)
        else:
            out.append(path)  # missing files become error rows, not a crash
    return out


def predict_files(predictor, inputs: list[str], batch_size: int = 32, xray_check: bool = True,
                  refer_margin: float = 0.15):
    """Yield one dict per file, in input order, with a `status`:
    "ok": prediction, confidence, probabilities, `refer` (probability close to the threshold: review it) and the
    `threshold` that decided (None for multi-class models, which predict the most probable class);
    "not_xray": the image fails the radiograph check (a photo, document, blank or noise), `message` says why,
    and no prediction is given; "error": `error` names the problem (unreadable, missing, too large), or `message`
    says the model's output was not finite. Rows without a prediction have `refer` true, as in the service: a
    reviewer filtering on it sees them too. `path` is printable (see io.printable_path). A progress bar over all
    the files shows on stderr when that is a terminal."""
    from .backends import prediction_rows  # backends imports this module

    paths = expand_paths(inputs)
    # One bar over all the files (the model sees at most a batch at a time, too few for a bar of its own).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            progress_bar(len(paths), "predict", enabled=_on_terminal(sys.stderr)) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            read = list(pool.map(lambda p: _read_checked(p, xray_check), chunk))
            good = [img for img, problem in read if problem is None]
            probs = predictor.predict_arrays(good) if good else np.zeros((0, len(predictor.class_names)))
            results = iter([{**row, "threshold": predictor.threshold}
                            for row in prediction_rows(probs, predictor, refer_margin)])
            bar.update(len(chunk))
            for path, (_, problem) in zip(chunk, read):
                yield {"path": printable_path(path), **(problem if problem is not None else next(results))}


def _on_terminal(stream) -> bool:
    """Whether `stream` is a terminal: a progress bar there, none in a log file or pipe (nor without stderr)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _read_checked(path: Path, xray_check: bool):
    """(grey image, None), or (None, the row fields saying why there is no prediction)."""
    from .backends import check_radiograph, colourfulness

    try:
        gray, thumb = read_image_and_colour(path)
    except ImageReadError as exc:
        return None, {"status": "error", "refer": True, "error": exc.reason}  # a case nobody has assessed yet
    if xray_check:
        check = check_radiograph(gray, colourfulness(thumb) if thumb is not None else 0.0)
        if not check.ok:
            return None, {"status": "not_xray", "refer": True, "message": check.reason}
    return gray, None
