"""The decoded image cache that training and evaluation read (`build_cache`).

Every image is decoded once (by `io.read_image`) and resized to a square of `size` pixels into a uint8
memory-mapped file, `<cache_dir>/<key>.u8`. The key hashes the manifest rows (path + sha256), the size and the
decoder (`decoder_fingerprint`), so a changed manifest, resolution or decoder (an upgrade of bonefrac, Pillow or
pydicom) builds a new cache; a cache whose build was killed has no `.json` and is rebuilt.
Each file's bytes are checked against the manifest's sha256 as they are decoded, and a reused cache re-checks
the files whose size or times changed since (an image replaced after prepare would otherwise be trained on under
its old label): a changed file stops the run with the list of changed files. `data.Batches` serves batches from it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL

from .data import progress_bar
from .errors import BonefracError, ImageReadError
from .io import decode_image, file_sha256, read_bytes, resize_gray

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_RECORD_EVERY_S = 60.0  # how often a long re-check of a reused cache records the files it found unchanged
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def cache_key(paths: list[str], hashes: list[str], size: int) -> str:
    """The cache's file name stem: changes with the rows, the size and the decoder (old pixels are never reused)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{decoder_fingerprint()}".encode())
    for path, digest in zip(paths, hashes):
        h.update(f"|{path}|{digest}".encode())
    return h.hexdigest()[:24]


@functools.cache
def decoder_fingerprint() -> str:
    """A short hash that changes whenever the pixels decoded from one file may change: the source text of io.py
    and dicom.py, and the Pillow and pydicom versions. Caches of decoded pixels put it in their key, so
    an upgrade rebuilds them rather than training on old pixels while prediction decodes new ones."""
    h = hashlib.sha256()
    for module in ("io", "dicom"):
        h.update(_source_bytes(module))
    h.update(f"|Pillow {PIL.__version__}|pydicom {_version('pydicom')}".encode())
    return h.hexdigest()[:16]


def _source_bytes(module: str) -> bytes:
    """bonefrac.<module>'s source text, or, where no source file ships (a zip or frozen build), its compiled
    code: either changes when the decoding does."""
    import marshal

    name = f"bonefrac.{module}"
    loader = importlib.import_module(name).__loader__
    try:  # a file on disk or inside a zip archive
        return loader.get_data(loader.get_filename(name))
    except (OSError, ImportError, AttributeError, TypeError, ValueError):
        return marshal.dumps(loader.get_code(name))


def _version(package: str) -> str:
    try:  # metadata only: importing pydicom just for its version would slow every start
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _decode(job):
    """-> (image, None, stamp), or (None, problem, None) with problem ("changed", path) or ("unreadable", why)."""
    path, digest, size = job
    try:
        stamp = _stamp(path)  # before reading: a change after this shows up in the next run's check
    except OSError:
        stamp = None  # read_bytes below says why
    try:
        data = read_bytes(path)
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            return None, ("changed", path), None
        return resize_gray(decode_image(data, path), size), None, stamp
    except ImageReadError as exc:
        return None, ("unreadable", str(exc)), None


def _stamp(path) -> list[int]:
    """What tells a file changed without reading it: size, modification and status-change times (ns)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _digests(hashes: list[str]) -> list[str | None]:
    """The manifest's sha256 cells as lower-case hex digests; None for a cell that is not one (a hand-made
    manifest), whose file cannot be checked (warned once)."""
    digests = [h.strip().lower() if isinstance(h, str) and _HEX64.fullmatch(h.strip()) else None for h in hashes]
    if unchecked := sum(d is None for d in digests):
        log.warning("%d of %d manifest row(s) have no SHA-256 digest in their sha256 cell: their files cannot be "
                    "checked for changes since prepare (make manifests with `bonefrac prepare`)",
                    unchecked, len(digests))
    return digests


def build_cache(paths: list[str], hashes: list[str], size: int, cache_dir: str | Path, workers: int = 0,
                progress: bool = True, beat=None) -> np.ndarray:
    """A read-only (N, size, size) uint8 memmap of the images, built (in parallel) only when missing.

    Raises BonefracError, listing the files, when an image's bytes differ from its manifest sha256 (replaced
    since prepare: when building, or for a reused cache, when the file's size or times changed and its hash
    differs) or an image cannot be read. A cache whose file no longer matches the record written beside it
    (size, and a hash of up to 64 images spread over it) is rebuilt with a warning; build files left by killed
    builds (no one holds their lock) are removed. `beat()` is called after each image decoded or re-checked.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, hashes, size)
    data_file, done_file = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (len(paths), size, size)
    digests = _digests(hashes)
    if done_file.is_file() and data_file.is_file():
        record = _read_record(done_file)
        if record is not None and _matches_record(data_file, record, shape):
            _check_unchanged(paths, digests, record, done_file, beat)
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
            arr = _new_cache_file(part_file, shape, data_file)
            stamps, changed, errors = _decode_into(arr, paths, digests, size, workers or os.cpu_count() or 1,
                                                   progress, beat)
            if changed or errors:
                raise _unusable_images(changed, errors)
            os.replace(part_file, data_file)
    finally:
        part_file.unlink(missing_ok=True)  # a failed or interrupted build leaves nothing behind
    _write_record(done_file, {"n": len(paths), "size": size, "version": CACHE_VERSION,
                              "sample_sha256": _sample_hash(data_file, shape), "stamps": stamps})
    return np.memmap(data_file, dtype=np.uint8, mode="c", shape=shape)  # "c": writable view, file untouched


