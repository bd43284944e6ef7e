import numpy as np
import pytest
import torch
from PIL import Image

from bonefrac.cache import build_cache
from bonefrac.data import Batches
from bonefrac.errors import BonefracError


def test_cache_is_built_once_and_rebuilt_when_inputs_change(images, tmp_path):
    cache_dir = tmp_path / "cache"
    hashes = [f"h{i}" for i in range(len(images))]
    a = build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    assert a.shape == (6, 16, 16) and a.dtype == np.uint8 and int(a[3].mean()) == 120
    files = sorted(cache_dir.glob("*.u8"))
    stamp = files[0].stat().st_mtime_ns
    build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    assert sorted(cache_dir.glob("*.u8")) == files and files[0].stat().st_mtime_ns == stamp  # reused
    build_cache(images, hashes, 24, cache_dir, workers=1, progress=False)  # new size -> new cache
    build_cache(images, ["x"] + hashes[1:], 16, cache_dir, workers=1, progress=False)  # changed file -> new
    assert len(list(cache_dir.glob("*.u8"))) == 3


def test_an_interrupted_cache_build_is_redone(images, tmp_path):
    cache_dir = tmp_path / "cache"
    build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
    (done,) = cache_dir.glob("*.json")
    done.unlink()  # what a kill before the final marker leaves behind
    data = next(cache_dir.glob("*.u8"))
    data.write_bytes(b"\0" * data.stat().st_size)
    again = build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
    assert int(again[5].mean()) == 200 and done.exists()


def test_a_cache_changed_on_disk_is_rebuilt_not_trusted(images, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
    data = next(cache_dir.glob("*.u8"))
    data.write_bytes(b"\0" * data.stat().st_size)  # right size, wrong pixels: the size check alone accepted it
    with caplog.at_level("WARNING", logger="bonefrac"):
        again = build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
    assert int(again[5].mean()) == 200 and "does not match its record" in caplog.text


def test_build_files_of_killed_processes_are_removed(images, tmp_path):
    from bonefrac.cache import _build_lock

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    orphan = cache_dir / "abc.123.12345678.part"  # what a SIGKILLed build leaves: nobody holds its lock
    orphan.write_bytes(b"x")
    running = cache_dir / "abc.456.12345678.part"
    with _build_lock(running):  # a build in progress (another process, another container: same lock)
        build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
        assert not orphan.exists() and running.exists()


def test_a_second_build_never_touches_the_file_another_process_reads(images, tmp_path, monkeypatch):
    import bonefrac.cache as data_module

    cache_dir = tmp_path / "cache"
    first = build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
    (done,) = cache_dir.glob("*.json")
    done.unlink()  # another process now sees no marker and starts its own build of the same cache ...
    real_map = data_module._map

    def killed_midway(fn, jobs, workers):
        for i, result in enumerate(real_map(fn, jobs, workers)):
            if i == 3:
                raise KeyboardInterrupt  # ... and is killed halfway
            yield result

    monkeypatch.setattr(data_module, "_map", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        build_cache(images, [""] * 6, 16, cache_dir, workers=1, progress=False)
    assert int(first[5].mean()) == 200  # the reader's mapped file was neither truncated nor half-filled
    assert [p.suffix for p in cache_dir.iterdir()] == [".u8"]  # no partial file left behind


def test_unreadable_image_in_the_manifest_is_a_clear_error(images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(BonefracError, match="re-run prepare"):
        build_cache(images + [str(broken)], [""] * 7, 16, tmp_path / "c", workers=1, progress=False)


def test_ranks_see_disjoint_shards_and_eval_sees_everything():
    cache = np.arange(10, dtype=np.uint8).reshape(10, 1, 1).repeat(2, 1).repeat(2, 2)
    labels = np.arange(10) % 2
    seen = []
    for rank in range(2):
        b = Batches(cache, labels, 5, torch.device("cpu"), rank=rank, world=2)
        seen.append({int(x[i, 0, 0, 0]) for x, _ in b.epoch(torch.Generator().manual_seed(0)) for i in range(len(x))})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10
    ev = Batches(cache, labels, 3, torch.device("cpu"), drop_last=False)
    assert sorted(int(v) for x, _ in ev.epoch(None) for v in x[:, 0, 0, 0]) == list(range(10))


def test_balanced_sampler_draws_classes_equally():
    cache = np.zeros((100, 1, 1), np.uint8)
    labels = np.array([0] * 90 + [1] * 10)
    b = Batches(cache, labels, 10, torch.device("cpu"), sampler="balanced")
    drawn = torch.cat([y for _, y in b.epoch(torch.Generator().manual_seed(1))])
    assert 0.35 < drawn.float().mean().item() < 0.65  # about half minority, against 10 % in the data


def _sha(path) -> str:
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _replace_keeping_size_and_mtime(path, value):
    """Overwrite an image with other pixels, same byte count and modification time (as `cp -p` or a restore
    would): only the status-change time and the content tell."""
    import os

    import time

    before = os.stat(path)
    Image.fromarray(np.full((20, 30), value, np.uint8)).save(path)
    assert os.stat(path).st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while os.stat(path).st_ctime_ns == before.st_ctime_ns:  # coarse clocks: make the change visible, as in life
        time.sleep(0.005)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_image_changed_since_prepare_is_refused_by_name(images, tmp_path):
    hashes = [_sha(p) for p in images]
    _replace_keeping_size_and_mtime(images[2], 77)
    with pytest.raises(BonefracError, match=r"1 image\(s\) changed on disk since prepare.*img2\.png.*re-run"):
        build_cache(images, hashes, 16, tmp_path / "cache", workers=1, progress=False)
    assert not list((tmp_path / "cache").glob("*.u8"))  # nothing cached from the changed file


def test_a_reused_cache_catches_a_file_changed_since_it_was_built(images, tmp_path):
    hashes = [_sha(p) for p in images]
    cache_dir = tmp_path / "cache"
    build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    _replace_keeping_size_and_mtime(images[4], 3)
    _replace_keeping_size_and_mtime(images[1], 9)
    with pytest.raises(BonefracError, match=r"2 image\(s\) changed.*img1\.png, .*img4\.png"):
        build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)  # was: the old pixels, silently


def test_a_reused_cache_rehashes_only_files_whose_stamp_changed(images, tmp_path, monkeypatch):
    import os

    import bonefrac.cache as data_module

    hashes = [_sha(p) for p in images]
    cache_dir = tmp_path / "cache"
    build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    hashed = []
    real = data_module._file_sha256
    monkeypatch.setattr(data_module, "_file_sha256", lambda p: hashed.append(p) or real(p))
    build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    assert hashed == []  # unchanged files: a stat each, no read
    os.utime(images[3])  # touched, same bytes: re-hashed once, accepted, and its new stamp recorded
    again = build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    assert hashed == [images[3]] and int(again[3].mean()) == 120


def test_a_read_only_cache_record_still_serves_the_cache(images, tmp_path, monkeypatch, caplog):
    import logging
    import os

    import bonefrac.cache as data_module

    hashes = [_sha(p) for p in images]
    cache_dir = tmp_path / "cache"
    build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    os.utime(images[0])  # re-checked, so the record would be updated: on a read-only cache that fails

    def read_only(*_):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(data_module, "_write_record", read_only)
    with caplog.at_level(logging.WARNING, logger="bonefrac.cache"):
        cache = build_cache(images, hashes, 16, cache_dir, workers=1, progress=False)
    assert cache.shape == (6, 16, 16) and "could not update the cache record" in caplog.text
