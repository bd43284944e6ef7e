"""Training-loop safety: the watchdog, --resume guards, interrupted checkpoint swaps, metrics.csv, missing best."""

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

import bonefrac.train as train_mod
import bonefrac.trainstate as trainstate_mod
from bonefrac import checkpoint
from bonefrac.cli import main
from bonefrac.errors import BonefracError
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


def one_class_val_manifest(sample_manifest: Path, tmp_path: Path) -> Path:
    """A copy of the sample manifest whose val split holds only no_fracture images."""
    rows = load_manifest(sample_manifest)  # paths come back absolute, so the copy may live anywhere
    rows = rows[(rows.split != "val") | (rows.label == "no_fracture")]
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    report = sample_manifest.parent / "prepare_report.json"
    (tmp_path / "prepare_report.json").write_text(json.dumps({"class_names": ["no_fracture", "fracture"]})
                                                  if not report.is_file() else report.read_text())
    return tmp_path / "manifest.csv"


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
    assert len(dogs) == 2 and not any(d.fired.is_set() for d in dogs)  # decoding's, then training's


def test_watchdog_timeout_keeps_the_last_consistent_checkpoint(sample_manifest, tmp_path, monkeypatch):
    out, dogs = tmp_path / "run", quiet_watchdogs(monkeypatch)
    real_epoch, seen = train_mod._train_epoch, {}

    def hangs_after_second_epoch(*args, **kwargs):
        if "epoch1_weights" not in seen:
            seen["epoch1_weights"] = b""
            return real_epoch(*args, **kwargs)
        seen["epoch1_weights"] = (out / "last" / checkpoint.WEIGHTS_FILE).read_bytes()
        real_epoch(*args, **kwargs)  # the weights move on, then the run "hangs" and the watchdog fires
        dogs[-1].on_timeout()
        raise KeyboardInterrupt  # stands in for the watchdog's process exit

    monkeypatch.setattr(train_mod, "_train_epoch", hangs_after_second_epoch)
    assert train(sample_manifest, out, "--set", "train.epochs=2") == 130
    assert checkpoint.read_meta(out / "last")["epoch"] == 1
    # epoch 1's weights, untouched by the watchdog
    assert (out / "last" / checkpoint.WEIGHTS_FILE).read_bytes() == seen["epoch1_weights"]


def test_a_hang_while_decoding_images_is_caught_by_the_watchdog(sample_manifest, tmp_path, monkeypatch, caplog):
    """Decoding ran before the watchdog started: a decode stuck on a stalled network drive hung silently."""
    import bonefrac.cache as data_mod

    dogs, real = quiet_watchdogs(monkeypatch), data_mod._decode
    decoded = []

    def stalls_on_the_third(job):
        decoded.append(job[0])
        if len(decoded) == 3:
            assert dogs[0].fired.wait(30), "the watchdog did not fire while decoding hung"
            raise KeyboardInterrupt  # stands in for the watchdog's process exit
        return real(job)

    monkeypatch.setattr(data_mod, "_decode", stalls_on_the_third)
    assert train(sample_manifest, tmp_path / "run", "--set", "train.watchdog_s=1", "--set", "data.decode_workers=1",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}") == 130
    assert dogs[0].fired.is_set() and "no image was decoded for train.watchdog_s" in caplog.text


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


def test_resume_without_a_config_uses_the_runs_own(base, sample_manifest, tmp_path, caplog):
    out = copy_run(base, tmp_path)
    bare = ["train", "--manifest", str(sample_manifest), "--out", str(out), "--resume"]
    caplog.set_level("INFO", logger="bonefrac")
    # no --config and no --set: the defaults differ from the run's (size, monitor, ...), which was refused
    assert main([*bare, "--set", "train.epochs=2", "--set", "train.watchdog_s=0"]) == 0
    assert "resuming with the run's own configuration" in caplog.text
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1, 2]


def test_resume_into_a_folder_without_a_run_is_refused(sample_manifest, tmp_path, caplog):
    # a mistyped --out used to start a whole new run there with the default configuration
    assert main(["train", "--manifest", str(sample_manifest), "--out", str(tmp_path / "typo"), "--resume"]) == 2
    assert "holds no run to resume" in caplog.text and not (tmp_path / "typo").exists()
    # with a config named, --resume on a new folder starts the run there (a job script that always resumes)
    assert train(sample_manifest, tmp_path / "new", "--resume") == 0 and (tmp_path / "new" / "best").is_dir()


