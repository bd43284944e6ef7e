"""Training-loop safety: the watchdog, --resume guards, interrupted checkpoint swaps, metrics.csv, missing best."""

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

import bonefrac.train as train_mod
from bonefrac import checkpoint
from bonefrac.cli import main
from bonefrac.manifest import load_manifest
from bonefrac.trainutil import Watchdog

ROOT = Path(__file__).resolve().parents[1]
# Small and short: these tests check the loop's bookkeeping, not what it learns.
QUICK = ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "train.epochs=1", "--set", "data.size=64",
         "--set", "train.watchdog_s=0", "--set", "train.eval_batch_size=4",
         "--set", "train.max_steps_per_epoch=2"]


def train(manifest, out, *extra) -> int:
    return main(["train", "--manifest", str(manifest), "--out", str(out), *QUICK, *extra])


@pytest.fixture(scope="module")
def base(sample_manifest, tmp_path_factory) -> Path:
    """One finished 1-epoch run selected on val loss; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert train(sample_manifest, out, "--set", "train.monitor=loss") == 0
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def quiet_watchdogs(monkeypatch) -> list:
    """Replace train's Watchdog by one that records firing instead of ending the pytest process."""
    dogs = []

    def make(timeout_s, on_timeout):
        dogs.append(Watchdog(timeout_s, on_timeout, exit_process=False))
        return dogs[-1]

    monkeypatch.setattr(train_mod, "Watchdog", make)
    return dogs


def test_watchdog_does_not_fire_during_a_slow_validation(sample_manifest, tmp_path, monkeypatch):
    dogs = quiet_watchdogs(monkeypatch)
    real_infer = train_mod.infer_logits

    # Each val batch 3 s, under the 10 s limit (a CPU step takes ~2.5 s, twice that on a loaded machine); the pass
    # (4 batches) outlasts it.
    def slow_infer(*args, **kwargs):
        time.sleep(3.0)
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(train_mod, "infer_logits", slow_infer)
    assert train(sample_manifest, tmp_path / "run", "--set", "train.watchdog_s=10") == 0
    assert not dogs[0].fired.is_set()


def test_watchdog_timeout_keeps_the_last_consistent_checkpoint(sample_manifest, tmp_path, monkeypatch):
    out, dogs = tmp_path / "run", quiet_watchdogs(monkeypatch)
    real_epoch, seen = train_mod._train_epoch, {}

    def hangs_after_second_epoch(*args, **kwargs):
        if "epoch1_weights" not in seen:
            seen["epoch1_weights"] = b""
            return real_epoch(*args, **kwargs)
        seen["epoch1_weights"] = (out / "last" / checkpoint.WEIGHTS_FILE).read_bytes()
        real_epoch(*args, **kwargs)  # the weights move on, then the run "hangs" and the watchdog fires
        dogs[0].on_timeout()
        raise KeyboardInterrupt  # stands in for the watchdog's process exit

    monkeypatch.setattr(train_mod, "_train_epoch", hangs_after_second_epoch)
    assert train(sample_manifest, out, "--set", "train.epochs=2") == 130
    assert checkpoint.read_meta(out / "last")["epoch"] == 1
    # epoch 1's weights, untouched by the watchdog
    assert (out / "last" / checkpoint.WEIGHTS_FILE).read_bytes() == seen["epoch1_weights"]


def test_monitor_loss_keeps_the_real_val_loss_in_metrics_csv(base):
    rows = pd.read_csv(base / "metrics.csv")
    assert list(rows.columns).count("val_loss") == 1 and not any(c.startswith("val_loss.") for c in rows.columns)
    assert (rows.val_loss > 0).all()  # the selection score is -loss; the column must hold the loss itself


def test_resume_refuses_a_changed_config_but_allows_more_epochs(base, sample_manifest, tmp_path, caplog):
    out = copy_run(base, tmp_path)
    saved = (out / "config.json").read_text()
    assert train(sample_manifest, out, "--resume", "--set", "data.size=96", "--set", "train.monitor=auroc") == 2
    assert "data.size: 64 -> 96" in caplog.text and "train.monitor: 'loss' -> 'auroc'" in caplog.text
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss",
                 "--set", "model.arch=resnet18") == 2
    assert "model.arch" in caplog.text and "Traceback" not in caplog.text
    assert (out / "config.json").read_text() == saved
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss", "--set", "train.epochs=2") == 0
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1, 2]


def test_a_swap_killed_between_renames_is_recovered_and_guards_a_fresh_run(base, sample_manifest, tmp_path,
                                                                           caplog):
    out = copy_run(base, tmp_path)
    last = out / "last"
    shutil.copytree(last, out / "last.tmp")  # the new checkpoint, complete ...
    os.replace(last, out / "last.old")  # ... and the old one moved aside: the kill came between the renames
    assert train(sample_manifest, out) == 2 and "already holds a run" in caplog.text
    assert checkpoint.load_train_state(last)["epoch"] == 1  # recovered from last.tmp
    assert last.is_dir() and not (out / "last.tmp").exists()

    shutil.rmtree(out / "last.old")
    os.replace(last, out / "last.old")
    (out / "last.tmp").mkdir()  # a .tmp killed before its JSON was written is incomplete: .old wins
    assert checkpoint.read_meta(last)["epoch"] == 1 and not (out / "last.old").exists()


def test_a_fresh_run_is_refused_where_any_run_file_is_left(tmp_path, sample_manifest):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch\n1\n")
    assert train(sample_manifest, tmp_path / "run") == 2


def test_training_that_never_writes_best_is_an_error(sample_manifest, tmp_path, caplog, monkeypatch):
    # A val score that is nan every epoch (e.g. diverged training) never improves, so `best` never appears.
    monkeypatch.setattr(train_mod.metrics, "selection_score", lambda *args: float("nan"))
    assert train(sample_manifest, tmp_path / "nan", "--set", "train.monitor=accuracy") == 2
    assert "no epoch gave a valid validation accuracy" in caplog.text
    monkeypatch.undo()

    rows = load_manifest(sample_manifest)  # paths come back absolute, so the copy may live anywhere
    rows = rows[(rows.split != "val") | (rows.label == "no_fracture")]
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    report = sample_manifest.parent / "prepare_report.json"
    (tmp_path / "prepare_report.json").write_text(json.dumps({"class_names": ["no_fracture", "fracture"]})
                                                  if not report.is_file() else report.read_text())
    assert train(tmp_path / "manifest.csv", tmp_path / "one_class") == 2
    assert "val split has no images of class 'fracture'" in caplog.text
