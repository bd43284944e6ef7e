"""Multi-process training and resuming: waits for rank 0's decoding and saving outlast the process group's timeout
and the other ranks' watchdogs, a reused cache's re-check feeds the watchdog, a plateau schedule resumed with
another number of processes, a rank without validation images. Two-process tests run gloo on CPU."""

import datetime
import hashlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from bonefrac import checkpoint
from bonefrac.cache import build_cache
from bonefrac.config import Config, from_dict, to_dict
from bonefrac.data import Batches
from bonefrac.trainutil import Watchdog, make_optimizer, make_scheduler


def _join(rank: int, world: int, folder: Path, timeout_s: float | None = None) -> None:
    """Join a gloo process group of `world` through files in `folder`, as distributed_setup does under torchrun,
    with the group's default timeout shortened to `timeout_s` (NCCL's 10 minutes, gloo's 30, made to fit a test)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    (folder / f"ready{rank}").touch()  # start together: a short timeout must not be spent waiting for the other
    deadline = time.monotonic() + 120
    while not all((folder / f"ready{r}").exists() for r in range(world)) and time.monotonic() < deadline:
        time.sleep(0.05)
    real_init = dist.init_process_group
    extra = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group = lambda backend: real_init(backend, init_method=f"file://{folder / 'init'}", rank=rank,
                                                        world_size=world, **extra)
    from bonefrac.distributed import distributed_setup

    assert distributed_setup() == (rank, world)


def _decode_worker(rank: int, world: int, folder: Path) -> None:
    import bonefrac.trainutil as trainutil

    _join(rank, world, folder, timeout_s=2)
    beats = []

    def slow_build_cache(paths, hashes, size, cache_dir, workers=0, progress=True, beat=None):
        if rank == 0 and size == 8:  # decoding train for longer than the process group's timeout, progressing
            for _ in range(14):
                time.sleep(0.25)
                beat()
        return np.zeros((len(paths), size, size), np.uint8)

    trainutil.build_cache = slow_build_cache
    rows = pd.DataFrame({"path": ["a.png", "b.png"], "sha256": ["0" * 64, "1" * 64]})
    cfg = from_dict({"data": {"cache_dir": str(folder / "cache")}})
    caches = trainutil.decode_caches(folder / "manifest.csv", cfg, {"train": (rows, 8), "val": (rows, 4)}, rank,
                                     world, beat=lambda: beats.append(1))
    (folder / f"done{rank}.json").write_text(json.dumps({k: list(v.shape) for k, v in caches.items()} |
                                                        {"beats": len(beats)}))
    dist.destroy_process_group()


def test_the_other_ranks_wait_out_a_decode_longer_than_the_process_group_timeout(tmp_path):
    """Rank 1 waited for rank 0's decode in a barrier under the group's default timeout: a long decode killed the
    run (and, leaving only an orphaned .part, every --resume again). A hung decode is rank 0's watchdog's to stop."""
    torch.multiprocessing.spawn(_decode_worker, args=(2, tmp_path), nprocs=2)
    done = [json.loads((tmp_path / f"done{rank}.json").read_text()) for rank in (0, 1)]
    assert all(d["train"] == [2, 8, 8] and d["val"] == [2, 4, 4] for d in done)
    assert done[0]["beats"] == 14 and done[1]["beats"] == 0  # rank 0's watchdog heard every image


def _save_worker(rank: int, world: int, folder: Path) -> None:
    import bonefrac.train as train_mod

    _join(rank, world, folder)

    def slow_save(*args, **kwargs):  # each save well within train.watchdog_s, both together beyond it
        time.sleep(1.4)

    train_mod.calibration_meta = lambda *args: {}
    train_mod.checkpoint.save = slow_save
    train_mod.save_last = lambda run, epoch: slow_save() if run.rank == 0 else None
    dog = Watchdog(2.0, on_timeout=lambda: None, exit_process=False)
    run = SimpleNamespace(state={"epoch": 0, "best_score": -math.inf, "bad_epochs": 0}, rank=rank, world=world,
                          out_dir=folder, base_meta={}, class_names=["no_fracture", "fracture"], pos=1,
                          monitor="loss", eval_model=None, seen={}, writer=None)
    train_mod._save_epoch(run, 0, -0.5, {"epoch": 1, "train_loss": 0.7}, None, None, dog)
    dist.barrier()  # stands in for the next epoch's first gradient all-reduce
    dog.stop()
    (folder / f"fired{rank}.json").write_text(json.dumps(dog.fired.is_set()))
    dist.destroy_process_group()


def test_the_other_ranks_watchdogs_do_not_count_rank_0s_end_of_epoch_saves(tmp_path):
    """Rank 1 went on to the next epoch and waited there for rank 0's calibration and saves, its watchdog counting
    all of them: with train.watchdog_s below their sum it exited 75 and torchrun killed rank 0 mid-save."""
    torch.multiprocessing.spawn(_save_worker, args=(2, tmp_path), nprocs=2)
    fired = [json.loads((tmp_path / f"fired{rank}.json").read_text()) for rank in (0, 1)]
    assert fired == [False, False]


def test_a_paused_watchdog_does_not_fire_and_counts_afresh_after():
    fired = []
    dog = Watchdog(0.6, on_timeout=lambda: fired.append(1), exit_process=False)
    with dog.paused():
        time.sleep(1.2)
    time.sleep(0.1)
    assert fired == []
    time.sleep(1.0)
    dog.stop()
    assert fired == [1]


def test_the_resume_hint_names_the_epoch_that_last_holds_not_the_one_this_rank_counted(tmp_path):
    """Rank 1 counts an epoch done before rank 0 saved it: its message claimed `last` held an epoch it did not."""
    from bonefrac.runfolder import resume_hint

    assert "no epoch was completed; --resume starts the run afresh" in resume_hint(tmp_path)
    checkpoint.save(tmp_path / "last", torch.nn.Linear(2, 2), {"epoch": 1})
    assert "the last completed epoch (1) is kept in" in resume_hint(tmp_path)
    os.replace(tmp_path / "last", tmp_path / "last.old")  # rank 0 between the two renames of its next save
    assert "the last completed epoch (1) is kept in" in resume_hint(tmp_path)
    assert (tmp_path / "last.old").is_dir()  # only read: rank 0 may be saving right now


@pytest.fixture()
def hashed_images(images):
    """conftest's six PNGs with their sha256, as a manifest lists them."""
    return images, [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in images]


