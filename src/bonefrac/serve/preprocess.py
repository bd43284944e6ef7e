"""Per-upload work that needs no model (decode, colour cue, not-an-X-ray check, hash, resize), off the server's
interpreter lock.

    pre = Preprocessor(workers=8)          # 0: worker threads of this process instead of a process pool
    await pre.start()
    item = await pre.prepare(data, "x.png", max_pixels=60_000_000, xray_check=True, size=384)
    await pre.stop()

Why processes: this work is ~5-8 ms of Python and numpy per upload; in threads it shares one GIL with HTTP
parsing and the model thread, which caps the whole service near 130 req/s whatever the GPU does. Workers
come from a fork server (or 'spawn'), never a fork of this process, so they are safe when it has initialised
CUDA; they are started at start-up, so the first requests do not pay for importing torch. Arguments and
results are plain values (bytes, ints, a uint8 array, a small dataclass), cheap to pickle. A worker that dies
(e.g. a codec crash) breaks the whole pool: the requests in flight get a 503 and the pool is replaced, so the
service keeps running.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ..backends import check_radiograph, colourfulness
from ..errors import ImageReadError
from ..io import decode_image_and_colour, resize_gray
from .errors import ApiError

log = logging.getLogger(__name__)


def read_error(name: str, exc: ImageReadError) -> ApiError:
    reason = exc.reason
    if "too large" in reason:
        return ApiError(413, "image_too_large", f"{name}: {reason}")
    if "not a recognised image format" in reason:
        return ApiError(415, "unsupported_media_type", f"{name}: {reason}")
    return ApiError(422, "unreadable_image", f"{name}: {reason}")


def prepare(data: bytes, name: str, max_pixels: int, xray_check: bool, size: int | None) -> dict:
    """One decode (with a colour thumbnail), the not-an-X-ray check, the hash, and the resize to the model's
    input (`size`; None keeps the full image), so the model thread only stacks. "gray" is None for an image the
    check refuses. Raises ApiError (4xx)."""
    try:
        gray, thumb = decode_image_and_colour(data, name, max_pixels)
    except ImageReadError as exc:
        raise read_error(name, exc) from None
    pixels = gray.size
    colour = colourfulness(thumb) if thumb is not None else 0.0
    check = check_radiograph(gray, colour) if xray_check else None
    if check is not None and not check.ok:
        # No pixels: the not_xray result needs none (explain refuses it), and a full-size array kept here (it skips
        # the resize) held up to max_pixels of memory per refused upload, pickled back from a worker too.
        gray = None
    elif size:
        gray = resize_gray(gray, size)
    if pixels >= TRIM_PIXELS:  # the decode's intermediates are freed by now
        release_freed_memory()
    return {"filename": name, "sha256": hashlib.sha256(data).hexdigest(), "gray": gray, "check": check}


TRIM_PIXELS = 1 << 22  # images from about 2000 x 2000 up: their decode frees hundreds of MB


def release_freed_memory() -> None:
    """Hand memory freed by a large decode back to the operating system (glibc's malloc_trim; nothing elsewhere).
    glibc keeps what a thread frees in that thread's arena, so each decoding thread held on to its largest decode:
    16 RGBA 7745 x 7745 uploads, two decoded at a time, peaked at 7.6 GB of resident memory without this, 3.4 GB
    with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes

    try:  # the C library this process already runs on; malloc_trim is glibc's own
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # TypeError: Windows has no handle for "this program"
        return None


def _worker_init() -> None:
    import torch

    # The check's resize goes through torch on the CPU; one thread per worker, the pool is the parallelism.
    torch.set_num_threads(1)


def _ready() -> int:
    time.sleep(0.05)  # long enough that each warm-up call lands on its own worker
    return os.getpid()


def _context():
    """'forkserver' where there is one, else 'spawn': workers never inherit the parent's CUDA or threads."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # The fork server imports torch, PIL and this module once; every worker (and every replacement after a
    # crash) is then a fork of it, started in milliseconds and sharing those pages. Takes effect only if the
    # (per-process) fork server is not running yet.
    ctx.set_forkserver_preload([__name__])
    return ctx


class Preprocessor:
    def __init__(self, workers: int):
        self.workers = max(0, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_worker_init)

    async def start(self) -> None:
        if not self.workers:
            return
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        # One call per worker, submitted together: the pool spawns a process for each call that finds no idle
        # worker, so all of them start (and import torch) now rather than under the first requests.
        pids = await asyncio.gather(*[loop.run_in_executor(self._pool, _ready) for _ in range(self.workers)])
        log.info("preprocessing in %d worker processes (%d started)", self.workers, len(set(pids)))

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def prepare(self, data: bytes, name: str, max_pixels: int, xray_check: bool, size: int | None) -> dict:
        if self._pool is None:
            return await asyncio.to_thread(prepare, data, name, max_pixels, xray_check, size)
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, prepare, data, name, max_pixels,
                                                                    xray_check, size)
        except BrokenProcessPool:
            self._replace(pool)
            raise ApiError(503, "preprocess_unavailable", f"{name}: the image worker stopped while processing "
                           "this request; it has been restarted, please retry", {"Retry-After": "1"}) from None

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A new pool, once per breakage: every request in flight on the broken pool lands here."""
        if self._pool is not broken:
            return
        self.restarts += 1
        log.error("an image worker process died; replacing the pool (restart %d)", self.restarts)
        broken.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
