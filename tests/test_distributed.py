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
from bonefrac.trainutil import GradAllReduce

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
    sync.sync_buffers(norm)
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
