"""Data-parallel training under torchrun with 2 CPU processes (gloo), as on a multi-GPU machine."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from bonefrac import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes(tmp_path, sample_manifest):
    data = sample_manifest.parent
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bonefrac",
           "train", "--manifest", str(data / "manifest.csv"), "--out", str(run),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--set", "train.epochs=1", "--set", "data.size=64",
           "--set", "data.batch_size=8", "--set", "train.watchdog_s=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = checkpoint.read_meta(run / "best")
    n_val = int((pd.read_csv(data / "manifest.csv").split == "val").sum())
    # validation predictions were gathered from both ranks: every val image counted once
    assert meta["val_metrics"]["n"] == n_val
    assert len(pd.read_csv(run / "metrics.csv")) == 1  # only rank 0 logs
    assert json.loads((run / "config.json").read_text())["data"]["batch_size"] == 8
