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
