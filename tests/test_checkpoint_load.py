"""Loading a checkpoint whose JSON does not fit its weights, lacks fields, or comes from a newer bonefrac."""

import json
import os
from pathlib import Path

import pytest

from bonefrac import backends, checkpoint
from bonefrac.errors import BonefracError

MODEL = Path(__file__).resolve().parents[1] / "models" / "fracatlas_effnet_lite"
META = json.loads((MODEL / "bonefrac.json").read_text())


def edited(tmp_path, drop=(), **changes) -> Path:
    """A copy of the shipped checkpoint (its weights linked) whose JSON has `changes` and lacks `drop`."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    meta = {k: v for k, v in {**META, **changes}.items() if k not in drop}
    (folder / "bonefrac.json").write_text(json.dumps(meta))
    os.symlink(MODEL / "model.safetensors", folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("drop, changes, why", [
    (("arch",), {}, "lacks 'arch'"),
    (("class_names",), {}, "lacks 'class_names'"),
    (("preprocess",), {}, "lacks 'preprocess'"),
    ((), {"preprocess": {**META["preprocess"], "size": "384"}}, "'preprocess.size' must be"),
    ((), {"preprocess": {k: v for k, v in META["preprocess"].items() if k != "channels"}}, "preprocess.channels"),
    ((), {"class_names": "no_fracture,fracture"}, "'class_names' must be"),
])
def test_incomplete_json_is_a_clear_error_naming_the_checkpoint(tmp_path, drop, changes, why):
    folder = edited(tmp_path, drop, **changes)
    with pytest.raises(BonefracError, match=why) as err:
        checkpoint.load(folder)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("changes, named", [
    ({"class_names": ["a", "b", "c"]}, ["3 classes", "tf_efficientnet_lite2", "'classifier.weight'"]),
    ({"arch": "tf_efficientnet_lite0"}, ["2 classes", "tf_efficientnet_lite0", "tensor '"]),
])
def test_json_that_does_not_fit_the_weights_names_the_model_and_the_first_tensor(tmp_path, changes, named):
    folder = edited(tmp_path, **changes)
    with pytest.raises(BonefracError, match="does not fit") as err:
        checkpoint.load(folder)
    assert all(part in str(err.value) for part in [str(folder), *named]), err.value


def test_a_checkpoint_from_a_newer_bonefrac_is_refused(tmp_path):
    folder = edited(tmp_path, format_version=checkpoint.FORMAT_VERSION + 1)
    for read in (checkpoint.load, checkpoint.read_meta):
        with pytest.raises(BonefracError, match="newer bonefrac.*upgrade"):
            read(folder)
    raw = json.dumps({**META, "format_version": 99})
    with pytest.raises(BonefracError, match="newer bonefrac"):
        backends._parse_meta(raw, "model.onnx")  # exported files carry the same JSON


def test_the_current_and_unversioned_formats_still_load(tmp_path):
    model, meta = checkpoint.load(edited(tmp_path, drop=("format_version",)))
    assert meta["arch"] == META["arch"] and not model.training
    assert checkpoint.read_meta(MODEL)["format_version"] == checkpoint.FORMAT_VERSION


@pytest.mark.parametrize("changes, why", [
    ({"temperature": -1.0}, "'temperature' must be a positive number"),
    ({"temperature": 0}, "'temperature' must be a positive number"),
    ({"threshold": "0.5"}, "'threshold' must be a number from 0 to 1"),
    ({"threshold": 1.5}, "'threshold' must be a number from 0 to 1"),
    ({"positive_index": 2}, "'positive_index' must be the index of one of the class names"),
    ({"positive_index": True}, "'positive_index' must be"),
])
def test_decision_fields_that_no_prediction_can_use_are_refused(tmp_path, changes, why):
    """A negative temperature silently inverted every call; a string threshold or an index past the classes
    crashed later with a traceback."""
    folder = edited(tmp_path, **changes)
    with pytest.raises(BonefracError, match=why) as err:
        checkpoint.load(folder)
    assert str(folder) in str(err.value)


def test_absent_or_null_decision_fields_still_load(tmp_path):
    checkpoint.load(edited(tmp_path, drop=("temperature",), threshold=None))


def test_a_damaged_seen_list_is_an_error_naming_the_file_and_line(tmp_path):
    (tmp_path / checkpoint.SEEN_FILE).write_text("train " + "a" * 64 + "\ntra\n")
    with pytest.raises(BonefracError, match=rf"{checkpoint.SEEN_FILE}, line 2: expected"):
        checkpoint.read_seen(tmp_path)
    (tmp_path / checkpoint.SEEN_FILE).write_text("test " + "a" * 64 + "\n")
    with pytest.raises(BonefracError, match="line 1"):
        checkpoint.read_seen(tmp_path)
    checkpoint.write_seen(tmp_path, {"b" * 64: "val"})
    assert checkpoint.read_seen(tmp_path) == {"b" * 64: "val"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.SEEN_FILE]  # no temporary file left


def test_saving_through_a_symbolic_link_replaces_its_target(tmp_path):
    """The swap renamed the link and then could not delete it: every later save failed."""
    import torch

    model = torch.nn.Linear(2, 2)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    meta = {"arch": "x", "class_names": ["a", "b"]}
    for value in (1.0, 2.0):
        torch.nn.init.constant_(model.weight, value)
        checkpoint.save(tmp_path / "link", model, meta)
    assert (tmp_path / "link").is_symlink()
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "real" / checkpoint.WEIGHTS_FILE))["weight"].eq(2.0).all()


def test_ship_model_keeps_the_model_card_and_the_other_files(tmp_path):
    """It deleted MODEL_CARD.md, data_split.csv and metrics.csv of the folder it was documented to write into."""
    import shutil
    import subprocess
    import sys

    target = shutil.copytree(MODEL, tmp_path / "shipped")
    others = sorted(p.name for p in target.iterdir() if p.name not in checkpoint.OWN_FILES)
    assert "MODEL_CARD.md" in others
    card = (target / "MODEL_CARD.md").read_bytes()
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "ship_model.py"), str(MODEL), str(target)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in target.iterdir() if p.name not in checkpoint.OWN_FILES) == others
    assert (target / "MODEL_CARD.md").read_bytes() == card
    missing = subprocess.run([sys.executable, str(root / "scripts" / "ship_model.py"), str(tmp_path / "nothing"),
                              str(tmp_path / "out")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nothing" in missing.stderr


def test_a_save_killed_between_renames_is_recovered_through_a_symbolic_link(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    meta = {"arch": "x", "class_names": ["a", "b"]}
    checkpoint.save(tmp_path / "v1", model, meta)
    os.symlink(tmp_path / "v1", tmp_path / "current")
    os.replace(tmp_path / "v1", tmp_path / "v1.tmp")  # as a kill between save's two renames leaves it
    assert checkpoint.read_meta(tmp_path / "current")["arch"] == "x"
    assert (tmp_path / "v1" / checkpoint.META_FILE).is_file()
