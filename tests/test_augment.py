"""Offline augmentation (`bonefrac augment`) on the embedded sample: train only, groups inherited, balance,
determinism, a valid output manifest, and clear errors."""

import json
from pathlib import Path

import pandas as pd
import pytest

from bonefrac.augment import augment_manifest, target_counts
from bonefrac.cli import main
from bonefrac.errors import BonefracError
from bonefrac.manifest import class_names_for, load_manifest, prepare

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """The sample prepared, with train made imbalanced (some fracture rows dropped) so balancing has work."""
    out = tmp_path_factory.mktemp("data")
    labels = pd.read_csv(SAMPLE / "labels.csv")
    keep = pd.concat([labels[labels.fractured == 0].head(24), labels[labels.fractured == 1].head(12)])
    keep.assign(image=[str(SAMPLE / p) for p in keep.image]).to_csv(out / "labels.csv", index=False)
    prepare(out, labels_csv=out / "labels.csv", label_col="fractured", class_names=["no_fracture", "fracture"],
            workers=1)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def balanced(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "a"
    assert main(["augment", "--manifest", str(manifest), "--out", str(out), "--balance", "--seed", "3",
                 "--workers", "1"]) == 0
    return out


def test_only_train_images_are_augmented(manifest, balanced):
    src, out = load_manifest(manifest), load_manifest(balanced / "manifest.csv")
    copies = out[out.augmented_from.fillna("") != ""]
    assert len(copies) > 0 and set(copies.split) == {"train"}
    for split in ("val", "test"):  # untouched: the same images, nothing added
        assert sorted(out[out.split == split].sha256) == sorted(src[src.split == split].sha256)
    train_sources = set(src[src.split == "train"].path)
    assert set(copies.augmented_from) <= train_sources


def test_copies_inherit_group_and_label(manifest, balanced):
    src = load_manifest(manifest).set_index("path")
    copies = load_manifest(balanced / "manifest.csv").query("augmented_from == augmented_from")
    for _, row in copies.iterrows():
        assert row.group == src.at[row.augmented_from, "group"]
        assert row.label == src.at[row.augmented_from, "label"]
        assert Path(row.path).is_file() and Path(row.path).stem.startswith(Path(row.augmented_from).stem + "_aug")


def test_balance_is_reached(balanced, manifest):
    out = load_manifest(balanced / "manifest.csv")
    counts = out[out.split == "train"].label.value_counts()
    assert counts.nunique() == 1, counts.to_dict()
    report = json.loads((balanced / "augment_report.json").read_text())
    assert report["train_after"] == counts.to_dict()
    assert class_names_for(balanced / "manifest.csv", out) == ["no_fracture", "fracture"]


def test_output_manifest_is_valid(balanced):
    out = load_manifest(balanced / "manifest.csv")
    assert {"path", "label", "group", "split", "sha256", "width", "height"} <= set(out.columns)
    assert out.sha256.is_unique  # every copy is a new image, none repeats its source
    copy = out[out.augmented_from.fillna("") != ""].iloc[0]
    from bonefrac.io import read_image
    assert read_image(copy.path).shape == (copy.height, copy.width)


def test_same_seed_same_bytes_other_seed_differs(manifest, balanced, tmp_path):
    again = augment_manifest(manifest, tmp_path / "again", balance=True, seed=3, workers=2)
    other = augment_manifest(manifest, tmp_path / "other", balance=True, seed=4, workers=1)
    assert again["n_copies"] == other["n_copies"] > 0
    a = load_manifest(balanced / "manifest.csv")
    b = load_manifest(tmp_path / "again" / "manifest.csv")
    c = load_manifest(tmp_path / "other" / "manifest.csv")
    assert list(a.sha256) == list(b.sha256)
    assert list(a.sha256) != list(c.sha256)


def test_target_and_factor_counts():
    assert target_counts({"a": 10, "b": 3}, balance=True) == {"a": 10, "b": 10}
    assert target_counts({"a": 10, "b": 3}, target=6) == {"a": 10, "b": 6}
    assert target_counts({"a": 10, "b": 3}, factor=2) == {"a": 20, "b": 6}
    assert target_counts({"a": 10, "b": 3}, factor=2, balance=True) == {"a": 20, "b": 20}
    with pytest.raises(BonefracError, match="--balance"):
        target_counts({"a": 1})


def test_bad_input_fails_clearly(manifest, tmp_path, balanced):
    with pytest.raises(BonefracError, match="manifest not found"):
        augment_manifest(tmp_path / "nope.csv", tmp_path / "x", balance=True)
    with pytest.raises(BonefracError, match="already holds"):
        augment_manifest(manifest, balanced, balance=True)
    with pytest.raises(BonefracError, match="format"):
        augment_manifest(manifest, tmp_path / "y", balance=True, fmt="gif")
    assert main(["augment", "--manifest", str(manifest), "--out", str(tmp_path / "z")]) == 2
