"""The decoded image cache and batch iteration for training and evaluation.

Every image is decoded once (by `io.read_image`) and resized to a square of `size` pixels into a uint8
memory-mapped file, `<cache_dir>/<key>.u8`. The key hashes the manifest rows (path + sha256) and the size, so a
changed manifest or resolution builds a new cache; a cache whose build was killed has no `.json` and is rebuilt.
`Batches` then serves index batches straight from that array: on a GPU the whole cache usually fits in device
memory and a batch is one gather, so the input pipeline never keeps the model waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .config import SAMPLERS, one_of_error
from .errors import BonefracError, ImageReadError
from .io import read_image, resize_gray

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_key(paths: list[str], hashes: list[str], size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}".encode())
    for path, digest in zip(paths, hashes):
        h.update(f"|{path}|{digest}".encode())
    return h.hexdigest()[:24]


def _decode(args):
    path, size = args
    try:
        return resize_gray(read_image(path), size), None
    except ImageReadError as exc:
        return None, str(exc)


def build_cache(paths: list[str], hashes: list[str], size: int, cache_dir: str | Path, workers: int = 0,
                progress: bool = True) -> np.ndarray:
    """A read-only (N, size, size) uint8 memmap of the images, built (in parallel) only when missing.

    A cache whose file no longer matches the record written beside it (size, and a hash of up to 64 images
    spread over it) is rebuilt with a warning; build files left by killed builds (no one holds their lock) are
    removed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, hashes, size)
    data_file, done_file = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (len(paths), size, size)
    if done_file.is_file() and data_file.is_file():
        if _matches_record(data_file, done_file, shape):
            return np.memmap(data_file, dtype=np.uint8, mode="c", shape=shape)  # "c": writable, file untouched
        log.warning("cache %s does not match its record (changed on disk since it was built); rebuilding",
                    data_file.name)
    log.info("decoding %d images into cache %s (%d px)", len(paths), data_file.name, size)
    _remove_orphaned_parts(cache_dir)
    # Built under a name of its own and renamed when complete: two processes building the same cache (a sweep,
    # or train and evaluate on one manifest) must never truncate or half-fill the file the other one trusts.
    part_file = cache_dir / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    try:
        with _build_lock(part_file):  # held until the rename: an unlocked part file is an orphan
            errors = _decode_into(part_file, paths, size, workers or os.cpu_count() or 1, progress)
            if errors:
                raise BonefracError(f"{len(errors)} manifest image(s) could not be read (re-run prepare): "
                                    f"{errors[0]}")
            os.replace(part_file, data_file)
    finally:
        part_file.unlink(missing_ok=True)  # a failed or interrupted build leaves nothing behind
    done_file.write_text(json.dumps({"n": len(paths), "size": size, "version": CACHE_VERSION,
                                     "sample_sha256": _sample_hash(data_file, shape)}))
    return np.memmap(data_file, dtype=np.uint8, mode="c", shape=shape)  # "c": writable view, file untouched


def _sample_hash(data_file: Path, shape: tuple) -> str:
    """SHA-256 of up to 64 images spread evenly over the cache (first and last included): cheap to check on
    every run, and a zeroed, swapped or partly rewritten file fails it."""
    arr = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
    h = hashlib.sha256()
    for i in np.unique(np.linspace(0, shape[0] - 1, min(shape[0], 64)).round().astype(int)):
        h.update(arr[i].tobytes())
    return h.hexdigest()


def _matches_record(data_file: Path, done_file: Path, shape: tuple) -> bool:
    if data_file.stat().st_size != int(np.prod(shape)):
        return False
    try:
        record = json.loads(done_file.read_text())
    except (OSError, ValueError):
        return False
    # Caches built before the hash was recorded are trusted on their size, as they were then.
    return "sample_sha256" not in record or record["sample_sha256"] == _sample_hash(data_file, shape)


