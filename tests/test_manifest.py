"""prepare / load_manifest: scanning, rejection, duplicate grouping, grouped stratified splits, errors."""

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonefrac.dedup import near_duplicate_pairs
from bonefrac.errors import BonefracError
from bonefrac.io import read_image, resize_gray
from bonefrac.manifest import class_names_for, dihedral_phash, load_manifest, manifest_sha256, prepare
from conftest import pattern, save

DISTINCT_XRAYS = ["IMG0000671.webp", "IMG0001337.webp", "IMG0001674.webp", "IMG0002348.webp"]


def make_folder(root, n_per_class=10, classes=("fracture", "normal"), offset=0):
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            save(pattern(offset + 100 * c + i), root / name / f"{name}_{i:02d}.png")
    return root


def read_outputs(out):
    report = json.loads((out / "prepare_report.json").read_text())
    return pd.read_csv(out / "manifest.csv", dtype={"label": str}), report


def assert_no_group_crosses_splits(df):
    assert (df.groupby("group")["split"].nunique() == 1).all()


# --- folder sources, rejection, grouping --------------------------------------------------------------------


def test_folder_source_with_bad_files_and_copies(tmp_path):
    src = make_folder(tmp_path / "src")
    original = src / "normal" / "normal_03.png"
    img = read_image(original)
    shutil.copy(original, src / "normal" / "exact_copy.png")
    save(np.rot90(img).copy(), src / "normal" / "rot90_copy.png")
    (src / "normal" / "empty.png").write_bytes(b"")
    (src / "normal" / "paper.png").write_bytes(b"%PDF-1.5\nnot an image")
    (src / "fracture" / "text.jpg").write_text("hello")
    jpeg = (src / "fracture" / "fracture_00.png").read_bytes()
    (src / "fracture" / "cut.png").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "fracture" / "notes.txt").write_text("x")
    report = prepare(tmp_path / "out", source=src, workers=1)
    df, on_disk = read_outputs(tmp_path / "out")
    assert on_disk == json.loads(json.dumps(report))
    assert list(df.columns[:7]) == ["path", "label", "group", "split", "sha256", "width", "height"]
    assert len(df) == 22 and report["n_images"] == 22 and report["class_names"] == ["fracture", "normal"]
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"empty.png", "paper.png", "text.jpg", "cut.png", "notes.txt"}
    assert "empty" in reasons["empty.png"] and "PDF" in reasons["paper.png"] and ".txt" in reasons["notes.txt"]
    by_name = df.set_index(df["path"].str.rsplit("/", n=1).str[-1])
    copies = by_name.loc[["normal_03.png", "exact_copy.png", "rot90_copy.png"], "group"]
    assert copies.nunique() == 1 and report["n_groups"] == 20
    assert {g["kind"] for g in report["duplicate_groups"]} == {"near"}
    assert all(p.startswith("../src/") for p in df["path"]) and (df["width"] * df["height"] == 64 * 48).all()
    loaded = load_manifest(tmp_path / "out" / "manifest.csv")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in loaded.path)
    assert_no_group_crosses_splits(df)


def test_dihedral_hash_matches_all_eight_transforms():
    img = pattern(7, size=(60, 90))
    ref = dihedral_phash(img)[None]
    variants = [np.rot90(img, k) for k in range(4)] + [np.rot90(img[:, ::-1], k) for k in range(4)]
    hashes = np.stack([dihedral_phash(np.ascontiguousarray(v)) for v in variants])
    pairs = near_duplicate_pairs(np.concatenate([ref, hashes]), threshold=8)
    assert {tuple(p) for p in pairs} >= {(0, j) for j in range(1, 9)}
    other = dihedral_phash(pattern(8, size=(60, 90)))[None]
    assert len(near_duplicate_pairs(np.concatenate([ref, other]), threshold=32)) == 0


