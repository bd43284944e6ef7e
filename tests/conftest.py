"""Shared fixtures for the io/manifest tests: tiny images made in tmp_path, and the shared real data."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about a minute")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder beside the repository (``../shared/data``); skips when absent."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data folder not found: {root}")
    return root


@pytest.fixture(scope="session")
def fracatlas(shared_data) -> Path:
    root = shared_data / "fracatlas"
    if not (root / "images").is_dir():
        pytest.skip("FracAtlas images not available")
    return root


def pattern(seed: int, size=(48, 64)) -> np.ndarray:
    """A smooth random uint8 image; different seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
    return np.asarray(coarse.resize((size[1], size[0]), Image.Resampling.BICUBIC))


def save(img: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kwargs)
    return path


@pytest.fixture()
def images(tmp_path) -> list[str]:
    """Six flat grey 30 x 20 PNGs of distinct values in tmp_path (a cache to build, files to change)."""
    paths = []
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def sample_manifest(tmp_path_factory) -> Path:
    """`bonefrac prepare` run once on the embedded 100-image sample; the manifest's path."""
    from bonefrac.cli import main

    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    out = tmp_path_factory.mktemp("sample_data")
    assert main(["prepare", "--labels", str(sample / "labels.csv"), "--label-col", "fractured",
                 "--class-names", "no_fracture,fracture", "--out", str(out), "--workers", "1"]) == 0
    return out / "manifest.csv"


def interrupt_second_epoch(monkeypatch):
    """Make `bonefrac.train`'s second epoch raise KeyboardInterrupt, as a killed run; returns the undo function."""
    import bonefrac.train as train_mod

    real_epoch, calls = train_mod._train_epoch, {"n": 0}

    def dies_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_epoch", dies_in_second_epoch)
    return lambda: monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