def _unusable_images(changed: list[str], errors: list[str]) -> BonefracError:
    """One error for the whole build, listing the changed files (each is also logged) and the unreadable ones."""
    for path in changed:
        log.error("changed since prepare (sha256 differs from the manifest's): %s", path)
    parts = []
    if changed:
        parts.append(f"{len(changed)} image(s) changed on disk since prepare (their sha256 differs from the "
                     f"manifest's): {_listing(changed)}; the manifest's labels, groups and splits describe the old "
                     "content, so re-run `bonefrac prepare` (into a new --out, or with --overwrite)")
    if errors:
        for err in errors:
            log.error("unreadable: %s", err)
        parts.append(f"{len(errors)} manifest image(s) could not be read (re-run prepare): {_listing(errors)}")
    return BonefracError("; ".join(parts))


def _listing(items: list[str], shown: int = 10) -> str:
    more = f" and {len(items) - shown} more (all are logged above)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _check_unchanged(paths: list[str], digests: list, record: dict, done_file: Path, beat=None) -> None:
    """For a reused cache: re-hash the files whose stamp differs from the build's (or all, for a cache recorded
    without stamps) and raise, listing them, when any differs from its manifest digest. Gone files only warn:
    the cache holds them as they were at prepare. New stamps are recorded, so the next run only stats. `beat()`
    after each file: after a `chmod -R` or a copy of the data set, the re-check reads all of it."""
    old = record.get("stamps") or []
    old = old if len(old) == len(paths) else [None] * len(paths)
    now, todo = [], []
    for i, path in enumerate(paths):
        try:
            now.append(_stamp(path))
        except OSError:
            now.append(None)
        if now[i] != old[i] and now[i] is not None and digests[i] is not None:
            todo.append(i)
        if beat is not None:
            beat()
    changed = _rehash(paths, digests, todo, now, {**record, "stamps": list(old)}, done_file, beat) if todo else []
    if changed:
        raise _unusable_images(changed, [])
    gone = [p for p, stamp in zip(paths, now) if stamp is None]
    if gone:
        log.warning("%d manifest image(s) are gone from disk or unreadable (the first: %s); the cache still holds "
                    "them as prepared (re-run prepare to drop them)", len(gone), gone[0])
    if todo:
        try:
            _write_record(done_file, {**record, "stamps": now})
        except OSError as exc:  # a read-only cache still serves; the next run re-checks these files again
            log.warning("could not update the cache record %s (%s): the same files are re-checked next time",
                        done_file, exc.strerror or exc)


def _rehash(paths: list[str], digests: list, todo: list[int], now: list, record: dict, done_file: Path,
            beat=None) -> list[str]:
    """The paths of the files `todo` (indices) whose sha256 differs from their manifest digest, `beat()` after each.
    The stamps (`now`) of those found unchanged go into `record` as the check goes, written every _RECORD_EVERY_S:
    a run stopped midway (a watchdog, a kill) re-hashes only the rest."""
    log.info("re-checking %d image(s) changed on disk since the cache was built against the manifest", len(todo))
    changed, written = [], time.monotonic()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        for i, digest in zip(todo, pool.map(lambda i: _file_sha256(paths[i]), todo)):
            if digest is not None and digest != digests[i]:
                changed.append(paths[i])
            elif digest is not None:  # None: unreadable now, so not checked
                record["stamps"][i] = now[i]
            if beat is not None:
                beat()
            if time.monotonic() - written >= _RECORD_EVERY_S:
                with contextlib.suppress(OSError):  # a read-only cache: the final update warns
                    _write_record(done_file, record)
                written = time.monotonic()
    return changed