def test_an_unknown_architecture_is_refused_before_any_image_is_decoded(sample_manifest, tmp_path, monkeypatch,
                                                                        caplog):
    def no_data(*_args, **_kwargs):
        raise AssertionError("the data was loaded first")
    monkeypatch.setattr(train_mod, "_load_data", no_data)
    assert train(sample_manifest, tmp_path / "run", "--set", "model.arch=efficientnet_b99") == 2
    assert "unknown architecture 'efficientnet_b99'" in caplog.text


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

    assert train(one_class_val_manifest(sample_manifest, tmp_path), tmp_path / "one_class") == 2
    assert "val split has no images of class 'fracture'" in caplog.text


def test_a_run_killed_in_its_first_epoch_resumes_afresh(sample_manifest, tmp_path, monkeypatch, caplog):
    out, dogs = tmp_path / "run", quiet_watchdogs(monkeypatch)
    real_epoch = train_mod._train_epoch

    def killed(*args, **kwargs):
        dogs[-1].on_timeout()  # what the watchdog would say before ending the process
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_train_epoch", killed)
    assert train(sample_manifest, out) == 130
    assert (out / "config.json").is_file() and not (out / "last").exists()
    assert "no epoch was completed; --resume starts the run afresh" in caplog.text
    assert train(sample_manifest, out) == 2 and "already holds a run" in caplog.text  # a plain restart stays refused
    assert "finished no epoch (only config.json); pass --resume to start it afresh" in caplog.text
    monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
    (out / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")  # a row logged just before the kill
    assert train(sample_manifest, out, "--resume") == 0
    assert "starting the run afresh" in caplog.text
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1]
    assert checkpoint.read_meta(out / "last")["epoch"] == 1


def test_resume_without_last_refuses_when_more_than_the_first_epoch_finished(base, sample_manifest, tmp_path,
                                                                              caplog):
    """Only `last` gone (e.g. deleted to save disk) while best/ and metrics.csv show finished epochs: --resume must
    not start afresh over them (it deleted metrics.csv and replaced the best model)."""
    out = copy_run(base, tmp_path)
    shutil.rmtree(out / "last")
    meta = json.loads((out / "best" / checkpoint.META_FILE).read_text())
    (out / "best" / checkpoint.META_FILE).write_text(json.dumps({**meta, "epoch": 3}))
    (out / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n3,0.3\n")
    before = {f.name: f.read_bytes() for f in (out / "best").iterdir()}
    assert train(sample_manifest, out, "--resume") == 2
    assert "cannot resume" in caplog.text and "3 finished epochs" in caplog.text
    assert {f.name: f.read_bytes() for f in (out / "best").iterdir()} == before
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1, 2, 3]


def test_a_run_saved_by_more_processes_resumes_at_the_same_point_of_its_schedule(base, sample_manifest, tmp_path,
                                                                                monkeypatch):
    """`last` saved by 2 processes (half the steps per epoch: 1 here) resumed by 1 (2 steps per epoch): the
    schedule's step count is rescaled to the epochs done, and the learning rate set from it."""
    import torch

    out = copy_run(base, tmp_path)
    state_file = out / "last" / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=False)
    assert state["scheduler"]["last_epoch"] == 2  # 1 epoch of 2 steps (QUICK's max_steps_per_epoch)
    state["world"], state["scheduler"]["last_epoch"] = 2, 1
    torch.save(state, state_file)
    seen, real_pass = [], train_mod._train_pass

    def record(run, *args):
        group = run.optimizer.param_groups[0]
        seen.append((run.scheduler.last_epoch, group["lr"], group["initial_lr"] * run.scheduler.lr_lambdas[0](2)))
        return real_pass(run, *args)

    monkeypatch.setattr(train_mod, "_train_pass", record)
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss", "--set", "train.epochs=2") == 0
    assert seen[0][0] == 2 and seen[0][1] == pytest.approx(seen[0][2], rel=1e-12)


@pytest.mark.parametrize("name", [checkpoint.STATE_FILE, checkpoint.WEIGHTS_FILE])
def test_a_truncated_last_checkpoint_stops_resume_with_the_file_named(base, sample_manifest, tmp_path, monkeypatch,
                                                                       caplog, name):
    """Before any image is decoded, with bonefrac's exit status and message (was a raw traceback, exit 1)."""
    out = copy_run(base, tmp_path)
    file = out / "last" / name
    file.write_bytes(file.read_bytes()[:1000])
    monkeypatch.setattr(train_mod, "_build_run", lambda *a, **k: pytest.fail("decoded before reading last"))
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss") == 2
    assert f"{name}: cannot be read" in caplog.text and "truncated or corrupt" in caplog.text


