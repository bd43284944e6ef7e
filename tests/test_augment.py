"""Offline augmentation (`bonefrac augment`) on the embedded sample: train only, groups inherited, balance,
determinism, a valid output manifest, and clear errors."""

import hashlib
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


def _hand_manifest(folder: Path, sha256: list[str]) -> Path:
    """Train rows a0, a1 (the same sample image twice) and b0; `sha256` gives their cells."""
    import shutil

    images = sorted((SAMPLE / "images").iterdir())[:2]
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{stem}{src.suffix}" for stem, src in (("a0", images[0]), ("a1", images[0]), ("b0", images[1]))]
    for name, src in zip(names, (images[0], images[0], images[1])):
        shutil.copy(src, folder / name)
    pd.DataFrame({"path": names, "label": ["a", "a", "b"], "group": ["g0", "g0", "g1"],
                  "split": "train", "sha256": sha256, "width": 64, "height": 64}).to_csv(folder / "manifest.csv",
                                                                                        index=False)
    return folder / "manifest.csv"


def test_exact_duplicate_sources_get_different_copies(tmp_path):
    same = hashlib.sha256((SAMPLE / "labels.csv").read_bytes()).hexdigest()  # any one digest for both a rows
    manifest = _hand_manifest(tmp_path / "m", [same, same, "cd" * 32])
    augment_manifest(manifest, tmp_path / "aug", factor=2, seed=0, workers=1)
    out = load_manifest(tmp_path / "aug" / "manifest.csv")
    copies = out[out.augmented_from.fillna("").map(lambda p: Path(p).stem in ("a0", "a1"))]
    assert len(copies) == 2 and copies.sha256.nunique() == 2


def test_a_sha256_cell_that_is_not_hex_still_seeds_copies(tmp_path):
    manifest = _hand_manifest(tmp_path / "m", ["from-the-hospital-export-1", "from-the-hospital-export-2", "x"])
    report = augment_manifest(manifest, tmp_path / "aug", factor=2, seed=0, workers=1)
    assert report["n_copies"] == 3


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), 0.5])
def test_a_factor_that_is_not_a_finite_number_of_at_least_one_is_a_clear_error(factor):
    """nan passed the `< 1` check and crashed in int(round(...)) with a traceback; inf overflowed."""
    with pytest.raises(BonefracError, match="--factor must be a number >= 1"):
        target_counts({"a": 3}, factor=factor)


def test_augmentation_switched_off_is_refused_rather_than_reported_falsely(manifest, tmp_path):
    """augment.enabled=false used to write transformed copies under a report saying "enabled": false."""
    assert main(["augment", "--manifest", str(manifest), "--out", str(tmp_path / "a"), "--factor", "1.1",
                 "--set", "augment.enabled=false"]) == 2
    assert not (tmp_path / "a" / "manifest.csv").exists()


def test_copy_names_differ_beyond_case(tmp_path):
    """`Img.png` and `img.png` (two folders, one class) both gave `Img_aug0` / `img_aug0`: one file on macOS and
    Windows, so one copy overwrote the other there."""
    from bonefrac.augment import _stems

    rows = pd.DataFrame({"path": ["/d/a/Img.png", "/d/b/img.png", "/d/c/other.png"]}, index=[4, 7, 9])
    stems = _stems(rows)
    assert len({s.casefold() for s in stems}) == 3 and stems[2] == "other"
