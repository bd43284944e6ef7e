"""prepare and augment on awkward inputs: split layouts with stray folders, augmented manifests prepared again
(copies stay with their sources), class names and file stems that clash, repeated rows with other labels,
tiny images, blank manifest cells, file names of augmented copies, another class order in the same --out,
file names that are not UTF-8, an --out that is a file."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonefrac.augment import augment_manifest
from bonefrac.config import AugmentConfig
from bonefrac.errors import BonefracError
from bonefrac.manifest import load_manifest, prepare

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_rows(n: int) -> list[tuple[Path, int]]:
    labels = pd.read_csv(SAMPLE / "labels.csv")
    return [(SAMPLE / p, int(y)) for p, y in zip(labels.image[:n], labels.fractured[:n])]


def class_tree(root: Path, rows: list[tuple[Path, int]]) -> Path:
    """root/a/* and root/b/* (label 1 -> b) holding copies of the sample images `rows`."""
    for src, y in rows:
        folder = root / ("b" if y else "a")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / src.name)
    return root


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
    prepare(deep, labels_csv=tmp_path / "aug" / "manifest.csv", workers=1, match_copies="off")  # path_col found
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


def test_repeated_stems_never_take_another_sources_copy_name(tmp_path):
    # Sources a, a (another folder) and a_1: the repeated `a` at row 1 became `a_1`, the third source's own stem,
    # and both wrote images/<class>/a_1_aug0.png.
    rows = sample_rows(4)
    names = [("p1", "a"), ("p2", "a"), ("p3", "a_1"), ("p4", "b")]
    images = []
    for (folder, stem), (src, _) in zip(names, rows):
        (tmp_path / folder).mkdir()
        images.append(shutil.copy(src, tmp_path / folder / f"{stem}.webp"))
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": [str(p) for p in images], "label": ["x"] * 3 + ["y"]}).to_csv(csv, index=False)
    prepare(tmp_path / "p", labels_csv=csv, workers=1, fractions=(1.0, 0.0, 0.0), match_copies="off")
    augment_manifest(tmp_path / "p" / "manifest.csv", tmp_path / "aug", factor=3, seed=1, workers=1)
    copies = load_manifest(tmp_path / "aug" / "manifest.csv")
    copies = copies[copies.augmented_from.notna() & (copies.augmented_from != "")]
    copies = copies[copies.label == "x"]
    assert len(copies) == 6 and copies.path.nunique() == 6
    for row in copies.itertuples():  # every row describes the pixels in its file
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256


def test_a_one_pixel_wide_image_can_be_augmented_with_blur(tmp_path):
    from PIL import Image

    for i, shape in enumerate([(40, 1), (1, 30), (30, 30)]):
        folder = tmp_path / "src" / ("x" if i < 2 else "y")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.arange(shape[0] * shape[1]).reshape(shape) * 7 + i * 50).astype(np.uint8)).save(
            folder / f"im{i}.png")
    prepare(tmp_path / "p", source=tmp_path / "src", workers=1, fractions=(1.0, 0.0, 0.0), match_copies="off")
    acfg = AugmentConfig(blur_p=1.0)
    augment_manifest(tmp_path / "p" / "manifest.csv", tmp_path / "aug", factor=2, seed=0, workers=1, acfg=acfg)
    assert len(load_manifest(tmp_path / "aug" / "manifest.csv")) == 6


def test_a_manifest_with_a_blank_sha256_is_refused_by_name(tmp_path):
    rows = sample_rows(4)
    frame = pd.DataFrame({"path": [str(p) for p, _ in rows], "label": ["a", "b", "a", "b"],
                          "group": ["g0", "g1", "g2", "g3"], "split": "train", "sha256": ["ab" * 32] * 4,
                          "width": 64, "height": 64})
    frame.loc[2, "sha256"] = ""
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(BonefracError, match=r"1 row\(s\) without a sha256 \(the first is data row 3\)"):
        load_manifest(tmp_path / "manifest.csv")


def _labels_csv(tmp_path, rows, name="labels.csv") -> Path:
    csv = tmp_path / name
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(csv, index=False)
    return csv


def test_the_split_does_not_depend_on_row_order(tmp_path):
    rows = [(str(p), "fracture" if y else "no_fracture") for p, y in sample_rows(60)]
    splits = []
    for name, order in (("a", rows), ("b", rows[::-1])):
        prepare(tmp_path / name, labels_csv=_labels_csv(tmp_path, order, f"{name}.csv"), workers=1, seed=7,
                match_copies="off")
        m = load_manifest(tmp_path / name / "manifest.csv")
        splits.append(dict(zip(m.sha256, m.split)))
    assert splits[0] == splits[1]  # was: 44 of 100 sample images moved when the rows were shuffled


def test_copies_of_a_missing_source_stay_together(tmp_path):
    rows = sample_rows(40)
    frame = pd.DataFrame({"image": [str(p) for p, _ in rows], "label": [y for _, y in rows]})
    # every 4 consecutive images pose as copies of one source that is not in the table (moved, unreadable)
    frame["augmented_from"] = [str(tmp_path / f"gone_{i // 4}.png") for i in range(len(frame))]
    csv = tmp_path / "labels.csv"
    frame.to_csv(csv, index=False)
    prepare(tmp_path / "p", labels_csv=csv, class_names="0,1", workers=1, match_copies="off")
    m = load_manifest(tmp_path / "p" / "manifest.csv")
    per_source = m.groupby("augmented_from").agg(groups=("group", "nunique"), splits=("split", "nunique"))
    assert len(per_source) == 10 and (per_source.groups == 1).all() and (per_source.splits == 1).all()


def test_blank_images_are_rejected_not_grouped_together(tmp_path):
    from PIL import Image

    for i, (label, value) in enumerate([("a", 40), ("a", 128), ("b", 200), ("b", 255)]):
        (tmp_path / "src" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), value, np.uint8)).save(tmp_path / "src" / label / f"flat{i}.png")
    class_tree(tmp_path / "src", sample_rows(8))
    report = prepare(tmp_path / "p", source=tmp_path / "src", workers=1, match_copies="off")
    reasons = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert reasons == {f"flat{i}.png": f"blank image (every pixel is {v})" for i, v in enumerate([40, 128, 200, 255])}


def test_hidden_folders_inside_class_folders_are_skipped(tmp_path):
    rows = sample_rows(12)
    class_tree(tmp_path / "src", rows)
    (tmp_path / "src" / "a" / ".ipynb_checkpoints").mkdir()
    shutil.copy(rows[0][0], tmp_path / "src" / "a" / ".ipynb_checkpoints" / "x-checkpoint.webp")
    prepare(tmp_path / "p", source=tmp_path / "src", workers=1, match_copies="off")
    assert len(load_manifest(tmp_path / "p" / "manifest.csv")) == 12


def test_empty_splits_and_bad_options_are_named(tmp_path, caplog):
    rows = [(str(p), lab) for (p, _), lab in zip(sample_rows(4), ["a", "b", "a", "b"])]
    csv = _labels_csv(tmp_path, rows)
    with caplog.at_level("WARNING"):
        prepare(tmp_path / "p", labels_csv=csv, workers=1, match_copies="off")
    assert "split 'test' is empty: 4 duplicate groups are too few" in caplog.text  # was silent
    for bad in ({"fractions": "0.7,0.15,0.15"}, {"fractions": (float("nan"), 0.5, 0.5)}, {"seed": -1}):
        with pytest.raises(BonefracError, match="fractions|seed"):
            prepare(tmp_path / "q", labels_csv=csv, workers=1, match_copies="off", **bad)


def test_a_file_listed_in_two_splits_of_a_kept_split_is_reported_as_a_leak(tmp_path, caplog):
    rows = sample_rows(12)
    frame = pd.DataFrame({"image": [str(p) for p, _ in rows], "label": [y for _, y in rows],
                          "split": ["train"] * 8 + ["val", "val", "test", "test"]})
    frame = pd.concat([frame, frame.iloc[[0]].assign(split="test")])  # image 0 again, now in test
    csv = tmp_path / "labels.csv"
    frame.to_csv(csv, index=False)
    with caplog.at_level("WARNING"):
        report = prepare(tmp_path / "p", labels_csv=csv, class_names="0,1", keep_folder_split=True, workers=1,
                         match_copies="off")
    leak = [c for c in report["crossing_groups"] if c.get("same_file")]
    assert len(leak) == 1 and set(leak[0]["splits"]) == {"train", "test"}  # was: no crossing group at all
    assert "listed in two splits" in caplog.text
    (reason,) = [r["reason"] for r in report["rejected"]]
    assert reason.startswith("listed again in split 'test' (kept in 'train')")
    # a link in another split folder to a file of the first is the same file
    tree = split_tree(tmp_path / "tree", 12)
    (src,) = list((tree / "train").glob("*/*"))[:1]
    (tree / "test" / src.parent.name).mkdir(parents=True, exist_ok=True)
    (tree / "test" / src.parent.name / "link.webp").symlink_to(src)
    report = prepare(tmp_path / "q", source=tree, keep_folder_split=True, workers=1, match_copies="off")
    assert [c for c in report["crossing_groups"] if c.get("same_file")]


