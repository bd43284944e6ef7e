"""Duplicate detection for `prepare`: perceptual hashes invariant to the 8 rotations/flips by 90 degrees, the
pairs of near-identical images they find, optionally the pairs of augmented copies a learned copy detector finds
(copydetect.py), the union-find that turns all pairs into groups, and the groups that cross a given split.

Split from manifest.py to keep that module readable; `prepare` is the only caller.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .io import resize_gray

# Bits of 256 by which two hashes may differ and still be one image. Measured on FracAtlas: 90-degree rotations,
# flips and 50-80 % resizes stay within 6 bits, JPEG q70 within 8, q30 within 14; pairs of distinct radiographs
# start at about 36 bits. Freshly augmented copies (small-angle rotation, shear) are NOT caught (docs/leakage.md).
NEAR_DUP_THRESHOLD = 32
_DCT_SIZE, _LOW = 64, 16  # 64x64 thumbnail, 16x16 lowest DCT frequencies -> 256-bit hash
# Copy-detector pairs may merge groups only up to this many images: false pairs chain through union-find (on
# web-sourced hand X-rays, unchecked chaining built a 144-image group of different hands; docs/leakage.md). An
# image and its augmented copies stay far below it (the seed work made ~6 per source).
MAX_COPY_GROUP = 20

log = logging.getLogger(__name__)


def dihedral_phash(img: np.ndarray) -> np.ndarray:
    """(8, 4) uint64: a 256-bit DCT perceptual hash of ``img`` under each of the 8 rotations/flips.

    Row 0 is the image as is. Rotating or flipping the 64x64 thumbnail only transposes or sign-flips
    its DCT coefficients, so the 8 variants cost one DCT.
    """
    n = _DCT_SIZE
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    dct = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    dct[0] /= np.sqrt(2.0)
    coeffs = (dct @ resize_gray(img, n).astype(np.float64) @ dct.T)[:_LOW, :_LOW]
    sign = (-1.0) ** np.arange(_LOW)  # a flip negates the odd frequencies along its axis
    variants = [c * r * s for c in (coeffs, coeffs.T) for r in (1.0, sign[:, None]) for s in (1.0, sign)]
    return np.stack([np.packbits(v > np.median(v)).view(">u8").astype(np.uint64) for v in variants])


def near_duplicate_pairs(hashes: np.ndarray, threshold: int, block: int = 256) -> np.ndarray:
    """(M, 2) index pairs i < j whose hashes (from dihedral_phash, stacked to (N, 8, W)) are within
    ``threshold`` bits, comparing image i as is against all 8 variants of j and vice versa; a hash within
    ``threshold`` of a variant's complement is a grey-inverted copy (e.g. a MONOCHROME1 export) and pairs too.
    On FracAtlas no two images come closer than 60 bits to a complement (4,083 images, 2026-12-06)."""
    n = len(hashes)
    if n < 2 or threshold < 0:
        return np.zeros((0, 2), dtype=np.int64)
    base = hashes[:, 0, :]
    bits = np.uint16(64 * hashes.shape[2])
    variants = np.ascontiguousarray(hashes.transpose(1, 2, 0))  # (8, W, N): contiguous rows to XOR against
    found = []
    for start in range(0, n, block):
        rows = base[start:start + block]
        best = np.full((len(rows), n), np.iinfo(np.uint16).max, dtype=np.uint16)
        for k in range(variants.shape[0]):
            dist = np.zeros_like(best)
            for w in range(variants.shape[1]):
                dist += _popcount(rows[:, w, None] ^ variants[k, w][None, :])
            np.minimum(best, dist, out=best)
            np.minimum(best, bits - dist, out=best)  # a grey-inverted copy flips almost every bit
        ii, jj = np.nonzero(best <= threshold)
        ii += start
        keep = ii != jj
        found.append(np.stack([np.minimum(ii, jj), np.maximum(ii, jj)], axis=1)[keep])
    return np.unique(np.concatenate(found), axis=0)


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)


class _Groups:
    """Union-find over row indices, tracking group sizes; rows with the same sha256 start in one group."""

    def __init__(self, sha: list, pairs: np.ndarray):
        self.parent, self.size = list(range(len(sha))), [1] * len(sha)
        first_of = {}
        for i, digest in enumerate(sha):
            self.union(first_of.setdefault(digest, i), i)
        for a, b in pairs.tolist():
            self.union(a, b)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            ra, rb = (ra, rb) if self.size[ra] >= self.size[rb] else (rb, ra)
            self.parent[rb], self.size[ra] = ra, self.size[ra] + self.size[rb]


def group_ids(sha: list, pairs: np.ndarray) -> list[str]:
    """Union-find over exact (same sha256) and near-duplicate pairs; ids g00000.. in first-row order."""
    groups = _Groups(sha, pairs)
    roots = [groups.find(i) for i in range(len(sha))]
    numbers = {r: n for n, r in enumerate(dict.fromkeys(roots))}  # numbered by each group's first row
    width = max(5, len(str(len(numbers))))
    return [f"g{numbers[r]:0{width}d}" for r in roots]


def duplicate_pairs(paths: list[str], sha: list, hashes: np.ndarray, threshold: int, match_copies=None,
                    workers: int | None = None) -> tuple[np.ndarray, dict]:
    """All pairs for `group_ids`: near duplicates by hash, plus, when `match_copies` names a copy detector
    ("auto" or a folder, see copydetect.resolve_detector), pairs of augmented copies. Returns the pairs and
    a summary for the report: the detector and threshold, its pair count, the pairs the hash had not found,
    how many groups its pairs merged and the largest group (a guard against false pairs chaining)."""
    from .copydetect import resolve_detector

    pairs = near_duplicate_pairs(hashes, threshold)
    detector_dir = resolve_detector(match_copies)
    summary = {"match_copies": None if match_copies is None else str(match_copies),
               "detector": None if detector_dir is None else str(detector_dir.resolve())}
    if detector_dir is None:
        return pairs, summary
    from .copydetect import copy_pairs, embed_images, load_detector

    started = time.perf_counter()
    detector = load_detector(detector_dir, "auto")
    emb = embed_images(paths, detector, workers=workers)
    copies = copy_pairs(emb, detector.threshold)
    new = {tuple(p) for p in copies.tolist()} - {tuple(p) for p in pairs.tolist()}
    groups_before = len(set(group_ids(sha, pairs)))
    cosine = np.einsum("ij,ij->i", emb[copies[:, 0]], emb[copies[:, 1]])
    kept = capped_links(sha, pairs, copies[np.argsort(-cosine, kind="stable")], MAX_COPY_GROUP)
    pairs = np.unique(np.concatenate([pairs, kept]), axis=0) if len(kept) else pairs
    after = group_ids(sha, pairs)
    largest = max(np.unique(after, return_counts=True)[1], default=0)
    summary.update(threshold=float(detector.threshold), n_copy_pairs=len(copies), n_copy_pairs_not_hashed=len(new),
                   n_copy_pairs_refused=len(copies) - len(kept), max_copy_group=MAX_COPY_GROUP,
                   groups_merged_by_copies=groups_before - len(set(after)), largest_group=int(largest),
                   elapsed_s=round(time.perf_counter() - started, 2))
    log.info("copy detector %s (cosine >= %.3f): %d pairs, %d not found by the hash, %d groups merged",
             detector_dir, detector.threshold, len(copies), len(new), summary["groups_merged_by_copies"])
    if len(copies) > len(kept):
        log.warning("%d copy-detector pairs refused: they would have merged groups past %d images (likely false "
                    "pairs chaining; check the largest groups, or raise the threshold in %s/copydetect.json)",
                    len(copies) - len(kept), MAX_COPY_GROUP, detector_dir)
    return pairs, summary


def capped_links(sha: list, pairs: np.ndarray, candidates: np.ndarray, max_size: int) -> np.ndarray:
    """The `candidates` (index pairs, most similar first) that can join the groups of exact and `pairs`
    duplicates without making any group larger than `max_size`: a size-capped single linkage, so the strongest
    links merge first and a chain of weak ones cannot sweep distinct images into one giant group."""
    groups = _Groups(sha, pairs)
    kept = []
    for a, b in candidates.tolist():
        ra, rb = groups.find(a), groups.find(b)
        if ra == rb or groups.size[ra] + groups.size[rb] <= max_size:
            groups.union(a, b)
            kept.append((a, b))
    return np.asarray(kept, dtype=np.int64).reshape(-1, 2)


def crossing_groups(groups: list, splits: list, paths: list) -> list[dict]:
    """Groups whose members lie in more than one split: [{"group", "splits": {split: sorted paths}}], by group."""
    members: dict = {}
    for group, split, path in zip(groups, splits, paths):
        members.setdefault(group, {}).setdefault(split, []).append(path)
    crossing = [{"group": g, "splits": {s: sorted(p) for s, p in sorted(by_split.items())}}
                for g, by_split in sorted(members.items()) if len(by_split) > 1]
    if crossing:
        log.warning("%d group(s) (duplicates, or one patient's images with --group-col) cross the folder's "
                    "train/val/test split: the folder split leaks them between splits (see crossing_groups in the "
                    "report; drop keep_folder_split to re-split by group)", len(crossing))
    return crossing
