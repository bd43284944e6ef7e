"""Self-describing checkpoint directories: `model.safetensors` (weights) + `bonefrac.json` (everything else).

`save(dir, model, meta)` writes atomically (a temporary sibling renamed into place), so a run killed mid-save
never leaves a half-written checkpoint; a kill between the swap's two renames leaves `dir.tmp` / `dir.old`,
which the readers here put back in place (`recover`). `load(dir)` rebuilds the model from the JSON alone:
predict, evaluate, export and serve never restate the architecture, classes, preprocessing or thresholds.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import BonefracError
from .io import write_atomically

META_FILE = "bonefrac.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
# "<split> <sha256>" per line for every train and val image the model was fitted or selected on: `evaluate` warns
# when it is asked to score any of them (a re-drawn split, another manifest of the same data).
SEEN_FILE = "seen_images.txt"
FORMAT_VERSION = 1
OWN_FILES = (META_FILE, WEIGHTS_FILE, STATE_FILE, SEEN_FILE)  # what `save` writes; anything else is another's
SIBLINGS = (".tmp", ".old")  # the swap's temporary names: `dir.tmp` (new, complete once its JSON is) and `dir.old`

log = logging.getLogger(__name__)


def save(path: str | Path, model: torch.nn.Module, meta: dict, train_state: dict | None = None,
         dtype: torch.dtype | None = None, seen: dict[str, str] | None = None, keep_other_files: bool = False) -> Path:
    """Write a checkpoint directory, replacing any at `path` (through a symbolic link: its target); `dtype` (e.g.
    torch.float16) shrinks floating weights for shipping; `seen` ({sha256: "train" or "val"}) lists the images the
    model learnt from or was selected on; `keep_other_files`: the files of an existing `path` that are not the
    checkpoint's own (a model card, say) are carried into the new one."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_symlink():  # the swap below would rename the link, not replace what it points to
        path = Path(os.path.realpath(path))
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {}
    for key, tensor in unwrap(model).state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor
    save_file(state, str(tmp / WEIGHTS_FILE))
    if train_state is not None:
        torch.save(train_state, tmp / STATE_FILE)
    if seen:
        write_seen(tmp, seen)
    if keep_other_files and path.is_dir():
        for item in path.iterdir():
            if item.name not in OWN_FILES:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    # The JSON goes last: a `.tmp` whose JSON parses is complete, which is how `recover` tells it apart.
    meta = {"format_version": FORMAT_VERSION, "code_version": __version__, **meta}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    _fsync(tmp)  # on disk before the renames: after a power loss `path` must not be a folder of empty files
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():  # two renames: at any instant either the old or the new checkpoint is complete
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent, files=False)  # the renames themselves, before the previous copy is deleted
    if old.exists():
        shutil.rmtree(old)
    return path