def test_a_grey_inverted_copy_joins_its_source(tmp_path):
    from PIL import Image

    from bonefrac.io import read_image

    rows = sample_rows(10)
    class_tree(tmp_path / "src", rows)
    source = rows[0][0]
    inverted = tmp_path / "src" / ("b" if rows[0][1] else "a") / "inverted.png"  # e.g. a MONOCHROME1 export
    Image.fromarray(255 - read_image(source)).save(inverted)
    prepare(tmp_path / "p", source=tmp_path / "src", workers=1, match_copies="off")
    m = load_manifest(tmp_path / "p" / "manifest.csv").set_index("path")
    assert m.group[str(inverted.resolve())] == m.group[str((tmp_path / "src" / inverted.parent.name /
                                                              source.name).resolve())]
    assert m.group.nunique() == 10  # and nothing else merged


def test_a_different_manifest_in_out_is_kept_unless_overwrite(tmp_path):
    data = split_tree(tmp_path / "data")
    prepare(tmp_path / "p", source=data, workers=1, match_copies="off")
    before = (tmp_path / "p" / "manifest.csv").read_bytes()
    prepare(tmp_path / "p", source=data, workers=1, match_copies="off")  # the same manifest again: fine
    with pytest.raises(BonefracError, match="already holds a different manifest.*--overwrite") as err:
        prepare(tmp_path / "p", source=data, workers=1, match_copies="off", keep_folder_split=True)
    drawn = pd.read_csv(tmp_path / "p" / "manifest.csv")
    moved = int((drawn.split != drawn.path.map(lambda p: Path(p).parent.parent.name)).sum())  # vs the folders'
    assert moved > 1 and f"({moved} images in another split)" in str(err.value)  # says what would change
    assert (tmp_path / "p" / "manifest.csv").read_bytes() == before and not list((tmp_path / "p").glob("*.new"))
    prepare(tmp_path / "p", source=data, workers=1, match_copies="off", keep_folder_split=True, overwrite=True)
    assert (tmp_path / "p" / "manifest.csv").read_bytes() != before


