"""prepare with patient/study IDs (group_col; a file listed under two IDs links both), warnings about unused ID
columns, and broken symbolic links."""

import json
import logging
import os
import shutil

import pandas as pd
import pytest

from bonefrac.errors import BonefracError
from bonefrac.manifest import prepare
from conftest import pattern, save


def patients_csv(root, n_patients=20, per_patient=3, column="group", blank=()):
    """A labels CSV of `n_patients` x `per_patient` distinct images (file, diagnosis, `column` = patient ID)."""
    lines = [f"file,diagnosis,{column}"]
    for p in range(n_patients):
        for k in range(per_patient):
            name = f"img/p{p:02d}_{k}.png"
            save(pattern(1000 + 10 * p + k), root / name)
            lines.append(f"{name},{'fracture' if p % 2 else 'normal'},{'' if p in blank else f'P{p:03d}'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def outputs(out):
    df = pd.read_csv(out / "manifest.csv", dtype=str)
    df["patient"] = df["path"].str.extract(r"(p\d\d)_\d\.png$", expand=False)
    return df, json.loads((out / "prepare_report.json").read_text())


def test_group_col_keeps_each_patients_images_in_one_split(tmp_path):
    csv = patients_csv(tmp_path / "data")
    report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis", group_col="group",
                     workers=1)
    df, on_disk = outputs(tmp_path / "out")
    assert (df.groupby("patient")["split"].nunique() == 1).all()  # was: 13 of 20 patients in several splits
    assert (df.groupby("patient")["group"].nunique() == 1).all() and df["group"].nunique() == 20
    assert set(df["split"]) == {"train", "val", "test"}
    grouping = on_disk["grouping"]
    assert grouping["group_col"] == "group" and "column:group" in grouping["linked_by"] and grouping["n_ids"] == 20
    assert report["n_groups"] == 20 and report["n_duplicate_groups"] == 0  # a patient's images are no duplicates
    assert report["label_conflict_groups"] == []


def test_without_group_col_an_id_like_column_is_named_in_a_warning(tmp_path, caplog):
    csv = patients_csv(tmp_path / "data", n_patients=4, column="Patient ID")
    with caplog.at_level(logging.WARNING):
        report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis", workers=1)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'Patient ID'" in warning and "--group-col" in warning
    assert "P000" not in caplog.text  # names the column, never a patient's ID
    assert report["grouping"]["group_col"] is None and report["n_groups"] == 12
    df, _ = outputs(tmp_path / "out")
    assert "Patient ID" in df.columns  # carried into the manifest as before


def test_group_col_carried_column_and_blank_ids(tmp_path, caplog):
    csv = patients_csv(tmp_path / "data", n_patients=6, column="patient_id", blank=(0,))
    with caplog.at_level(logging.WARNING):
        report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis",
                         group_col="patient_id", split_all="test", workers=1)
    assert "3 row(s) with an empty or placeholder 'patient_id'" in caplog.text
    assert "look like patient" not in caplog.text  # the column is used: nothing to warn about
    df, _ = outputs(tmp_path / "out")
    assert df["patient_id"].notna().sum() == 15 and "given_group" not in df.columns
    assert df[df.patient == "p00"]["group"].nunique() == 3  # no ID: only its duplicates would join it
    assert df[df.patient != "p00"].groupby("patient")["group"].nunique().eq(1).all()
    assert report["grouping"]["n_images_without_id"] == 3 and report["n_groups"] == 8


def test_patients_and_duplicates_form_connected_groups(tmp_path):
    root = tmp_path / "data"
    for name, seed in [("a1", 1), ("a2", 2), ("b1", 3), ("c1", 4), ("d1", 5)]:
        save(pattern(seed), root / f"{name}.png")
    shutil.copy(root / "a2.png", root / "b2.png")  # the same radiograph filed under patient B too
    shutil.copy(root / "d1.png", root / "x.png")  # a copy with no patient ID
    rows = [("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B"), ("c1", "C"), ("d1", "D"), ("x", "")]
    (root / "labels.csv").write_text("image,label,study_id\n" + "".join(
        f"{n}.png,{'fracture' if n in ('a1', 'c1') else 'normal'},{s}\n" for n, s in rows))
    report = prepare(tmp_path / "out", labels_csv=root / "labels.csv", group_col="study_id", split_all="test",
                     workers=1)
    df = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str)
    group = dict(zip(df["path"].str.extract(r"(\w+)\.png$", expand=False), df["group"]))
    assert group["a1"] == group["a2"] == group["b1"] == group["b2"]  # A - copy - B: one component
    assert group["d1"] == group["x"] and len({group["a1"], group["c1"], group["d1"]}) == 3
    assert report["grouping"]["n_groups_joining_several_ids"] == 1
    assert [d["kind"] for d in report["duplicate_groups"]] == ["exact", "exact"]


