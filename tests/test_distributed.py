"""Data-parallel training under torchrun with 2 CPU processes (gloo), as on a multi-GPU machine."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from bonefrac import checkpoint
from bonefrac.distributed import GradAllReduce, sync_buffers

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grad_sync", ["ddp", "allreduce"])
def test_torchrun_two_processes(tmp_path, sample_manifest, grad_sync):
    data = sample_manifest.parent
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bonefrac",
           "train", "--manifest", str(data / "manifest.csv"), "--out", str(run),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--set", "train.epochs=1", "--set", "data.size=64",
           "--set", "data.batch_size=8", "--set", "train.watchdog_s=0", "--set", f"train.grad_sync={grad_sync}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = checkpoint.read_meta(run / "best")
    n_val = int((pd.read_csv(data / "manifest.csv").split == "val").sum())
    # validation predictions were gathered from both ranks: every val image counted once
    assert meta["val_metrics"]["n"] == n_val
    assert len(pd.read_csv(run / "metrics.csv")) == 1  # only rank 0 logs
    assert json.loads((run / "config.json").read_text())["data"]["batch_size"] == 8


def _features():
    x = torch.linspace(-1, 1, 48).reshape(12, 4)
    return x, (x[:, :1] * 2 - x[:, 1:2]).repeat(1, 3)


def _grad_worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different weights per rank: GradAllReduce must start everyone from rank 0's
    model = torch.nn.Linear(4, 3)
    norm = torch.nn.BatchNorm1d(3)
    sync = GradAllReduce(torch.nn.ModuleList([model, norm]))
    x, y = _features()
    mine = slice(rank * 6, rank * 6 + 6)  # two equal halves of one batch of 12
    torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
    sync()
    norm(x[mine, :3])  # running statistics from this rank's half only
    sync_buffers(norm)
    torch.save({"weight": model.weight.detach(), "grad": model.weight.grad, "running_mean": norm.running_mean},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_grad_allreduce_equals_the_full_batch_gradient(tmp_path):
    torch.multiprocessing.spawn(_grad_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    x, y = _features()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    for got in ranks:
        assert torch.equal(got["weight"], ref.weight.detach())  # rank 1 was overwritten by rank 0's weights
        torch.testing.assert_close(got["grad"], ref.weight.grad)  # mean of the halves = full-batch gradient
        halves = [x[:6, :3].mean(0), x[6:, :3].mean(0)]
        torch.testing.assert_close(got["running_mean"], 0.1 * (halves[0] + halves[1]) / 2)


def test_each_rank_augments_from_its_own_stream_and_buffers_are_averaged_in_ddp_mode(monkeypatch):
    """Ranks share the epoch's order but not its augmentations or dropout (with one stream, every rank's images
    got the same transforms); after the epoch BatchNorm statistics are averaged in DDP mode too (DDP syncs only
    gradients, so ranks validated and calibrated with different statistics than the saved model's)."""
    from types import SimpleNamespace

    import bonefrac.train as train_mod

    calls, synced = [], []
    monkeypatch.setattr(train_mod, "_train_epoch",
                        lambda *a: calls.append((a[3], a[-1], torch.rand(1).item())) or (0.0, 0))
    monkeypatch.setattr(train_mod, "sync_buffers", lambda module: synced.append(module))
    net, ema = torch.nn.BatchNorm1d(2), SimpleNamespace(module=torch.nn.BatchNorm1d(2))
    for rank in (0, 1, 2):
        torch.manual_seed(7)  # what train() seeds on every rank
        run = SimpleNamespace(rank=rank, world=3, grad_sync=None, net=net, ema=ema, step_model=net,
                              train_batches=None, steps_per_epoch=1, optimizer=None, scheduler=None,
                              cfg=SimpleNamespace(train=SimpleNamespace(seed=7)), prep=None, weight=None)
        train_mod._train_pass(run, torch.Generator().manual_seed(5), epoch=2, watchdog=None)
    (order0, aug0, drop0), (order1, aug1, drop1), (_, aug2, drop2) = calls
    assert aug0 is order0 and aug1 is not order1  # rank 0 keeps the one-process stream
    draws = [torch.rand(4, generator=g) for g in (aug0, aug1, aug2)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert len({drop0, drop1, drop2}) == 3  # dropout (the global RNG) differs too
    assert synced == [net, ema.module] * 3