def test_checkpoint_save_flushes_files_and_folders_before_the_swap(tmp_path, monkeypatch):
    import torch

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    checkpoint.save(tmp_path / "ck", torch.nn.Linear(2, 2), {"arch": "x"}, train_state={"epoch": 1})
    names = {Path(p).name for p in synced}
    assert {checkpoint.WEIGHTS_FILE, checkpoint.STATE_FILE, checkpoint.META_FILE, "ck.tmp", tmp_path.name} <= names


def test_a_folder_another_trainer_is_writing_is_refused(base, sample_manifest, tmp_path, caplog):
    fcntl = pytest.importorskip("fcntl")
    out = copy_run(base, tmp_path)
    with (out / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running trainer holds
        assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss") == 2
        assert "being written by another training process" in caplog.text
        assert train(sample_manifest, tmp_path / "other", "--set", "train.monitor=loss") == 0  # other folders: fine
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss", "--set", "train.epochs=2") == 0


def test_resuming_an_early_stopped_run_trains_no_further(sample_manifest, tmp_path, monkeypatch):
    out = tmp_path / "run"
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])  # epoch 1 is the best; patience 1 stops after epoch 2
    monkeypatch.setattr(train_mod.metrics, "selection_score", lambda *args: next(scores))
    args = ("--set", "train.monitor=accuracy", "--set", "train.epochs=5", "--set", "train.patience=1")
    assert train(sample_manifest, out, *args) == 0
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1, 2]
    weights = (out / "last" / checkpoint.WEIGHTS_FILE).read_bytes()
    assert train(sample_manifest, out, "--resume", *args) == 0  # e.g. a job requeue that always passes --resume
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1, 2]
    assert (out / "last" / checkpoint.WEIGHTS_FILE).read_bytes() == weights


def test_more_epochs_on_resume_continue_the_learning_rate_without_a_jump(base, sample_manifest, tmp_path):
    out = copy_run(base, tmp_path)
    quick = ("--set", "train.monitor=loss", "--set", "optim.warmup_epochs=0")
    assert train(sample_manifest, out, "--resume", *quick, "--set", "train.epochs=2") == 2  # warm-up is not
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss", "--set", "train.epochs=3") == 0
    lr = list(pd.read_csv(out / "metrics.csv").lr)
    assert len(lr) == 3 and lr[0] >= lr[1] >= lr[2]  # the 1-epoch run had decayed; it goes on decaying
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss", "--set", "train.epochs=4") == 0
    lr = list(pd.read_csv(out / "metrics.csv").lr)  # a second resume keeps the anchor it saved
    assert len(lr) == 4 and lr[2] >= lr[3]