def test_planted_copies_of_real_xrays_are_grouped(tmp_path, fracatlas):
    src = tmp_path / "src"
    for i, name in enumerate(DISTINCT_XRAYS):
        img = read_image(fracatlas / "images" / name)
        cls = ("a", "b")[i % 2]
        h, w = img.shape
        copies = {"orig.png": img, "rot90.png": np.rot90(img), "rot180.png": np.rot90(img, 2),
                  "rot270.png": np.rot90(img, 3), "flip.png": img[:, ::-1],
                  "small.png": resize_gray(img, (h * 4 // 5, w * 4 // 5))}
        for suffix, copy in copies.items():
            save(np.ascontiguousarray(copy), src / cls / f"{i}_{suffix}")
        save(img, src / cls / f"{i}_q70.jpg", quality=70)
    report = prepare(tmp_path / "out", source=src, workers=2)
    df, _ = read_outputs(tmp_path / "out")
    df["source"] = df["path"].str.rsplit("/", n=1).str[-1].str.split("_").str[0]
    assert len(df) == 28 and report["n_groups"] == 4
    assert (df.groupby("source")["group"].nunique() == 1).all()
    assert_no_group_crosses_splits(df)


def test_split_layout_keep_folder_split_flags_crossing_groups(tmp_path, caplog):
    src = tmp_path / "src"
    make_folder(src / "train", n_per_class=6)
    make_folder(src / "valid", n_per_class=2, offset=50)
    make_folder(src / "test", n_per_class=2, offset=70)
    leaked = read_image(src / "train" / "normal" / "normal_01.png")
    save(leaked[::-1].copy(), src / "test" / "normal" / "augmented.png")
    with caplog.at_level(logging.WARNING, logger="bonefrac.manifest"):
        # match_copies off: these smooth-noise test images are no radiographs, and the learned copy detector
        # (on by default for an audit) is not meant for them; this test is about the hash and the folder split.
        report = prepare(tmp_path / "out", source=src, keep_folder_split=True, workers=1, match_copies="off")
    df, _ = read_outputs(tmp_path / "out")
    assert report["source_type"] == "split_folder" and set(df["split"]) == {"train", "val", "test"}
    assert (df["split"] == "val").sum() == 4
    assert len(report["crossing_groups"]) == 1
    assert set(report["crossing_groups"][0]["splits"]) == {"train", "test"}
    assert any("cross" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    regrouped = prepare(tmp_path / "out2", source=src, workers=1)  # default: re-split by group
    assert regrouped["crossing_groups"] == []
    assert_no_group_crosses_splits(read_outputs(tmp_path / "out2")[0])


def test_hbfmid3_published_split_leaks(tmp_path, shared_data):
    labels = shared_data / "hbfmid3" / "labels.csv"
    if not labels.is_file():
        pytest.skip("hbfmid3 not available")
    frame = pd.read_csv(labels)
    leaky = frame.groupby(["label", "source_stem"])["published_split"].nunique()
    stems = leaky[leaky > 1].groupby(level="label").head(2).index
    subset = frame[pd.MultiIndex.from_frame(frame[["label", "source_stem"]]).isin(stems)].copy()
    assert subset["label"].nunique() >= 2
    subset["image"] = [str(shared_data / "hbfmid3" / p) for p in subset["image"]]
    subset = subset.rename(columns={"published_split": "split"})
    subset.to_csv(tmp_path / "seed.csv", index=False)
    report = prepare(tmp_path / "out", labels_csv=tmp_path / "seed.csv", keep_folder_split=True, workers=1)
    assert len(report["crossing_groups"]) >= 1


def test_split_all_and_seed_repeatability(tmp_path):
    src = make_folder(tmp_path / "src", n_per_class=20)
    prepare(tmp_path / "a", source=src, seed=1, workers=1)
    prepare(tmp_path / "b", source=src, seed=1, workers=1)
    prepare(tmp_path / "c", source=src, seed=2, workers=1)
    a, b, c = (read_outputs(tmp_path / d)[0] for d in "abc")
    assert a["split"].tolist() == b["split"].tolist() and a["split"].tolist() != c["split"].tolist()
    counts = a.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == 14).all() and (counts["val"] == 3).all() and (counts["test"] == 3).all()
    report = prepare(tmp_path / "d", source=src, split_all="test", workers=1)
    assert set(read_outputs(tmp_path / "d")[0]["split"]) == {"test"}
    assert report["counts"]["test"] == {"fracture": 20, "normal": 20}


# --- CSV sources --------------------------------------------------------------------------------------------


def csv_dataset(tmp_path, labels, extra=None):
    rows = []
    for i, label in enumerate(labels):
        save(pattern(300 + i), tmp_path / "imgs" / f"{i}.png")
        rows.append({"file": f"imgs/{i}.png", "y": label, "site": f"s{i % 3}", "width": 1})
    frame = pd.DataFrame(rows)
    for key, value in (extra or {}).items():
        frame[key] = value
    frame.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "labels.csv"


def test_csv_integer_labels_with_class_names(tmp_path):
    csv = csv_dataset(tmp_path, [0, 1] * 6)
    report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="y",
                     class_names="no_fracture,fracture", workers=1)
    df, _ = read_outputs(tmp_path / "out")
    assert report["class_names"] == ["no_fracture", "fracture"]
    assert set(df["label"]) == {"no_fracture", "fracture"} and "site" in df.columns
    assert (df["width"] == 64).all()  # the CSV's own width column is recomputed, not carried
    loaded = load_manifest(tmp_path / "out" / "manifest.csv")
    assert class_names_for(tmp_path / "out" / "manifest.csv", loaded) == ["no_fracture", "fracture"]


def test_csv_one_class_test_set_allowed_with_class_names(tmp_path):
    csv = csv_dataset(tmp_path, [1] * 4)
    report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="y",
                     class_names=["no_fracture", "fracture"], split_all="test", workers=1)
    assert report["counts"]["test"] == {"no_fracture": 0, "fracture": 4}


def test_csv_missing_file_is_rejected_not_fatal(tmp_path):
    csv = csv_dataset(tmp_path, ["a", "b", "a", "b"])
    (tmp_path / "imgs" / "2.png").unlink()
    report = prepare(tmp_path / "out", labels_csv=csv, path_col="file", label_col="y", workers=1)
    assert report["n_images"] == 3 and report["rejected"][0]["reason"] == "file not found"


@pytest.mark.parametrize("labels,kwargs,message", [
    ([0, 1, 2, 0], {"class_names": "neg,pos"}, "not covered by class_names"),
    (["a", "b", "c", "a"], {"class_names": "a,b"}, "unknown label"),
    (["a", "", "b", "a"], {}, "empty 'y'"),
    (["a", "a", "a"], {}, "only one class"),
    ([0, 1], {"path_col": "image"}, r"lacks column\(s\) \['image'\].*available.*'file'"),
])
def test_csv_label_errors(tmp_path, labels, kwargs, message):
    csv = csv_dataset(tmp_path, labels)
    options = {"path_col": "file", "label_col": "y", "workers": 1, **kwargs}
    with pytest.raises(BonefracError, match=message):
        prepare(tmp_path / "out", labels_csv=csv, **options)


def test_input_errors(tmp_path):
    with pytest.raises(BonefracError, match="not found"):
        prepare(tmp_path / "out", source=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BonefracError, match="no class folders"):
        prepare(tmp_path / "out", source=tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(BonefracError, match="no image files"):
        prepare(tmp_path / "out", source=tmp_path / "empty")
    make_folder(tmp_path / "one", classes=("only",), n_per_class=3)
    with pytest.raises(BonefracError, match="only one class"):
        prepare(tmp_path / "out", source=tmp_path / "one", workers=1)
    make_folder(tmp_path / "two", n_per_class=2)
    with pytest.raises(BonefracError, match="unknown label"):
        prepare(tmp_path / "out", source=tmp_path / "two", class_names="fracture,other", workers=1)
    with pytest.raises(BonefracError, match="keep_folder_split"):
        prepare(tmp_path / "out", source=tmp_path / "two", keep_folder_split=True, workers=1)
    (tmp_path / "bad.csv").write_bytes(b'image,label\n"a.png,1\nb.png,0,9,9\n')
    with pytest.raises(BonefracError, match="cannot read CSV"):
        prepare(tmp_path / "out", labels_csv=tmp_path / "bad.csv")
    with pytest.raises(BonefracError, match="fractions"):
        prepare(tmp_path / "out", source=tmp_path / "two", fractions=(0.5, 0.5, 0.5))


# --- reading manifests back ---------------------------------------------------------------------------------


def test_load_manifest_resolves_relative_paths_and_validates(tmp_path):
    frame = pd.DataFrame({"path": ["imgs/a.png"], "label": ["1"], "group": ["g0"], "split": ["train"],
                          "sha256": ["x"], "width": [4], "height": [4]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    loaded = load_manifest(tmp_path / "m.csv")
    assert loaded["path"][0] == str((tmp_path / "imgs" / "a.png").resolve()) and loaded["label"][0] == "1"
    assert class_names_for(tmp_path / "m.csv", loaded) == ["1"]
    assert manifest_sha256(tmp_path / "m.csv") == hashlib.sha256((tmp_path / "m.csv").read_bytes()).hexdigest()
    frame.drop(columns=["group", "sha256"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(BonefracError, match=r"\['group', 'sha256'\].*available"):
        load_manifest(tmp_path / "bad.csv")
    with pytest.raises(BonefracError, match="not found"):
        load_manifest(tmp_path / "nope.csv")


# --- the real benchmark -------------------------------------------------------------------------------------


def test_fracatlas_prepare_groups_duplicates(tmp_path, fracatlas):
    report = prepare(tmp_path / "out", labels_csv=fracatlas / "labels.csv", label_col="fractured",
                     class_names="no_fracture,fracture", workers=2)
    df, _ = read_outputs(tmp_path / "out")
    assert report["n_images"] == len(df) == 4083 and report["n_rejected"] == 0
    assert 80 <= report["n_duplicate_groups"] <= 200 and 3850 <= report["n_groups"] <= 4000
    assert df["sha256"].duplicated().sum() == 84  # byte-identical copies...
    assert (df.groupby("sha256")["group"].nunique() == 1).all()  # ...always share a group
    assert_no_group_crosses_splits(df)
    share = df.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert (share["train"] - 0.70).abs().max() < 0.03
    assert ((share[["val", "test"]] - 0.15).abs() < 0.03).all().all()
    assert report["elapsed_s"] < 120


def test_rows_without_a_group_become_their_own_groups(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("path,label,group,split,sha256,width,height\n"
                                    "a.png,x,g1,test,aa,9,9\nb.png,x,,test,bb,9,9\nc.png,y,,test,cc,9,9\n")
    with caplog.at_level(logging.WARNING):
        df = load_manifest(tmp_path / "m.csv")
    assert df.group.nunique() == 3 and df.group[0] == "g1"  # blank cells are not one shared "nan" group
    assert "2 row(s) without a group" in caplog.text


def test_a_class_too_rare_to_reach_every_split_is_named(tmp_path, caplog):
    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    labels = pd.read_csv(sample / "labels.csv")
    rare = pd.concat([labels[labels.fractured == 0].head(30), labels[labels.fractured == 1].head(2)])
    rare["image"] = [str((sample / p).resolve()) for p in rare.image]
    rare.to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level(logging.WARNING):
        prepare(tmp_path / "out", labels_csv=tmp_path / "labels.csv", label_col="fractured",
                class_names=["no_fracture", "fracture"])
    assert re.search(r"split '(val|test)' has no images of class\(es\) \['fracture'\]", caplog.text)


def test_manifest_moved_with_its_images_still_finds_them(tmp_path):
    """Paths are stored relative to the manifest: copy data and manifest elsewhere (another machine, another
    mount point), delete the originals, and the copy loads with every image found."""
    make_folder(tmp_path / "a" / "src")
    prepare(tmp_path / "a" / "out", source=tmp_path / "a" / "src", workers=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    df = load_manifest(tmp_path / "b" / "out" / "manifest.csv")
    assert len(df) == 20 and all(Path(p).is_file() and "/b/src/" in p for p in df.path)