def test_a_file_listed_again_under_another_patient_links_both(tmp_path, caplog):
    root = tmp_path / "data"
    for name, seed in [("a1", 1), ("shared", 2), ("b1", 3), ("c1", 4), ("d1", 5), ("e1", 6)]:
        save(pattern(seed), root / f"{name}.png")
    rows = [("a1", "A"), ("shared", "A"), ("b1", "B"), ("shared", "B"), ("c1", "C"), ("d1", ""), ("shared", ""),
            ("e1", "E")]
    (root / "labels.csv").write_text("image,label,patient\n" + "".join(
        f"{n}.png,{'fracture' if n in ('a1', 'c1') else 'normal'},{s}\n" for n, s in rows))
    with caplog.at_level(logging.WARNING):
        report = prepare(tmp_path / "out", labels_csv=root / "labels.csv", group_col="patient", split_all="test",
                         workers=1)
    df = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str)
    group = dict(zip(df["path"].str.extract(r"(\w+)\.png$", expand=False), df["group"]))
    assert group["a1"] == group["shared"] == group["b1"]  # was: b1 apart, patient B's images could be split up
    assert len({group["a1"], group["c1"], group["d1"], group["e1"]}) == 4 and len(df) == 6
    assert "1 file(s) are listed under several 'patient' values (e.g. " in caplog.text and "shared.png" in caplog.text
    assert "'B'" not in caplog.text  # names the file, never a patient ID
    assert report["grouping"]["n_ids"] == 4
    assert "given_group" not in df.columns and "other_given_groups" not in df.columns


def test_kept_split_that_cuts_a_patient_is_reported(tmp_path):
    csv = patients_csv(tmp_path / "data", n_patients=4)
    frame = pd.read_csv(csv, dtype=str)
    frame["split"] = ["train", "train", "test"] + ["train"] * 6 + ["val"] * 3  # patient 0 crosses train/test
    frame.to_csv(csv, index=False)
    report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis", group_col="group",
                     keep_folder_split=True, match_copies="off", workers=1)
    assert len(report["crossing_groups"]) == 1
    assert set(report["crossing_groups"][0]["splits"]) == {"train", "test"}


def test_group_col_errors_are_named(tmp_path):
    csv = patients_csv(tmp_path / "data", n_patients=2)
    with pytest.raises(BonefracError, match=r"lacks column\(s\) \['patient'\].*available"):
        prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis", group_col="patient")
    with pytest.raises(BonefracError, match="needs a labels CSV"):
        prepare(tmp_path / "out", source=tmp_path / "data", group_col="group")


def test_broken_symbolic_links_are_listed_as_rejected(tmp_path):
    src = tmp_path / "src"
    for c, name in enumerate(("fracture", "normal")):
        for i in range(4):
            save(pattern(100 * c + i), src / name / f"{name}_{i}.png")
    os.symlink(tmp_path / "gone.png", src / "normal" / "link.png")
    os.symlink(tmp_path / "gone", src / "normal" / "IM0001")  # PACS-style name: no suffix to go by
    os.symlink(tmp_path / "gone_dir", src / "lateral")  # a class folder on a drive that is not mounted
    report = prepare(tmp_path / "out", source=src, split_all="test", workers=1)
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"link.png", "IM0001", "lateral"}  # were missing: silently dropped
    assert all(r.startswith("broken symbolic link") for r in reasons.values())
    assert "gone.png" in reasons["link.png"] and report["n_images"] == 8


def test_a_csv_listed_broken_link_says_so(tmp_path):
    csv = patients_csv(tmp_path / "data", n_patients=2)
    os.symlink(tmp_path / "gone.png", tmp_path / "data" / "img" / "link.png")
    with open(csv, "a") as handle:
        handle.write("img/link.png,normal,P009\n")
    report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis", workers=1)
    (entry,) = report["rejected"]
    assert entry["path"].endswith("link.png") and entry["reason"].startswith("broken symbolic link")


def test_cli_passes_group_col(tmp_path):
    from bonefrac.cli import main

    csv = patients_csv(tmp_path / "data", column="patient_id")
    assert main(["prepare", "--labels", str(csv), "--path-col", "file", "--label-col", "diagnosis",
                 "--group-col", "patient_id", "--out", str(tmp_path / "out"), "--workers", "1"]) in (0, None)
    df, report = outputs(tmp_path / "out")
    assert (df.groupby("patient")["split"].nunique() == 1).all() and df["group"].nunique() == 20


def test_placeholder_ids_link_nothing(tmp_path, caplog):
    """'NA' / 'unknown' cells are no patient: as IDs they would join 8 unrelated patients into one group."""
    csv = patients_csv(tmp_path / "data")
    text = csv.read_text().splitlines()
    for i in range(1, 25):  # the first 8 patients' 24 rows
        head, _, _ = text[i].rpartition(",")
        text[i] = f"{head},{'NA' if i % 2 else 'unknown'}"
    csv.write_text("\n".join(text) + "\n")
    with caplog.at_level(logging.WARNING):
        prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="diagnosis", group_col="group", workers=1)
    df, _ = outputs(tmp_path / "out")
    assert df["group"].nunique() == 24 + 12  # each placeholder row alone, the other 12 patients one group each
    assert "placeholder" in caplog.text
