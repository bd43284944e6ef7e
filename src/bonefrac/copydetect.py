"""A learned copy detector: embeddings under which freshly augmented copies of an X-ray lie close to it.

`prepare` uses it to find what the perceptual hash of dedup.py cannot: copies rotated by any small angle,
sheared, shifted, rescaled and re-contrasted by `augment.reference_transform` (docs/leakage.md).

    detector = load_detector(path)                    # a folder written by save_detector
    emb = embed_images(paths_or_arrays, detector)     # (N, D) float32, unit length
    pairs = copy_pairs(emb, detector.threshold)       # (M, 2) int64, i < j, as dedup.near_duplicate_pairs

The network is a timm trunk (EfficientNet-Lite0 by default, globally pooled) and a linear projection to `dim`
values, L2-normalised; input is the grey image stretched to a `size` square, replicated to 3 channels and
normalised with (x/255 - mean)/std. It is trained by scripts/train_copy_detector.py (instance discrimination:
two reference-augmented views of one image against all others in the batch), which also measures and stores
the cosine `threshold` and whether averaging an image's embedding with its mirror's (`flip_average`) helps.
A detector folder holds `model.safetensors` (fp16) and `copydetect.json`; loading needs no network.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import shipped
from .errors import BonefracError

log = logging.getLogger(__name__)

META_FILE, WEIGHTS_FILE = "copydetect.json", "model.safetensors"
FORMAT = "bonefrac-copydetect/1"
SHIPPED_NAME = "copy_detector"
ENV_VAR = "BONEFRAC_COPY_DETECTOR"
_REQUIRED = ("format", "arch", "size", "dim", "mean", "std", "threshold")


class CopyDetector(torch.nn.Module):
    """The embedding network plus what it needs at inference (`meta`: size, normalisation, threshold).

    `forward(x)` takes uint8 (B, 1, size, size) and returns float32 (B, dim) unit vectors; `embed_images`
    is the convenient entry point for files and arrays of any size.
    """

    def __init__(self, arch: str = "tf_efficientnet_lite0", dim: int = 128, size: int = 160, mean: float = 0.5,
                 std: float = 0.5, threshold: float | None = None, flip_average: bool = True, **info):
        super().__init__()
        from .models import create

        self.trunk = create(arch, num_classes=0)  # num_classes=0: timm returns the globally pooled features
        self.proj = torch.nn.Linear(self.trunk.num_features, dim)
        self.meta = {"format": FORMAT, "arch": arch, "size": int(size), "dim": int(dim), "mean": float(mean),
                     "std": float(std), "threshold": threshold, "flip_average": bool(flip_average), **info}

    @property
    def size(self) -> int:
        return self.meta["size"]

    @property
    def threshold(self) -> float | None:
        return self.meta["threshold"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .transforms import normalize, to_unit

        x = normalize(to_unit(x), [self.meta["mean"]], [self.meta["std"]], 3)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.proj(self.trunk(x)).float(), dim=1)


# --- saving, loading, the shipped detector ------------------------------------------------------------------


def save_detector(detector: CopyDetector, out_dir) -> Path:
    """Write `out_dir/model.safetensors` (fp16) and `out_dir/copydetect.json`; returns `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in detector.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps(detector.meta, indent=2, default=str) + "\n")
    return out


def load_detector(path, device="cpu") -> CopyDetector:
    """A detector folder -> CopyDetector in eval mode on `device`. Raises BonefracError naming the folder and
    the problem (missing, unreadable or incomplete JSON, missing or mismatched weights, no threshold)."""
    path = Path(path)
    if not path.is_dir():
        raise BonefracError(f"copy detector folder not found: {path}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise BonefracError(f"{path} is not a copy detector: {META_FILE} is missing") from None
    except (OSError, ValueError) as exc:
        raise BonefracError(f"copy detector {path}: cannot read {META_FILE} ({exc})") from None
    missing = [k for k in _REQUIRED if not isinstance(meta, dict) or meta.get(k) is None]
    if missing or meta.get("format") != FORMAT:
        raise BonefracError(f"copy detector {path}: {META_FILE} lacks {missing or ['format ' + FORMAT]}")
    if not (path / WEIGHTS_FILE).is_file():
        raise BonefracError(f"copy detector {path}: {WEIGHTS_FILE} is missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        detector = CopyDetector(**{k: v for k, v in meta.items() if k != "format"})
    except (BonefracError, TypeError, ValueError) as exc:
        raise BonefracError(f"copy detector {path}: {META_FILE} does not describe a network ({exc})") from None
    try:
        state = load_file(str(path / WEIGHTS_FILE))
        detector.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (SafetensorError, RuntimeError, OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BonefracError(f"copy detector {path}: weights do not load ({first})") from None
    return detector.to(_device(device)).eval()


def shipped_detector_path() -> Path | None:
    """The shipped detector: $BONEFRAC_COPY_DETECTOR, else models/copy_detector of the source checkout, else its
    copy inside the installed package (in the order of shipped.candidates); None when there is none (a set
    variable that names no detector folder is an error, not silently ignored)."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not (Path(env) / META_FILE).is_file():
            raise BonefracError(f"{ENV_VAR}={env}: no copy detector there ({META_FILE} missing)")
        return Path(env)
    return shipped.find(SHIPPED_NAME, META_FILE)


def resolve_detector(match_copies) -> Path | None:
    """`prepare`'s match_copies -> a detector folder, or None for off. None/"off": off; "auto": the shipped
    detector when there is one; anything else is a detector folder, which must exist."""
    if match_copies is None or str(match_copies) == "off":
        return None
    if str(match_copies) == "auto":
        path = shipped_detector_path()
        if path is None:  # e.g. a checkout without models/copy_detector
            log.warning("no copy detector found (%s, or $%s): freshly augmented copies (small rotations, crops) "
                        "are NOT matched, so leaks between splits may go unreported",
                        " or ".join(map(str, shipped.candidates(SHIPPED_NAME))), ENV_VAR)
        return path
    path = Path(match_copies)
    if not path.is_dir():
        raise BonefracError(f"copy detector folder not found: {path} (match_copies is auto, off or a folder)")
    if not (path / META_FILE).is_file():
        raise BonefracError(f"{path} is not a copy detector: {META_FILE} is missing (match_copies is auto, off or a "
                            "detector folder)")
    return path


# --- embedding and pairing ----------------------------------------------------------------------------------


def embed_images(items, detector: CopyDetector, batch_size: int = 64, device=None, workers: int | None = None,
                 progress: bool = True) -> np.ndarray:
    """(N, dim) float32 unit embeddings of image files or 2-D uint8 arrays (any size), in order.

    Files are read with io.read_image (ImageReadError names a bad one) by `workers` threads, a batch at a time;
    `device` defaults to the detector's. With `meta["flip_average"]` an image and its mirror are averaged,
    which makes the embedding exactly invariant to horizontal flips at twice the cost.
    """
    from .data import progress_bar
    from .io import read_image, resize_gray
    from .transforms import hflip

    device = _device(device) if device is not None else next(detector.parameters()).device
    detector = detector.to(device).eval()
    size, flip = detector.size, detector.meta.get("flip_average", False)

    def load(item) -> np.ndarray:
        img = item if isinstance(item, np.ndarray) else read_image(item)
        return resize_gray(img, size)

    items = list(items)
    out = np.zeros((len(items), detector.meta["dim"]), dtype=np.float32)
    workers = max(1, min(8, workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, torch.inference_mode(), \
            progress_bar(len(items), "copy embeddings", progress and len(items) > batch_size) as bar:
        for start in range(0, len(items), batch_size):
            x = torch.from_numpy(np.stack(list(pool.map(load, items[start:start + batch_size]))))[:, None]
            x = x.to(device)  # float32 throughout (no autocast): the same cosines on CPU and GPU
            z = detector(x)
            if flip:
                z = F.normalize(z + detector(hflip(x)), dim=1)
            out[start:start + len(x)] = z.float().cpu().numpy()
            bar.update(len(x))
    return out


def copy_pairs(emb: np.ndarray, threshold: float, block: int = 512) -> np.ndarray:
    """(M, 2) int64 index pairs i < j whose embeddings (unit rows of `emb`) have cosine >= `threshold`.

    Compares `block` rows at a time against the rows after them, so memory stays at block x N floats.
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for start in range(0, n, block):
        rows = emb[start:start + block]
        sims = rows @ emb[start:].T  # columns start at `start`: only j >= i is ever needed
        ii, jj = np.nonzero(sims >= threshold)
        ii, jj = ii + start, jj + start
        keep = jj > ii
        found.append(np.stack([ii[keep], jj[keep]], axis=1).astype(np.int64))
    return np.concatenate(found)


def _device(name) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