def _file_sha256(path: str) -> str | None:
    """The file's hash, or None when it cannot be read now (reported as gone, not as changed)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _read_record(done_file: Path) -> dict | None:
    try:
        record = json.loads(done_file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(done_file: Path, record: dict) -> None:
    """Write the cache's record atomically: another process may be reading it."""
    tmp = done_file.with_name(f"{done_file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, done_file)
    finally:
        tmp.unlink(missing_ok=True)


def _sample_hash(data_file: Path, shape: tuple) -> str:
    """SHA-256 of up to 64 images spread evenly over the cache (first and last included): cheap to check on
    every run, and a zeroed, swapped or partly rewritten file fails it."""
    arr = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
    h = hashlib.sha256()
    for i in np.unique(np.linspace(0, shape[0] - 1, min(shape[0], 64)).round().astype(int)):
        h.update(arr[i].tobytes())
    return h.hexdigest()


def _matches_record(data_file: Path, record: dict, shape: tuple) -> bool:
    if data_file.stat().st_size != int(np.prod(shape)):
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


def _new_cache_file(part_file: Path, shape: tuple, data_file: Path) -> np.memmap:
    """A writable uint8 memmap of `shape` over the new `part_file`, its disk space reserved first where the OS can:
    on a full disk, writing into a memory map of a sparse file kills the process (SIGBUS) instead of raising.
    BonefracError, naming the cache and the bytes needed, when the space is not there."""
    nbytes = int(np.prod(shape))
    try:
        with open(part_file, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, nbytes)
    except (AttributeError, OSError) as exc:  # AttributeError: no posix_fallocate (macOS, Windows)
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise BonefracError(f"not enough disk space for the image cache {data_file}: it needs {nbytes:,} bytes "
                                f"({exc.strerror}); free some space or choose another cache folder") from None
        return np.memmap(part_file, dtype=np.uint8, mode="w+", shape=shape)  # unreserved, as before
    return np.memmap(part_file, dtype=np.uint8, mode="r+", shape=shape)  # "r+": "w+" would truncate the reservation


def _decode_into(arr: np.memmap, paths: list[str], digests: list, size: int, workers: int,
                 progress: bool, beat=None) -> tuple[list, list[str], list[str]]:
    """Decode every image into `arr`, a new (N, size, size) memmap; -> (stamps, changed paths, read errors).
    `beat()` is called after each image (training's watchdog: a decode can hang on a stalled network drive)."""
    stamps, changed, errors = [], [], []
    with progress_bar(len(paths), "decode", progress) as bar:
        for i, (img, problem, stamp) in enumerate(_map(_decode, list(zip(paths, digests, [size] * len(paths))),
                                                       workers)):
            stamps.append(stamp)
            if problem is None:
                arr[i] = img
            else:
                (changed if problem[0] == "changed" else errors).append(problem[1])
            bar.update(1)
            if beat is not None:
                beat()
    arr.flush()
    return stamps, changed, errors


def _map(fn, jobs, workers):
    if workers <= 1 or len(jobs) < 64:
        yield from map(fn, jobs)
        return
    context = multiprocessing.get_context()
    # Under forkserver the workers' parent is the server, not this process: only its death can be watched for.
    parent = None if context.get_start_method() == "forkserver" else os.getpid()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_die_with_parent,
                               initargs=(parent,))
    try:
        yield from pool.map(fn, jobs, chunksize=32)
    finally:
        pool.shutdown()


def _die_with_parent(parent: int | None) -> None:
    """Decode worker initializer: have Linux kill this worker when its parent dies. A SIGKILLed (or SIGTERMed)
    build skips the pool's shutdown, and its orphaned workers would otherwise wait for work forever, holding
    hundreds of MB each. Elsewhere nothing is done. (Linux sends the signal when the *thread* that started the
    worker exits: build_cache must not run in a thread that ends while its pool is still working.)"""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