def _touch_all(paths) -> None:
    """What `chmod -R` does to a data set: every status-change time moves, no byte changes."""
    for p in paths:
        ctime = os.stat(p).st_ctime_ns
        while os.stat(p).st_ctime_ns == ctime:  # coarse clocks: make the change visible
            os.chmod(p, 0o644 if os.stat(p).st_mode & 0o777 != 0o644 else 0o640)


def test_rechecking_a_reused_cache_beats_the_watchdog_for_every_file(hashed_images, tmp_path):
    """After a chmod -R the re-hash of every file never beat the decode watchdog: the run stopped with "no image
    was decoded", and every --resume did the same."""
    paths, hashes = hashed_images
    build_cache(paths, hashes, 16, tmp_path / "cache", workers=1, progress=False)
    _touch_all(paths)
    beats = []
    cache = build_cache(paths, hashes, 16, tmp_path / "cache", workers=1, progress=False,
                        beat=lambda: beats.append(1))
    assert int(cache[3].mean()) == 120
    assert len(beats) >= 2 * len(paths)  # one per file looked at, one per file re-hashed


def test_a_recheck_stopped_midway_records_the_files_it_found_unchanged(hashed_images, tmp_path, monkeypatch):
    import bonefrac.cache as data_mod

    paths, hashes = hashed_images
    build_cache(paths, hashes, 16, tmp_path / "cache", workers=1, progress=False)
    _touch_all(paths)
    real, hashed = data_mod._file_sha256, []

    def stops_at_the_third(path):
        if path == paths[2]:
            raise RuntimeError("stopped")  # stands in for the watchdog or a kill
        return real(path)

    monkeypatch.setattr(data_mod, "_RECORD_EVERY_S", 0.0)
    monkeypatch.setattr(data_mod, "_file_sha256", stops_at_the_third)
    with pytest.raises(RuntimeError, match="stopped"):
        build_cache(paths, hashes, 16, tmp_path / "cache", workers=1, progress=False)
    monkeypatch.setattr(data_mod, "_file_sha256", lambda p: hashed.append(p) or real(p))
    build_cache(paths, hashes, 16, tmp_path / "cache", workers=1, progress=False)
    assert sorted(hashed) == sorted(paths[2:])  # the first two were checked and recorded before the stop


def _plateau_run(world: int, folder: Path) -> SimpleNamespace:
    cfg = from_dict({"optim": {"schedule": "plateau", "lr": 1e-3, "lr_base_batch": 16}, "data": {"batch_size": 8}})
    net = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(net, cfg.optim, cfg.data.batch_size * world, torch.device("cpu"))
    return SimpleNamespace(cfg=cfg, world=world, rank=0, out_dir=folder, steps_per_epoch=3, net=net, model=net,
                           optimizer=optimizer, scheduler=make_scheduler(optimizer, cfg.optim, 3, cfg.train.epochs),
                           ema=None, monitor="loss", lr_anchor=None, base_meta={}, seen={},
                           state={"epoch": 2, "best_score": -0.3, "bad_epochs": 1})


@pytest.mark.parametrize("saved_by", ["this code", "older code"])
def test_a_plateau_run_resumed_by_fewer_processes_goes_on_at_their_learning_rate(tmp_path, saved_by):
    """Saved by 2 processes (lr scaled for a global batch of 16, then halved by the plateau), resumed by 1: the
    rate is halved again for the global batch of 8 (was kept as the 2 processes', while the warning said the
    schedule went on)."""
    from bonefrac.trainstate import restore, save_last

    saved = _plateau_run(2, tmp_path)
    for group in saved.optimizer.param_groups:
        group["lr"] *= 0.5  # a plateau reduction
    save_last(saved, 2)
    state = checkpoint.load_train_state(tmp_path / "last")
    if saved_by == "older code":
        state.pop("lr_scale", None)
    resumed = _plateau_run(1, tmp_path)
    restore(resumed, saved.net, {"config": to_dict(resumed.cfg)}, state)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([1e-3 * 0.5 * 0.5] * 2, rel=1e-9)
    assert resumed.state["epoch"] == 2


def test_a_rank_without_validation_images_adds_empty_arrays():
    """A val split smaller than the number of processes: a rank with no val batch crashed in torch.cat."""
    import bonefrac.train as train_mod

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    prep, cfg = {"size": 8, "mean": [0.5], "std": [0.25], "channels": 1}, Config()
    cache = np.full((1, 8, 8), 100, np.uint8)
    parts = [train_mod._val_logits(model, Batches(cache, np.array([2]), 4, torch.device("cpu"), rank=rank, world=2,
                                                  drop_last=False), prep, cfg, 1, classes=3) for rank in (0, 1)]
    assert parts[1][0].shape == (0, 3) and parts[1][1].shape == (0,)
    logits, labels = (np.concatenate([p[i] for p in parts]) for i in range(2))  # what gather_arrays does
    assert logits.shape == (1, 3) and logits.dtype == np.float32 and labels.tolist() == [2]
