"""scripts/make_threeclass_csv.py: the binary column and --regroup joining groups with source stems."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _script():
    spec = importlib.util.spec_from_file_location("make_threeclass_csv", ROOT / "scripts" / "make_threeclass_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(tmp_path: Path) -> Path:
    # rows 0/1 share a source stem but not a pixel group; row 2 shares pixel group g2 with row 3 (no stem)
    df = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(5)],
                       "label": ["fracture", "fracture", "no_fracture", "no_fracture", "fracture"],
                       "group": ["g0", "g1", "g2", "g2", "g4"], "split": ["test"] * 5,
                       "sha256": [f"{i:064d}" for i in range(5)], "width": 10, "height": 10,
                       "source_key": ["bonebreak:a", "bonebreak:a", "hbfmid3:", "hbfmid3:", "hbfmid3:b"]})
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def test_regroup_keep_split_joins_stems_and_keeps_every_split(tmp_path):
    out = tmp_path / "g"
    report = _script().regroup(_manifest(tmp_path), out, keep_split=True)
    df = pd.read_csv(out / "manifest.csv")
    assert (df.split == "test").all()
    assert df.group[0] == df.group[1] and df.group[2] == df.group[3]  # joined by stem / kept pixel group
    assert len({df.group[0], df.group[2], df.group[4]}) == 3  # an empty stem ('hbfmid3:') joins nothing
    assert report["n_groups"] == 3 and report["n_pixel_groups"] == 4


@pytest.mark.skipif(not (SHARED / "hbfmid3" / "labels.csv").is_file(), reason="needs ../shared/data")
def test_merge_adds_a_binary_fractured_column():
    df = _script().merge(SHARED)
    assert set(df.fractured) == {0, 1}
    assert ((df.fractured == 0) == (df.label == "no_fracture")).all()
