"""A built wheel carries the shipped models, and an installed package finds its copy of them."""

import importlib.util
import logging
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bonefrac import shipped
from bonefrac.copydetect import META_FILE as DETECTOR_META
from bonefrac.checkpoint import META_FILE as MODEL_META
from bonefrac.copydetect import SHIPPED_NAME, resolve_detector, shipped_detector_path
from bonefrac.errors import BonefracError
from bonefrac.predict import DEFAULT_MODEL_NAME, default_model_path

ROOT = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 25_000_000  # the two shipped models are ~17 MB; far more means something else got in


def _fake_layout(tmp_path, monkeypatch, checkout: bool, package: bool) -> tuple[Path, Path]:
    """Point bonefrac.shipped at a fake checkout models/ and a fake installed bonefrac/_shipped, each holding
    both shipped folders (marker files only) when asked; the environment variables are unset."""
    monkeypatch.delenv("BONEFRAC_MODEL", raising=False)
    monkeypatch.delenv("BONEFRAC_COPY_DETECTOR", raising=False)
    dirs = tmp_path / "checkout" / "models", tmp_path / "site-packages" / "bonefrac" / "_shipped"
    for root, wanted in zip(dirs, (checkout, package)):
        for name, marker in ((DEFAULT_MODEL_NAME, MODEL_META), (SHIPPED_NAME, DETECTOR_META)):
            if wanted:
                (root / name).mkdir(parents=True)
                (root / name / marker).write_text("{}")
    monkeypatch.setattr(shipped, "CHECKOUT_DIR", dirs[0])
    monkeypatch.setattr(shipped, "PACKAGE_DIR", dirs[1])
    return dirs


def test_installed_package_copy_is_found_without_a_checkout(tmp_path, monkeypatch):
    _, package = _fake_layout(tmp_path, monkeypatch, checkout=False, package=True)
    assert default_model_path() == package / DEFAULT_MODEL_NAME
    assert shipped_detector_path() == package / SHIPPED_NAME
    assert resolve_detector("auto") == package / SHIPPED_NAME


def test_checkout_models_come_before_the_package_copy(tmp_path, monkeypatch):
    checkout, package = _fake_layout(tmp_path, monkeypatch, checkout=True, package=True)
    assert default_model_path() == checkout / DEFAULT_MODEL_NAME
    assert shipped_detector_path() == checkout / SHIPPED_NAME
    monkeypatch.setenv("BONEFRAC_MODEL", str(package / DEFAULT_MODEL_NAME))  # the variable comes first
    monkeypatch.setenv("BONEFRAC_COPY_DETECTOR", str(package / SHIPPED_NAME))
    assert default_model_path() == package / DEFAULT_MODEL_NAME
    assert shipped_detector_path() == package / SHIPPED_NAME


def test_nothing_shipped_names_both_places(tmp_path, monkeypatch, caplog):
    checkout, package = _fake_layout(tmp_path, monkeypatch, checkout=False, package=False)
    with pytest.raises(BonefracError, match="--model") as caught:
        default_model_path()
    assert str(checkout / DEFAULT_MODEL_NAME) in str(caught.value)
    assert str(package / DEFAULT_MODEL_NAME) in str(caught.value)
    with caplog.at_level(logging.WARNING):
        assert resolve_detector("auto") is None
    assert str(package / SHIPPED_NAME) in caplog.text


def test_only_a_source_checkout_has_a_models_folder_of_its_own(tmp_path):
    assert shipped.CHECKOUT_DIR == ROOT / "models"  # these tests run from the checkout
    (tmp_path / "repo" / "src" / "bonefrac").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    assert shipped.checkout_models(tmp_path / "repo" / "src" / "bonefrac") == tmp_path / "repo" / "models"
    installed = tmp_path / "deps" / "bonefrac"  # `pip install --target deps`: deps/../models is not ours
    installed.mkdir(parents=True)
    (tmp_path / "models" / DEFAULT_MODEL_NAME).mkdir(parents=True)
    assert shipped.checkout_models(installed) is None
    site = tmp_path / "lib" / "python3.12" / "site-packages" / "bonefrac"
    site.mkdir(parents=True)
    assert shipped.checkout_models(site) is None
    assert shipped.checkout_models(Path("/bonefrac")) is None  # a package right under / (was an IndexError)


def _why_no_wheel() -> str | None:
    """Why this environment cannot build a wheel offline (no build isolation), or None when it can."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed, and building in isolation would need the network"
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None and importlib.util.find_spec("wheel") is None:
        return "this setuptools needs the `wheel` package to build wheels, and it is not installed"
    return None


def _build(hook: str, source: Path, out: Path, pattern: str) -> Path:
    """Run a PEP 517 hook of setuptools (as `pip wheel --no-build-isolation` does) in `source`; the file made."""
    out.mkdir()
    code = f"import sys, setuptools.build_meta as backend; backend.{hook}(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (built,) = out.glob(pattern)
    return built


@pytest.mark.skipif(_why_no_wheel() is not None, reason=str(_why_no_wheel()))
def test_wheels_carry_the_shipped_models_and_no_litter(tmp_path):
    # Two wheels: one built straight from the source tree (`pip wheel .`, setup.py's copy) and one from the sdist
    # (what pip does with a source release, so MANIFEST.in is checked too). Built in a copy of the tree, so
    # nothing lands in the repository.
    tree = _source_tree(tmp_path / "tree")
    litter = [tree / "models" / name / junk for name in (DEFAULT_MODEL_NAME, SHIPPED_NAME)
              for junk in (".DS_Store", "__pycache__/x.cpython-312.pyc", ".ipynb_checkpoints/a.json")]
    litter.append(tree / "src" / "bonefrac" / "serve" / "static" / "__pycache__" / "x.pyc")
    for path in litter:  # what an editor, a notebook or Python leaves behind must not ship
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    sdist = _build("build_sdist", tree, tmp_path / "sdist", "*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    for i, source in enumerate((tree, unpacked)):
        _check_wheel(_build("build_wheel", source, tmp_path / f"wheel{i}", "*.whl"))


def _check_wheel(wheel: Path) -> None:
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, f"{wheel.name} is {wheel.stat().st_size:,} bytes"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in (DEFAULT_MODEL_NAME, SHIPPED_NAME):
            folder = ROOT / "models" / name
            files = {f"bonefrac/_shipped/{name}/{p.relative_to(folder).as_posix()}": p for p in folder.rglob("*")
                     if p.is_file() and not any(part[0] == "." or part == "__pycache__"
                                                for part in p.relative_to(folder).parts)}
            assert {n for n in names if n.startswith(f"bonefrac/_shipped/{name}/")} == set(files)
            for entry, path in files.items():
                assert zf.read(entry) == path.read_bytes(), f"{entry} differs"
        assert "bonefrac/serve/static/index.html" in names  # the service's web page, package data
        assert not [n for n in names if "__pycache__" in n or "/." in n], sorted(names)


def _source_tree(dest: Path) -> Path:
    """A copy of the checkout's tracked and not-ignored files: the sdist is built there, so building leaves
    nothing (egg-info, a stale SOURCES.txt) in the repository."""
    try:
        # safe.directory: CI may run as another user than the clone's owner, which git otherwise refuses.
        listed = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(ROOT), "ls-files", "-z", "--cached",
                                 "--others", "--exclude-standard"], capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"needs a git checkout to copy the source tree from: {exc}")
    for rel in filter(None, listed.decode().split("\0")):
        if (ROOT / rel).is_file():  # a deleted but still tracked file is not part of the tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest
