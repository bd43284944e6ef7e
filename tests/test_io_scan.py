"""Folder scans and label reading: linked sub-folders followed (loops skipped and reported), hidden folders
skipped, every image suffix and suffix-less DICOM recognised, and CSV labels that would split or invent classes
refused."""

import logging
import os

import numpy as np
import pandas as pd
import pytest

from bonefrac.errors import BonefracError
from bonefrac.io import image_files
from bonefrac.sources import collect, resolve_labels
from conftest import pattern, save


def _link(target, link):
    try:
        os.symlink(target, link, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links cannot be made here")


def _rel(paths, root):
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def test_image_files_follows_linked_folders_and_survives_a_link_loop(tmp_path, caplog):
    root, elsewhere = tmp_path / "scans", tmp_path / "hospB"
    save(pattern(0), root / "a.png")
    save(pattern(1), elsewhere / "b.png")
    _link(elsewhere, root / "linked")
    _link(root, root / "linked_back")  # a loop: would list everything again, forever
    with caplog.at_level(logging.WARNING):
        assert _rel(image_files(root), root) == ["a.png", "linked/b.png"]
    assert "linked_back" in caplog.text and "scanned already" in caplog.text


def test_image_files_skips_hidden_folders_and_knows_every_jpeg_suffix(tmp_path):
    for folder in (".ipynb_checkpoints", ".Trash-1000", "__MACOSX", "ok/.hidden"):
        save(pattern(0), tmp_path / folder / "copy.png")
    for name in ("a.jfif", "b.jpe", "c.JPG"):
        save(pattern(2), tmp_path / "ok" / name, format="JPEG")
    assert _rel(image_files(tmp_path), tmp_path) == ["ok/a.jfif", "ok/b.jpe", "ok/c.JPG"]


def test_prepare_scan_follows_linked_folders_and_reports_a_loop(tmp_path):
    root = tmp_path / "src"
    for cls in ("fracture", "no_fracture"):
        save(pattern(len(cls)), root / cls / "a.png")
    save(pattern(7), tmp_path / "hospB" / "b1.png")
    _link(tmp_path / "hospB", root / "fracture" / "hospB")
    _link(root / "no_fracture", root / "no_fracture" / "again")
    rows, rejected, kind, _ = collect(root, None, None, "label", set())
    assert kind == "folder"
    assert sorted(zip(_rel(rows.path, tmp_path), rows.label)) == [
        ("hospB/b1.png", "fracture"), ("src/fracture/a.png", "fracture"), ("src/no_fracture/a.png", "no_fracture")]
    assert [(os.path.basename(r["path"]), "scanned already" in r["reason"]) for r in rejected] == [("again", True)]


@pytest.mark.parametrize("target", ["root", "sibling"])
def test_a_link_into_another_class_or_the_root_cannot_relabel_its_images(tmp_path, target):
    """A link in class a leading to the dataset root or to class b used to list b's images under a as well, and
    prepare kept a's (wrong) label for them."""
    root = tmp_path / "src"
    for i, cls in enumerate(("a", "b", "c")):
        save(pattern(i), root / cls / f"{cls}0.png")
    _link(root if target == "root" else root / "b", root / "a" / "more")
    rows, rejected, _, _ = collect(root, None, None, "label", set())
    assert sorted(zip(_rel(rows.path, root), rows.label)) == [("a/a0.png", "a"), ("b/b0.png", "b"), ("c/c0.png", "c")]
    assert [os.path.basename(r["path"]) for r in rejected] == ["more"] and "another class" in rejected[0]["reason"]


def test_image_files_does_not_climb_a_link_to_a_parent_folder(tmp_path):
    save(pattern(0), tmp_path / "scans" / "day1" / "a.png")
    save(pattern(1), tmp_path / "scans" / "day2" / "b.png")
    _link(tmp_path / "scans", tmp_path / "scans" / "day1" / "up")
    assert _rel(image_files(tmp_path / "scans" / "day1"), tmp_path / "scans" / "day1") == ["a.png"]


def test_a_suffixless_dicom_beside_the_class_folders_is_reported_as_stray(tmp_path):
    pytest.importorskip("pydicom")
    from test_io import write_dicom

    root = tmp_path / "src"
    for cls in ("fracture", "no_fracture"):
        save(pattern(len(cls)), root / cls / "a.png")
    write_dicom(root / "IM0001", np.zeros((4, 4), np.uint16))
    (root / "README").write_text("not an image")
    _, rejected, _, _ = collect(root, None, None, "label", set())
    assert [(os.path.basename(r["path"]), r["reason"]) for r in rejected] == [
        ("IM0001", "image outside any class folder (no label)")]


def _labels_csv(tmp_path, labels):
    for i in range(len(labels)):
        save(pattern(i), tmp_path / f"{i}.png")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": [f"{i}.png" for i in range(len(labels))], "label": labels}).to_csv(csv, index=False)
    return csv


def test_labels_differing_only_in_case_or_spaces_are_refused_by_name(tmp_path):
    csv = _labels_csv(tmp_path, ["fracture", "Fracture", " fracture", "normal"])
    rows, *_ = collect(None, csv, None, "label", set())
    with pytest.raises(BonefracError, match="differ only in case.*'Fracture' / 'fracture'"):
        resolve_labels(rows["label"], None)


@pytest.mark.parametrize("placeholder", ["NA", "N/A", "nan", "None", "null", " "])
def test_na_like_labels_are_missing_labels_not_a_class(tmp_path, placeholder):
    csv = _labels_csv(tmp_path, ["fracture", placeholder, "normal"])
    with pytest.raises(BonefracError, match=r"empty 'label' \(a missing label.*line\(s\) \[3\]"):
        collect(None, csv, None, "label", set())


@pytest.mark.parametrize("name", ["None", "NA", "null", "nan"])
def test_a_class_folder_named_like_a_missing_value_is_refused_at_prepare(tmp_path, name):
    """pandas reads such a label back from manifest.csv as NaN: prepare succeeded and every later stage failed."""
    with pytest.raises(BonefracError, match=rf"class name\(s\) \['{name}'\] read as missing values"):
        resolve_labels(pd.Series(["fracture", name, "fracture"]), None)
    with pytest.raises(BonefracError, match="read as missing values"):
        resolve_labels(pd.Series(["0", "1"]), ["fracture", name])


def test_class_names_in_two_unicode_normal_forms_are_one_class():
    """A CSV typed on one system (NFC) and folders made on macOS (NFD) spell 'ñormal' with different code points."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "ñormal"), unicodedata.normalize("NFD", "ñormal")
    assert nfc != nfd
    labels, names = resolve_labels(pd.Series([nfc, nfd, "fracture"]), None)
    assert names == ["fracture", nfc] and set(labels) == {"fracture", nfc}
    assert resolve_labels(pd.Series([nfd, "fracture"]), [nfc, "fracture"])[1] == [nfc, "fracture"]
    from bonefrac.metrics import positive_class_index

    assert positive_class_index([nfc, "fracture"], nfd) == 0