def _fsync(folder: Path, files: bool = True) -> None:
    """Flush `folder`'s files (with `files`) and the folder's own entries to disk; a no-op where folders cannot be
    opened (Windows)."""
    for item in (sorted(folder.iterdir()) if files else []) + [folder]:
        try:
            fd = os.open(item, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # some file systems refuse fsync on folders
            pass
        finally:
            os.close(fd)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def recover(path: str | Path) -> Path:
    """Put back a checkpoint that a kill between `save`'s two renames left as `path.tmp` / `path.old`.

    A complete `.tmp` (weights and parseable JSON) is the newer checkpoint, so it wins over `.old`. Returns the
    directory to read: `path`, or the sibling itself when it cannot be renamed (a read-only folder).
    """
    path = Path(path)
    if path.exists():
        return path
    if path.is_symlink():  # `save` swapped the link's target: its siblings lie beside the target
        path = Path(os.path.realpath(path))
    tmp, old = (path.with_name(path.name + s) for s in SIBLINGS)
    source = tmp if _complete(tmp) else old if (old / META_FILE).is_file() else None
    if source is None:
        return path
    try:
        os.replace(source, path)
    except OSError as exc:
        log.warning("%s is missing; reading %s in its place (cannot rename it: %s)", path, source, exc)
        return source
    log.warning("%s was missing (a save interrupted between renames); recovered it from %s", path, source.name)
    return path


def _complete(path: Path) -> bool:
    try:
        json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (path / WEIGHTS_FILE).is_file()


def write_seen(path: str | Path, seen: dict[str, str]) -> None:
    """Write `seen` ({sha256: split}) as `path`/SEEN_FILE, one "<split> <sha256>" line per image; atomically, since
    `calibrate` rewrites it inside a checkpoint in use (a torn list would hide images from the leakage checks)."""
    text = "".join(f"{split} {sha}\n" for sha, split in sorted(seen.items()))
    write_atomically(Path(path) / SEEN_FILE, lambda tmp: tmp.write_text(text))


def read_seen(path: str | Path) -> dict[str, str] | None:
    """{sha256: split} of the images a checkpoint was trained or selected on; None when it does not say (a
    checkpoint from before the list was kept, or a file stripped of it)."""
    file = recover(path) / SEEN_FILE
    if not file.is_file():
        return None
    seen = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in ("train", "val"):
            raise BonefracError(f"{file}, line {number}: expected '<train|val> <sha256>', got {line.strip()[:80]!r}; "
                                "the list of images this model saw is damaged, so overlap checks cannot be trusted "
                                "(restore the file from the run's checkpoint)")
        seen[fields[1]] = fields[0]
    return seen


def read_meta(path: str | Path) -> dict:
    """The checkpoint's JSON; a clear error when the directory is not a bonefrac checkpoint."""
    return _meta_of(recover(path))


def _meta_of(path: Path) -> dict:
    meta_file = path / META_FILE
    if path.is_file():
        raise BonefracError(f"{path} is a file; a bonefrac checkpoint is a directory ({WEIGHTS_FILE} + {META_FILE}). "
                            "Exported .onnx / TorchScript files are for `bonefrac serve`")
    if not meta_file.is_file():
        if not path.exists():
            raise BonefracError(f"{path}: no such checkpoint (the path does not exist)")
        if (path / "best" / META_FILE).is_file():
            raise BonefracError(f"{path} is a training run's folder, not a checkpoint: name {path / 'best'} (or "
                                f"{path / 'last'})")
        raise BonefracError(f"{path}: not a bonefrac checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise BonefracError(f"{meta_file}: corrupt checkpoint metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise BonefracError(f"{meta_file}: corrupt checkpoint metadata (a JSON object expected)")
    check_format(meta, meta_file)
    return meta


def check_format(meta: dict, where) -> None:
    """BonefracError when `meta` (the JSON of a checkpoint or exported file at `where`) was written in a newer
    format than this code reads: its fields may mean what this code would get wrong."""
    version = meta.get("format_version", 1)  # the first checkpoints did not record it
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BonefracError(f"{where}: format_version {version!r} is not a positive whole number")
    if version > FORMAT_VERSION:
        raise BonefracError(f"{where}: saved by a newer bonefrac (format version {version}; bonefrac {__version__} "
                            f"reads up to {FORMAT_VERSION}); upgrade bonefrac to use this model")


def load(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode with float32 weights on `device`, meta dict) from a checkpoint directory; BonefracError
    naming the checkpoint when its JSON lacks a field, was saved by a newer bonefrac or does not fit the weights."""
    from .models import create

    path = recover(path)
    meta = _meta_of(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BonefracError(f"{path}: checkpoint has no {WEIGHTS_FILE}")
    _check_fields(meta, path / META_FILE)
    try:
        model = create(meta["arch"], len(meta["class_names"]), meta["preprocess"]["channels"])
    except BonefracError as exc:  # an unknown architecture: say which checkpoint names it
        raise BonefracError(f"{path / META_FILE}: {exc}") from None
    _load_weights(model, weights, f"arch {meta['arch']}, {len(meta['class_names'])} classes")
    return model.to(device).eval(), meta


def _load_weights(model: torch.nn.Module, weights: Path, described: str) -> None:
    """Load the `weights` file into `model` as float32, every tensor or none; BonefracError naming the file, the
    model (`described`) and the first tensor that does not fit, instead of torch's list of hundreds."""
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for truncated or corrupt files
        raise BonefracError(f"{weights}: cannot be read ({exc}); the file is truncated or corrupt") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}
    mismatch = _first_mismatch(model.state_dict(), state)
    try:
        if mismatch is None:
            model.load_state_dict(state)
    except RuntimeError as exc:  # what the comparison above cannot foresee
        mismatch = str(exc).strip().splitlines()[-1].strip()
    if mismatch is not None:
        raise BonefracError(f"{weights.parent}: {WEIGHTS_FILE} does not fit the model {META_FILE} describes "
                            f"({described}): {mismatch}; the JSON was edited or belongs to other weights")


MAX_THRESHOLD = float(np.nextafter(1.0, 2.0))  # "predict nothing" above a saturated score of 1.0 (metrics._roc_pick)


def is_threshold(value) -> bool:
    """A decision threshold predict can use: a number from 0 to MAX_THRESHOLD (just above 1: "predict nothing")."""
    return is_number(value) and 0.0 <= value <= MAX_THRESHOLD


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_numbers(value) -> bool:
    return isinstance(value, (int, float, list)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A JSON number as a Python int or float (not a bool, which is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (field, check, what it must be): what `load` and the predictors read, in the order they are checked.
_FIELDS = (
    ("arch", lambda v: isinstance(v, str) and bool(v), "a timm architecture name"),
    ("class_names", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) and n for n in v),
     "a list of at least 2 class names"),
    ("preprocess", lambda v: isinstance(v, dict), "an object (size, channels, mean, std)"),
    ("preprocess.size", _is_count, "a positive whole number of pixels"),
    ("preprocess.channels", _is_count, "a positive whole number"),
    ("preprocess.mean", _is_numbers, "a number or a list of numbers"),
    ("preprocess.std", _is_numbers, "a number or a list of numbers"),
)


# Decision fields the predictors read when present (older checkpoints may lack them; None means "not fitted").
_DECISION_FIELDS = (
    ("temperature", lambda v, _: is_number(v) and 0 < v < np.inf, "a positive number"),
    ("threshold", lambda v, _: is_threshold(v), f"a number from 0 to 1 (or {MAX_THRESHOLD!r}: predict nothing)"),
    ("positive_index", lambda v, k: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < k,
     "the index of one of the class names"),
)


def _check_fields(meta: dict, meta_file: Path) -> None:
    """BonefracError naming `meta_file` and the field when a field `load` needs is missing or of the wrong type, or
    a decision field (temperature, threshold, positive class) holds what no prediction can use."""
    for field, ok, expected in _FIELDS:
        *parent, key = field.split(".")
        source = meta[parent[0]] if parent else meta  # "preprocess" itself was checked first
        if key not in source:
            raise BonefracError(f"{meta_file}: lacks '{field}' ({expected}); not a complete checkpoint")
        if not ok(source[key]):
            raise BonefracError(f"{meta_file}: '{field}' must be {expected}, got {source[key]!r}")
    for field, ok, expected in _DECISION_FIELDS:
        value = meta.get(field)
        if value is not None and not ok(value, len(meta["class_names"])):
            raise BonefracError(f"{meta_file}: '{field}' must be {expected}, got {value!r}; the JSON was edited or "
                                "damaged: restore it (a `bonefrac calibrate` keeps the earlier one as "
                                "bonefrac.json.bak) or correct the field by hand")


def _first_mismatch(expected: dict, state: dict) -> str | None:
    """The first tensor in which the saved `state` and a new model's `expected` state differ, in words; None when
    every tensor fits (what a strict load_state_dict needs)."""
    for key, tensor in expected.items():
        if key not in state:
            return f"tensor '{key}' is missing from the weights"
        if state[key].shape != tensor.shape:
            saved, wanted = list(state[key].shape), list(tensor.shape)
            return f"tensor '{key}' has shape {saved} in the weights, {wanted} in the model"
    extra = next((key for key in state if key not in expected), None)
    return None if extra is None else f"the weights hold tensor '{extra}', which the model has no place for"


def load_train_state(path: str | Path) -> dict:
    """Optimizer/scheduler/RNG state saved with a `last` checkpoint (loaded without executing pickled code)."""
    file = recover(path) / STATE_FILE
    if not file.is_file():
        raise BonefracError(f"{path}: no {STATE_FILE}; only a run's 'last' checkpoint can be resumed")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:  # truncated, unreadable
        raise BonefracError(f"{file}: cannot be read ({str(exc).splitlines()[0]}); the file is truncated or "
                            "corrupt, so this run cannot be resumed from it (best/ is separate); train into a new "
                            "--out") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