def test_csv_paths_that_resolve_nowhere_get_a_hint(tmp_path):
    labels = tmp_path / "elsewhere" / "labels.csv"
    labels.parent.mkdir()
    pd.read_csv(SAMPLE / "labels.csv").head(12).to_csv(labels, index=False)  # paths relative to SAMPLE, not here
    with pytest.raises(BonefracError, match="none of the 12 image files exists.*relative to the CSV's folder"):
        prepare(tmp_path / "p", labels_csv=labels, label_col="fractured", workers=1, match_copies="off")


def rotated_copies(root: Path, rows, names=("{}_aug0", "{}_aug1")) -> Path:
    """class_tree plus, per source, copies rotated by a few degrees (which the perceptual hash misses) named
    after the source's stem by `names`."""
    from PIL import Image

    class_tree(root, rows)
    for k, (src, y) in enumerate(rows):
        image = Image.open(src).convert("L")
        for i, name in enumerate(names):
            image.rotate(6 + 3 * i + k % 3).save(root / ("b" if y else "a") / f"{name.format(src.stem)}.png")
    return root


def test_names_of_augmented_copies_that_the_hash_missed_are_warned_about(tmp_path, caplog):
    root = rotated_copies(tmp_path / "src", sample_rows(8))
    with caplog.at_level("WARNING"):
        report = prepare(tmp_path / "p", source=root, workers=1)  # the default: no copy detector
    families = report["copy_matcher"]["copy_name_families"]
    assert families["n_families"] >= 4 and "--match-copies auto" in families["hint"]  # was: silent
    assert f"{families['n_families']} file-name families look like augmented copies" in caplog.text
    assert "--match-copies auto" in caplog.text


