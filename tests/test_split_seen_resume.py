"""What a split means to the later stages: an ensemble's seen lists merged with train > val > test, and a
--resume refused when the manifest's class order is not the run's."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from bonefrac import checkpoint
from bonefrac.config import Config, to_dict
from bonefrac.errors import BonefracError
from bonefrac.seen import merge_seen, seen_by_model
from bonefrac.runfolder import check_resume_config


def member(folder, lines: str) -> SimpleNamespace:
    folder.mkdir(parents=True)
    (folder / checkpoint.SEEN_FILE).write_text(lines)
    return SimpleNamespace(path=folder)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_an_image_one_member_trained_on_counts_as_train_in_an_ensemble(tmp_path, order):
    members = {"a": member(tmp_path / "a", "train AAA\ntrain BBB\nval CCC\n"),
               "b": member(tmp_path / "b", "val AAA\nval BBB\ntrain CCC\n")}
    ensemble = SimpleNamespace(members=[members[k] for k in order], meta={})
    rows = pd.DataFrame({"sha256": ["AAA", "BBB", "CCC", "DDD"]})
    # was: the later member's "val" overwrote the other's "train" (train 0 or 1, val 2 or 3)
    assert seen_by_model(ensemble, rows, "test") == {"train": 3, "val": 0, "of": 4}


def test_merge_seen_keeps_the_strongest_split():
    seen = merge_seen({"a": "test", "b": "val", "c": "train"}, {"a": "val", "b": "train", "c": "test", "d": "val"})
    assert seen == {"a": "val", "b": "train", "c": "train", "d": "val"}


def fake_run(tmp_path, class_names) -> tuple:
    """A `last` checkpoint folder (metadata only) trained with `class_names`, and a manifest whose
    prepare_report.json names the classes in the other order."""
    last = tmp_path / "run" / "last"
    last.mkdir(parents=True)
    meta = {"config": to_dict(Config()), "class_names": class_names}
    (last / checkpoint.META_FILE).write_text(json.dumps(meta))
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"path": ["x.png", "y.png"], "label": ["fracture", "no_fracture"], "group": ["g0", "g1"],
                  "split": ["train", "val"], "sha256": ["ab" * 32, "cd" * 32], "width": 8, "height": 8}
                 ).to_csv(data / "manifest.csv", index=False)
    (data / "prepare_report.json").write_text(json.dumps({"class_names": ["no_fracture", "fracture"]}))
    return last, data / "manifest.csv"


def test_resume_is_refused_when_the_class_order_changed(tmp_path):
    last, manifest = fake_run(tmp_path, ["fracture", "no_fracture"])
    # was: accepted (the manifest's bytes, and so its hash, were the same), then trained on swapped labels
    with pytest.raises(BonefracError, match=r"trained with the classes \['fracture', 'no_fracture'\].*now names "
                                            r"\['no_fracture', 'fracture'\].*--class-names fracture,no_fracture"):
        check_resume_config(last, Config(), manifest)
    (manifest.parent / "prepare_report.json").write_text(json.dumps({"class_names": ["fracture", "no_fracture"]}))
    check_resume_config(last, Config(), manifest)  # the run's own order: fine
