"""Batch iteration over the decoded image cache (cache.py) for training and evaluation, and the progress bar
long loops over images show.

`Batches` serves index batches straight from the cache array: on a GPU the whole cache usually fits in device
memory and a batch is one gather, so the input pipeline never keeps the model waiting.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import SAMPLERS, one_of_error
from .errors import BonefracError


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