def test_ordinary_file_names_give_no_copy_warning(tmp_path, caplog):
    root = rotated_copies(tmp_path / "src", sample_rows(8), names=("other_{}", "{}x"))  # no copy endings
    with caplog.at_level("WARNING"):
        report = prepare(tmp_path / "p", source=root, workers=1)
    assert report["copy_matcher"]["copy_name_families"]["n_families"] == 0
    assert "look like augmented copies" not in caplog.text


def test_copy_name_families_need_a_copy_ending_and_several_groups():
    from bonefrac.groups import copy_name_families

    names = ["IMG_01", "IMG_02", "IMG_03",  # numbered distinct images: no family
             "hand", "hand_1", "foot (2)", "foot", "knee_rot90_aug2", "knee_flip", "t_jpg.rf.0a1b2c3d",
             "t_jpg.rf.9f8e7d6c", "leg", "leg_aug0"]
    groups = list(range(len(names) - 2)) + ["same", "same"]  # leg's copy was grouped by the hash: no leak
    families = copy_name_families([f"/d/{n}.png" for n in names], groups)
    assert sorted(sorted(Path(p).stem for p in f) for f in families) == [
        ["foot", "foot (2)"], ["hand", "hand_1"], ["knee_flip", "knee_rot90_aug2"],
        ["t_jpg.rf.0a1b2c3d", "t_jpg.rf.9f8e7d6c"]]


def test_another_class_order_in_the_same_out_is_refused_unless_overwrite(tmp_path):
    data = split_tree(tmp_path / "data")
    prepare(tmp_path / "p", source=data, workers=1, match_copies="off")
    report = tmp_path / "p" / "prepare_report.json"
    before = report.read_text()
    assert json.loads(before)["class_names"] == ["fracture", "no_fracture"]
    # the manifest's bytes are the same (labels are names); only what each class index means would change
    with pytest.raises(BonefracError, match=r"class order \['fracture', 'no_fracture'\], now \['no_fracture', "
                                            r"'fracture'\].*--overwrite"):
        prepare(tmp_path / "p", source=data, workers=1, match_copies="off", class_names="no_fracture,fracture")
    assert report.read_text() == before  # was: rewritten, and `train --resume` then trained on swapped labels
    prepare(tmp_path / "p", source=data, workers=1, match_copies="off", class_names="no_fracture,fracture",
            overwrite=True)
    assert json.loads(report.read_text())["class_names"] == ["no_fracture", "fracture"]
    assert not list((tmp_path / "p").glob("*.part"))


def test_a_file_name_that_is_not_utf8_is_rejected_and_the_rest_prepared(tmp_path):
    root = class_tree(tmp_path / "src", sample_rows(8))
    src, _ = sample_rows(9)[8]
    bad = os.fsencode(root / "a") + b"/caf\xe9.webp"  # a Latin-1 name, as another system wrote it
    with open(bad, "wb") as handle:
        handle.write(src.read_bytes())
    report = prepare(tmp_path / "p", source=root, workers=1, match_copies="off")  # was: UnicodeEncodeError
    (entry,) = [r for r in report["rejected"] if "UTF-8" in r["reason"]]
    assert entry["path"].endswith("caf\\xe9.webp")
    assert len(load_manifest(tmp_path / "p" / "manifest.csv")) == 8
    json.dumps(report, ensure_ascii=False).encode("utf-8")  # the report holds only writable text