def test_a_resume_with_more_epochs_builds_the_schedule_once_and_steps_on_at_the_saved_rate(base, sample_manifest,
                                                                                          tmp_path, monkeypatch):
    out = copy_run(base, tmp_path)
    built, rates = [], []
    real_make, real_step = train_mod.make_scheduler, train_mod.train_step
    for module in (train_mod, trainstate_mod):  # a fresh run's schedule, and a resumed one's
        monkeypatch.setattr(module, "make_scheduler", lambda *a, **k: built.append(a[1:]) or real_make(*a, **k))

    def step(step_model, model, x, y, gen, optimizer, *rest, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return real_step(step_model, model, x, y, gen, optimizer, *rest, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    assert train(sample_manifest, out, "--resume", "--set", "train.monitor=loss", "--set", "train.epochs=2") == 0
    assert len(built) == 1  # was 2: the fresh run's schedule, then the anchored one
    saved = pd.read_csv(out / "metrics.csv").lr[0]  # the rate after the first run's last step
    # The first resumed step goes on at it; the schedule built second reset it to its warm-up start (here 1.0 x lr).
    assert rates[0] == pytest.approx(saved, rel=1e-9) and rates[1] <= rates[0]


def test_lr_factor_with_an_anchor_decays_from_it_to_the_end():
    from types import SimpleNamespace

    from bonefrac.trainutil import lr_factor, resume_anchor

    ocfg = SimpleNamespace(schedule="cosine", warmup_epochs=1, min_lr_ratio=0.01)
    assert lr_factor(0, ocfg, 10, 3) == pytest.approx(0.1) and lr_factor(10, ocfg, 10, 3) == pytest.approx(1.0)
    assert lr_factor(30, ocfg, 10, 3) == pytest.approx(0.01)  # the end of the schedule
    state = {"scheduler": {"last_epoch": 30}, "lr_anchor": None}
    anchor = resume_anchor(state, ocfg, 10, 3, 6)  # 3 epochs done, now 6
    assert anchor == (30, pytest.approx(0.01))
    assert lr_factor(30, ocfg, 10, 6, anchor) == pytest.approx(0.01)  # no jump at the resume
    state = {"scheduler": {"last_epoch": 20}, "lr_anchor": None}
    anchor = resume_anchor(state, ocfg, 10, 3, 6)
    top = lr_factor(20, ocfg, 10, 3)
    assert anchor == (20, pytest.approx(top))
    assert lr_factor(21, ocfg, 10, 6, anchor) < top and lr_factor(60, ocfg, 10, 6, anchor) == pytest.approx(0.01)
    assert resume_anchor(state, ocfg, 10, 3, 3) is None  # same length: the plain schedule
    assert resume_anchor({"scheduler": {"last_epoch": 5}}, ocfg, 10, 3, 6) is None  # still warming up


def test_a_one_class_val_split_keeps_temperature_one_and_warns(sample_manifest, tmp_path, caplog):
    manifest = one_class_val_manifest(sample_manifest, tmp_path)
    assert train(manifest, tmp_path / "run", "--set", "train.monitor=loss") == 0
    assert "val split has no images of class 'fracture'" in caplog.text
    meta = checkpoint.read_meta(tmp_path / "run" / "best")
    assert meta["temperature"] == 1.0 and meta["threshold"] is None


def test_seen_images_lists_train_and_val_and_an_image_in_both_as_val():
    from bonefrac.train import seen_images

    rows = pd.DataFrame({"sha256": ["a", "b", "a", "c"], "split": ["val", "train", "train", "test"]})
    assert seen_images(rows) == {"a": "val", "b": "train"}  # was "train": the last row won


def test_resume_on_a_manifest_whose_classes_were_reordered_is_refused(base, sample_manifest, tmp_path, caplog):
    """Re-preparing with another --class-names order keeps the manifest's bytes (labels are names) but swaps every
    class index: train --resume must stop, naming both orders, before training on swapped labels."""
    out = copy_run(base, tmp_path)
    rows = load_manifest(sample_manifest)
    (tmp_path / "data").mkdir()
    rows.to_csv(tmp_path / "data" / "manifest.csv", index=False)
    saved = json.loads((out / "last" / "bonefrac.json").read_text())["class_names"]
    (tmp_path / "data" / "prepare_report.json").write_text(json.dumps({"class_names": saved[::-1]}))
    assert train(tmp_path / "data" / "manifest.csv", out, "--resume", "--set", "train.monitor=loss",
                 "--set", "train.epochs=2") == 2
    assert f"trained with the classes {saved}" in caplog.text and "swapped labels" in caplog.text


def test_the_positive_class_is_warned_about_when_guessed_by_position_and_can_be_chosen(sample_manifest, tmp_path,
                                                                                        caplog):
    """fracture/intact: neither name looks negative, so the rule takes the second class, 'intact', and every
    threshold would be about finding intact bones: train says so, and train.positive_class chooses."""
    rows = load_manifest(sample_manifest)
    rows["label"] = rows.label.replace({"no_fracture": "intact"})
    (tmp_path / "data").mkdir()
    rows.to_csv(tmp_path / "data" / "manifest.csv", index=False)
    (tmp_path / "data" / "prepare_report.json").write_text(json.dumps({"class_names": ["fracture", "intact"]}))
    manifest = tmp_path / "data" / "manifest.csv"
    assert train(manifest, tmp_path / "guessed") == 0
    assert "positive class 'intact' chosen by position" in caplog.text
    assert json.loads((tmp_path / "guessed" / "best" / "bonefrac.json").read_text())["positive_class"] == "intact"
    caplog.clear()
    assert train(manifest, tmp_path / "chosen", "--set", "train.positive_class=fracture") == 0
    assert "chosen by position" not in caplog.text
    meta = json.loads((tmp_path / "chosen" / "best" / "bonefrac.json").read_text())
    assert meta["positive_class"] == "fracture" and meta["positive_index"] == 0
    assert train(manifest, tmp_path / "bad", "--set", "train.positive_class=broken") == 2
    assert "positive class 'broken' is not one of the classes" in caplog.text and not (tmp_path / "bad").exists()


def test_checkpoint_path_mistakes_say_what_is_wrong(base, tmp_path):
    """A typo and a run folder both said "not a bonefrac checkpoint (no bonefrac.json)"."""
    with pytest.raises(BonefracError, match="no such checkpoint"):
        checkpoint.read_meta(tmp_path / "bset")
    with pytest.raises(BonefracError, match=r"a training run's folder, not a checkpoint: name .*best"):
        checkpoint.read_meta(base)