@contextlib.contextmanager
def _build_lock(part_file: Path):
    """Hold an exclusive advisory lock on the new `part_file` while it is built: the lock dies with the process,
    so a part file nobody holds was left by a killed build (whatever machine or container shares the folder)."""
    with open(part_file, "wb") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def _remove_orphaned_parts(cache_dir: Path) -> None:
    """Delete build files whose builder is gone (a SIGKILL or power loss skips the cleanup in build_cache): those
    whose lock can be taken. Without flock (Windows) nothing is removed."""
    if fcntl is None:
        return
    for part in cache_dir.glob("*.part"):
        try:
            with open(part, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a build in progress (or unreadable): leave it
            continue
        log.info("removing %s, left by a cache build that was killed", part.name)
        part.unlink(missing_ok=True)


def _decode_into(part_file: Path, paths: list[str], size: int, workers: int, progress: bool) -> list[str]:
    """Decode every image into a new (N, size, size) uint8 file; returns the errors."""
    arr = np.memmap(part_file, dtype=np.uint8, mode="w+", shape=(len(paths), size, size))
    errors = []
    with progress_bar(len(paths), "decode", progress) as bar:
        for i, (img, err) in enumerate(_map(_decode, [(p, size) for p in paths], workers)):
            if err:
                errors.append(err)
            else:
                arr[i] = img
            bar.update(1)
    arr.flush()
    return errors


def box_masks(rows, boxes_csv: str | Path, size: int, negative_label: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Lesion masks for manifest `rows` (path, label, width, height) from a boxes CSV (image, x, y, w, h).

    Returns `(masks, known)`: uint8 (N, size, size), 1 inside any box of the image stretched to a square like
    the image cache, and float32 (N,) 1 where the mask is known: the image has boxes, or its label is
    `negative_label` (nothing to find). Other images (e.g. fractured but unannotated) get weight 0. Boxes are
    clipped to their image; ones wholly outside are ignored (warned). BonefracError, naming the CSV row, for a
    box with a missing or non-numeric coordinate or a width/height <= 0.
    """
    import pandas as pd

    from .manifest import read_csv

    boxes_csv = Path(boxes_csv)
    boxes = read_csv(boxes_csv)
    missing = {"image", "x", "y", "w", "h"} - set(boxes.columns)
    if missing:
        raise BonefracError(f"{boxes_csv}: boxes CSV lacks column(s) {', '.join(sorted(missing))}")
    base = boxes_csv.resolve().parent
    keys = [str((base / p).resolve()) for p in boxes["image"].astype(str)]
    index = {str(Path(p).resolve()): i for i, p in enumerate(rows["path"])}
    masks = np.zeros((len(rows), size, size), dtype=np.uint8)
    known = (rows["label"].to_numpy() == negative_label).astype(np.float32)
    width, height = rows["width"].to_numpy(float), rows["height"].to_numpy(float)
    coords = pd.DataFrame({c: pd.to_numeric(boxes[c], errors="coerce") for c in "xywh"}).to_numpy(float)
    bad = ~np.isfinite(coords).all(axis=1) | (coords[:, 2] <= 0) | (coords[:, 3] <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise BonefracError(f"{boxes_csv}: {int(bad.sum())} box(es) with a missing or non-numeric coordinate or a "
                            f"width/height <= 0 (the first is data row {first + 1}: {boxes['image'].iloc[first]})")
    matched = outside = 0
    for key, (x, y, w, h) in zip(keys, coords):
        i = index.get(key)
        if i is None:
            continue
        matched += 1
        sx, sy = size / width[i], size / height[i]
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1, y1 = max(x0 + 1, int(np.ceil((x + w) * sx))), max(y0 + 1, int(np.ceil((y + h) * sy)))
        x0, x1, y0, y1 = (int(np.clip(v, 0, size)) for v in (x0, x1, y0, y1))
        if x1 <= x0 or y1 <= y0:  # wholly outside the image: no evidence of where the fracture is
            outside += 1
            continue
        masks[i, y0:y1, x0:x1] = 1
        known[i] = 1.0
    if outside:
        log.warning("%s: %d box(es) lie wholly outside their image; ignored", boxes_csv, outside)
    if matched == 0:
        raise BonefracError(f"{boxes_csv}: no box matches an image of the manifest (paths are read relative to "
                            f"the CSV's folder)")
    return masks, known


def _map(fn, jobs, workers):
    if workers <= 1 or len(jobs) < 64:
        yield from map(fn, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(fn, jobs, chunksize=32)
    finally:
        pool.shutdown()


def progress_bar(total: int, desc: str, enabled: bool):
    """A transient tqdm bar counting images (a no-op when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


class Batches:
    """Index batches over a cache array with labels, placed on `device`.

    `epoch(gen)` yields `(images uint8 (B, 1, S, S), labels int64 (B,))`, and with `masks` (the pair from
    `box_masks`) also `(masks uint8 (B, 1, M, M), mask weights float (B,))`. With `rank`/`world` each process of a
    distributed run takes every world-th index of the same permutation, so ranks never see the same image.
    """

    def __init__(self, cache: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 sampler: str = "shuffle", device_cache_gib: float = 8.0, rank: int = 0, world: int = 1,
                 drop_last: bool = True, masks: tuple[np.ndarray, np.ndarray] | None = None):
        self.labels = torch.as_tensor(np.array(labels), dtype=torch.long)
        self.batch_size, self.device, self.sampler = batch_size, device, sampler
        self.rank, self.world, self.drop_last = rank, world, drop_last
        on_gpu = device.type == "cuda" and cache.nbytes <= device_cache_gib * 2**30
        self.masks = None if masks is None else (torch.from_numpy(masks[0]), torch.as_tensor(masks[1]))
        if on_gpu:
            self.images = torch.from_numpy(np.ascontiguousarray(cache)).to(device)
            self.labels = self.labels.to(device)
            if self.masks is not None:
                self.masks = tuple(t.to(device) for t in self.masks)
        else:
            self.images = torch.from_numpy(np.asarray(cache))
        self.on_device = on_gpu or device.type == "cpu"

    def __len__(self) -> int:
        per_rank = len(self.labels) // self.world
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _order(self, gen: torch.Generator | None) -> torch.Tensor:
        n = len(self.labels)
        if gen is None:
            return torch.arange(n)
        if self.sampler == "balanced":
            labels = self.labels.cpu()
            counts = torch.bincount(labels).float()
            weights = (1.0 / counts)[labels]
            return torch.multinomial(weights, n, replacement=True, generator=gen)
        if self.sampler not in SAMPLERS:
            raise BonefracError(one_of_error("data.sampler", self.sampler, SAMPLERS))
        return torch.randperm(n, generator=gen)

    def epoch(self, gen: torch.Generator | None = None):
        """One pass; `gen=None` gives every image once in order (evaluation), else a random order."""
        order = self._order(gen)
        order = order[self.rank::self.world][: len(self.labels) // self.world if gen is not None else None]
        if self.on_device:  # one copy per epoch; per-batch index copies would synchronise with the GPU
            order = order.to(self.images.device)
        step = self.batch_size
        stop = len(order) - (len(order) % step if self.drop_last and gen is not None else 0)
        for start in range(0, stop, step):
            idx = order[start:start + step]
            yield self._gather(idx)

    def _gather(self, idx: torch.Tensor):
        masks = () if self.masks is None else (self.masks[0][idx].unsqueeze(1), self.masks[1][idx])
        if self.on_device:
            return self.images[idx].unsqueeze(1), self.labels[idx], *masks
        # Host cache too large for the GPU: gather on the host, copy from pinned memory without blocking.
        parts = (self.images[idx].unsqueeze(1), self.labels[idx], *masks)
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in parts)