def test_blank_and_unknown_split_cells_are_named_not_a_traceback(tmp_path):
    rows = sample_rows(4)
    frame = pd.DataFrame({"path": [str(p) for p, _ in rows], "label": ["a", "b", "a", "b"],
                          "group": ["g0", "g1", "g2", "g3"], "split": ["train", "", "holdout", "test"],
                          "sha256": ["ab" * 32] * 4, "width": 64, "height": 64})
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(BonefracError, match=r"unknown split value\(s\) \['', 'holdout'\]"):  # was: TypeError
        load_manifest(tmp_path / "manifest.csv")


def test_an_out_that_is_a_file_is_refused_before_any_decoding(tmp_path, monkeypatch):
    import bonefrac.manifest as manifest_mod

    data = class_tree(tmp_path / "src", sample_rows(6))
    (tmp_path / "taken").write_text("not a folder")
    monkeypatch.setattr(manifest_mod, "_analyse", lambda *a: pytest.fail("decoded before checking --out"))
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):  # was: FileExistsError after all decoding
        with pytest.raises(BonefracError, match=r"taken is a file, not a folder; choose another --out"):
            prepare(out, source=data, workers=1, match_copies="off")


def test_a_csv_split_column_with_other_values_is_ignored_when_prepare_draws_the_split(tmp_path, caplog):
    """A labels CSV meant to be re-split may carry a 'split' column saying "holdout" or nothing: prepare draws its
    own split (with a warning); only keeping the given split needs train/val/test in every row."""
    rows = sample_rows(12)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": [str(p) for p, _ in rows], "label": [y for _, y in rows],
                  "split": ["holdout", ""] * 6}).to_csv(csv, index=False)
    prepare(tmp_path / "p", labels_csv=csv, workers=1, match_copies="off")  # was: unknown split value(s)
    assert "ignored, prepare draws its own split" in caplog.text
    assert set(load_manifest(tmp_path / "p" / "manifest.csv").split) <= {"train", "val", "test"}
    with pytest.raises(BonefracError, match=r"unknown split value\(s\) \['', 'holdout'\]"):
        prepare(tmp_path / "q", labels_csv=csv, workers=1, match_copies="off", keep_folder_split=True)


def test_a_split_column_is_not_reported_as_dropped(tmp_path, caplog):
    """With --keep-folder-split the CSV's split is kept, yet the log listed it among columns "recomputed by prepare
    and not carried over"."""
    import logging

    import pandas as pd

    from bonefrac.manifest import prepare

    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    labels = pd.read_csv(sample / "labels.csv").head(40)
    labels = labels.assign(image=[str(sample / p) for p in labels.image],
                           split=(["train"] * 28 + ["val"] * 6 + ["test"] * 6), group=range(40))
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level(logging.INFO):
        prepare(tmp_path / "out", labels_csv=tmp_path / "labels.csv", label_col="fractured",
                class_names=["no_fracture", "fracture"], keep_folder_split=True, workers=1)
    dropped = [r.getMessage() for r in caplog.records if "recomputed by prepare" in r.getMessage()]
    assert dropped and "'group'" in dropped[0] and "'split'" not in dropped[0]


def test_the_refusal_to_replace_a_manifest_says_what_would_change(tmp_path):
    from bonefrac.manifest import _difference

    old = pd.DataFrame({"path": ["a", "b", "c"], "label": ["x", "y", "x"], "split": ["train", "val", "test"],
                        "group": ["1", "2", "3"]})
    new = pd.DataFrame({"path": ["a", "b", "d", "e"], "label": ["y", "y", "x", "x"],
                        "split": ["train", "val", "test", "test"], "group": ["1", "2", "4", "5"]})
    old.to_csv(tmp_path / "old.csv", index=False)
    new.to_csv(tmp_path / "new.csv", index=False)
    assert _difference(tmp_path / "old.csv", tmp_path / "new.csv") == "2 images added, 1 image removed, " \
                                                                    "1 image relabelled"
    (tmp_path / "junk.csv").write_text("no,paths\n1,2\n")
    assert "could not be compared" in _difference(tmp_path / "junk.csv", tmp_path / "new.csv")
