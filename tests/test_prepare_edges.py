"""prepare and augment on awkward inputs: split layouts with stray folders, augmented manifests prepared again
(copies stay with their sources), class names that clash as folder names, repeated rows with other labels."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from bonefrac.augment import augment_manifest
from bonefrac.errors import BonefracError
from bonefrac.manifest import load_manifest, prepare

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_rows(n: int) -> list[tuple[Path, int]]:
    labels = pd.read_csv(SAMPLE / "labels.csv")
    return [(SAMPLE / p, int(y)) for p, y in zip(labels.image[:n], labels.fractured[:n])]


def split_tree(root: Path, n: int = 24) -> Path:
    for i, (src, y) in enumerate(sample_rows(n)):
        split = "train" if i < n * 2 // 3 else ("val" if i % 2 else "test")
        folder = root / split / ("fracture" if y else "no_fracture")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / src.name)
    return root


def test_split_layout_with_a_stray_folder_is_refused_not_read_as_classes(tmp_path):
    root = split_tree(tmp_path / "data")
    (root / "__MACOSX").mkdir()  # what macOS zip files carry: ignored
    report = prepare(tmp_path / "ok", source=root, workers=1)
    assert set(report["class_names"]) == {"fracture", "no_fracture"}
    (root / "prepared").mkdir()  # e.g. an earlier --out inside the source
    with pytest.raises(BonefracError, match=r"mixes split folders \(test, train, val\) with other folders \(prepared"):
        prepare(tmp_path / "again", source=root, workers=1)


def test_an_augmented_manifest_prepared_again_keeps_copies_with_their_sources(tmp_path):
    prepare(tmp_path / "p", source=split_tree(tmp_path / "data"), workers=1, match_copies="off")
    augment_manifest(tmp_path / "p" / "manifest.csv", tmp_path / "aug", factor=2, seed=1, workers=1)
    deep = tmp_path / "deeper" / "still" / "re"  # another depth than the CSV's folder: paths must follow
    prepare(deep, labels_csv=tmp_path / "aug" / "manifest.csv", path_col="path", workers=1, match_copies="off")
    rows = load_manifest(deep / "manifest.csv").set_index("path")
    copies = rows[rows.augmented_from.fillna("") != ""]
    assert len(copies) >= 10 and all(Path(p).is_file() for p in copies.augmented_from)
    sources = rows.loc[copies.augmented_from]
    assert (sources.group.to_numpy() == copies.group.to_numpy()).all()  # re-split, never cut from the source
    assert (sources.split.to_numpy() == copies.split.to_numpy()).all()


def test_augmenting_an_augmented_manifest_keeps_provenance(tmp_path):
    prepare(tmp_path / "p", source=split_tree(tmp_path / "data"), workers=1, match_copies="off")
    augment_manifest(tmp_path / "p" / "manifest.csv", tmp_path / "a1", factor=2, seed=1, workers=1)
    augment_manifest(tmp_path / "a1" / "manifest.csv", tmp_path / "a2", factor=2, seed=2, workers=1)
    first = load_manifest(tmp_path / "a1" / "manifest.csv")
    second = load_manifest(tmp_path / "a2" / "manifest.csv")
    assert list(second.columns).count("augmented_from") == 1
    kept = second.set_index("path").loc[first.path, "augmented_from"].fillna("").to_numpy()
    assert (kept == first.augmented_from.fillna("").to_numpy()).all()
    assert len(second) > len(first)


def test_classes_whose_folder_names_clash_get_their_own_folders(tmp_path):
    images, labels = [], []
    for i, (src, _) in enumerate(sample_rows(12)):  # different images, the same six file names in both classes
        (tmp_path / f"set{i // 6}").mkdir(exist_ok=True)
        images.append(shutil.copy(src, tmp_path / f"set{i // 6}" / f"img{i % 6}.webp"))
        labels.append("a b" if i < 6 else "a_b")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": [str(p) for p in images], "label": labels}).to_csv(csv, index=False)
    prepare(tmp_path / "p", labels_csv=csv, workers=1, fractions=(1.0, 0.0, 0.0), match_copies="off")
    augment_manifest(tmp_path / "p" / "manifest.csv", tmp_path / "aug", factor=3, seed=1, workers=1)
    copies = load_manifest(tmp_path / "aug" / "manifest.csv").query("augmented_from != ''")
    copies = copies[copies.augmented_from.notna()]
    assert len(copies) == copies.path.nunique() >= 20  # no copy written over another
    assert copies.groupby("label").path.apply(lambda ps: {Path(p).parent.name for p in ps}).map(len).eq(1).all()


def test_a_repeated_row_with_another_label_is_named_in_the_report(tmp_path):
    (a, _), (b, _) = sample_rows(2)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": [str(a), str(b), str(a)], "label": ["0", "1", "1"]}).to_csv(csv, index=False)
    report = prepare(tmp_path / "p", labels_csv=csv, workers=1, split_all="test", match_copies="off")
    (reason,) = [r["reason"] for r in report["rejected"]]
    assert "another label ('1'; the first row's '0' is kept)" in reason
