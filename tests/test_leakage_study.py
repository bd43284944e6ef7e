"""A tiny CPU smoke run of benchmarks/leakage_study.py: both pipelines trained and scored, JSON complete."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("leakage_study", ROOT / "benchmarks" / "leakage_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("leak") / "study"
    rc = _study().main(["--data", str(ROOT / "data" / "sample" / "labels.csv"), "--label-col", "fractured",
                        "--class-names", "no_fracture,fracture", "--max-images", "40", "--size", "64",
                        "--epochs", "1", "--aug-factor", "3", "--out", str(out), "--device", "cpu",
                        "--workers", "2", "--bootstrap", "20", "--set", "train.watchdog_s=0",
                        "--set", "data.batch_size=8"])
    assert rc == 0
    return out


def test_both_pipelines_claimed_and_clean(result):
    data = json.loads((result / "leakage_study.json").read_text())
    for pipeline in ("seed_style", "bonefrac"):
        for where in ("claimed", "clean"):
            assert 0.0 <= data[pipeline][where]["accuracy"] <= 1.0, (pipeline, where)
        assert data[pipeline]["clean"]["n"] == data["setup"]["holdout_images"]
    assert data["bonefrac"]["true_crossing_groups"] == 0  # copies inherit groups; the split never cuts one
    assert data["seed_style"]["true_crossing_groups"] > 0  # a random image split does cut them
    assert "| seed-style" in (result / "leakage_study.md").read_text()


def test_keep_folder_split_flags_the_seed_layout(result):
    """`prepare --keep-folder-split` (with the shipped copy detector, on by default there) recognises freshly
    augmented copies and flags the groups the random image split cut."""
    data = json.loads((result / "leakage_study.json").read_text())["seed_style"]
    assert data["true_groups_recovered_by_prepare"] >= data["true_groups_with_copies"] // 2, data
    assert data["crossing_groups"] > 0 and data["crossing_groups"] >= data["true_crossing_groups"] // 2, data
