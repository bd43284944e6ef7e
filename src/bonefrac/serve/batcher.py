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
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)


class MicroBatcher:
    def __init__(self, predict_fn, max_batch: int = 16, max_wait_ms: float = 10.0, on_batch=None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.predict_fn, self.max_batch, self.max_wait = predict_fn, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda n: None)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonefrac-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="bonefrac-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities (len(images), K) for these images, computed together with other clients' images."""
        if not self.running:
            raise RuntimeError("batcher is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for img, fut in zip(images, futures):
            self._queue.put_nowait((img, fut))
        return np.stack(await asyncio.gather(*futures)) if futures else np.zeros((0, 0), np.float32)

    async def run(self, fn, *args):
        """Run another model call (e.g. Grad-CAM) on the model thread, serialised with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _collect(self) -> list:
        batch = [await self._queue.get()]
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
        return batch

    async def _loop(self) -> None:
        while True:
            batch = [(img, fut) for img, fut in await self._collect() if not fut.cancelled()]
            if not batch:
                continue
            try:
                probs = await self.run(self.predict_fn, [img for img, _ in batch])
                self.on_batch(len(batch))
            except Exception as exc:  # handed to every waiting request, which turns it into an error reply
                log.error("model call failed for a batch of %d: %s", len(batch), type(exc).__name__)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), row in zip(batch, probs):
                if not fut.done():
                    fut.set_result(row)
