"""Micro-batching: concurrent requests' images are gathered into one model call, off the event loop.

    batcher = MicroBatcher(predictor.predict_arrays, max_batch=16, max_wait_ms=10)
    await batcher.start()
    probs = await batcher.submit([img1, img2])    # (2, K), rows in order
    await batcher.stop()

The first waiting image opens a window of `max_wait_ms`; the batch goes to the model when it is full or the
window closes. Images are taken in arrival order (FIFO), so no image waits for more calls than there were full
batches ahead of it. The model runs in one dedicated thread, so the event loop keeps serving (health checks,
uploads) during inference and the model is never called from two threads at once. max_batch=1 means one at a
time.

When a batch's model call raises, each request in it is run again on its own, so one bad image fails only the
request that sent it. Once stopped, `submit` and `run` raise errors.ShuttingDown (a 503), and requests still
waiting get it too instead of hanging. `start` after `stop` serves again (a new model thread).

At most `max_queue` images wait (None: no limit); `submit` refuses more with ApiError 503 `overloaded` and
Retry-After, except into an empty queue (a request larger than the limit is served when nothing else waits).
Cancelling a `submit` (its client went away) drops its images: the model never sees them.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import ApiError, ShuttingDown

log = logging.getLogger(__name__)


class MicroBatcher:
    def __init__(self, predict_fn, max_batch: int = 16, max_wait_ms: float = 10.0, on_batch=None,
                 max_queue: int | None = None):
        if max_batch < 1 or max_wait_ms < 0 or (max_queue is not None and max_queue < 1):
            raise ValueError("max_batch must be >= 1, max_wait_ms >= 0 and max_queue >= 1 (or None)")
        self.predict_fn, self.max_batch, self.max_wait = predict_fn, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda n: None)
        self.executor: ThreadPoolExecutor | None = None  # made by start(): stop() shuts it down for good
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stopped(self) -> bool:
        """Started once and ended since (only `stop` ends the loop): /ready says "stopping", not "starting"."""
        return self._task is not None and self._task.done()

    async def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonefrac-model")
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="bonefrac-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities (len(images), K) for these images, computed together with other clients' images."""
        if not self.running:
            raise ShuttingDown()
        self._refuse_if_full(len(images))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        request = object()  # tags this request's images, so a failed batch can be re-run request by request
        for img, fut in zip(images, futures):
            self._queue.put_nowait((img, fut, request))
        return np.stack(await asyncio.gather(*futures)) if futures else np.zeros((0, 0), np.float32)

    def _refuse_if_full(self, n: int) -> None:
        if self.max_queue is None or self._queue.qsize() + n <= self.max_queue:
            return
        self._drop_abandoned()  # images of requests that gave up still sit in the queue: they do not count
        waiting = self._queue.qsize()
        if waiting and waiting + n > self.max_queue:
            raise ApiError(503, "overloaded", f"the service is overloaded ({waiting} images waiting for the model, "
                           f"limit {self.max_queue}); retry shortly", {"Retry-After": "1"})

    def _drop_abandoned(self) -> None:
        items = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for item in items:
            if not item[1].cancelled():
                self._queue.put_nowait(item)

    async def run(self, fn, *args):
        """Run another model call (e.g. Grad-CAM) on the model thread, serialised with the batches."""
        if not self.running:  # the executor is shut down with the loop
            raise ShuttingDown()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _collect(self, batch: list) -> None:
        """Fill `batch` in place, so images already taken are not lost if the loop is stopped mid-window."""
        batch.append(await self._queue.get())
        if self.max_batch > 1 and self.max_wait > 0:
            try:
                # One deadline for the whole window (not one wait_for task per image).
                async with asyncio.timeout(self.max_wait):
                    while len(batch) < self.max_batch:
                        batch.append(await self._queue.get())
            except TimeoutError:
                pass  # a get() cut short leaves its image in the queue, for the loop below or the next batch
        while len(batch) < self.max_batch and not self._queue.empty():  # already waiting: take them too
            batch.append(self._queue.get_nowait())

    async def _loop(self) -> None:
        batch: list = []
        try:
            while True:
                batch = []
                await self._collect(batch)
                batch = [item for item in batch if not item[1].cancelled()]
                if batch:
                    await self._infer(batch)
        finally:  # stopped: nothing will answer the images in hand or queued, so fail them rather than hang
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            _settle(batch, error=ShuttingDown())

    async def _infer(self, batch: list) -> None:
        try:
            probs = await self.run(self.predict_fn, [img for img, _, _ in batch])
        except Exception as exc:
            requests: dict[int, list] = {}
            for item in batch:
                requests.setdefault(id(item[2]), []).append(item)
            log.error("model call failed for a batch of %d images from %d requests: %s", len(batch),
                      len(requests), type(exc).__name__)
            if len(requests) == 1:  # nothing to separate: this request is the one that failed
                _settle(batch, error=exc)
                return
            for items in requests.values():  # each alone, so only the request that makes the model fail fails
                if any(not fut.done() for _, fut, _ in items):  # skip requests that gave up meanwhile
                    await self._infer(items)
            return
        self.on_batch(len(batch))
        _settle(batch, probs)


def _settle(batch: list, probs=None, error: BaseException | None = None) -> None:
    """Hand each waiting request its row, or the error; requests that gave up (cancelled) are skipped."""
    for i, (_, fut, _) in enumerate(batch):
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(probs[i])
