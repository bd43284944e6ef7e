"""The decoded-image cache against the outside world: a decoder upgrade, a killed build's workers, a full disk."""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bonefrac
import bonefrac.cache as data
from bonefrac.errors import BonefracError


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.fromarray(np.full((8, 8), i % 256, np.uint8)).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


def test_a_changed_decoder_rebuilds_the_cache(tmp_path, monkeypatch):
    paths, cache_dir = _images(tmp_path / "imgs", 3), tmp_path / "cache"
    data.build_cache(paths, [""] * 3, 8, cache_dir, workers=1, progress=False)
    decoded = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    data.build_cache(paths, [""] * 3, 8, cache_dir, workers=1, progress=False)
    assert decoded == []  # same decoder: reused
    # raising=False: on code without a fingerprint the patch is inert and the stale cache is (wrongly) reused
    monkeypatch.setattr(data, "decoder_fingerprint", lambda: "an upgraded decoder", raising=False)
    data.build_cache(paths, [""] * 3, 8, cache_dir, workers=1, progress=False)
    assert decoded == paths and len(list(cache_dir.glob("*.u8"))) == 2


def test_the_decoder_fingerprint_covers_the_library_versions(monkeypatch):
    import importlib.metadata

    def fingerprint():
        data.decoder_fingerprint.cache_clear()
        return data.decoder_fingerprint()

    base = fingerprint()
    monkeypatch.setattr(data.PIL, "__version__", "0.0.1")
    pillow = fingerprint()

    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_package)  # pydicom absent: "none", no crash
    assert len({base, pillow, fingerprint()}) == 3
    monkeypatch.undo()
    assert fingerprint() == base


def test_a_full_disk_is_a_clear_error_and_leaves_no_part_file(tmp_path, monkeypatch):
    paths, cache_dir = _images(tmp_path / "imgs", 4), tmp_path / "cache"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(BonefracError, match=rf"disk space for the image cache {re.escape(str(cache_dir))}.*\.u8: "
                                            r"it needs 1,024 bytes"):
        data.build_cache(paths, [""] * 4, 16, cache_dir, workers=1, progress=False)
    assert list(cache_dir.iterdir()) == []


_CHILD = textwrap.dedent("""
    import sys, time
    import bonefrac.cache as data
    real = data.decode_image
    def slow(*args, **kwargs):  # keeps the workers busy until the test has killed this process
        time.sleep(0.3)
        return real(*args, **kwargs)
    data.decode_image = slow
    paths = sys.argv[2:]
    data.build_cache(paths, [""] * len(paths), 8, sys.argv[1], workers=2, progress=False)
""")


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that run the same command line (the pool's workers)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and (entry / "cmdline").read_bytes() == own:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_decode_workers_die_with_a_killed_build(tmp_path):
    paths = _images(tmp_path / "imgs", 64)  # 64: the least that _map hands to worker processes
    (tmp_path / "child.py").write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(bonefrac.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "cache"), *paths], env=env)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
            workers = _children(child.pid)
        assert len(workers) == 2, "the build never started its two workers"
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 5
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, workers)), "decode workers outlived their killed parent"
    finally:  # end only what this test started, by id
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)


def test_the_decoder_fingerprint_works_from_a_zip_archive(tmp_path):
    """A zip or frozen install has no io.py on disk: reading it by path failed, and with it every cache build."""
    import zipfile

    src = Path(data.__file__).parent
    with zipfile.ZipFile(tmp_path / "bf.zip", "w") as archive:
        for file in src.rglob("*.py"):
            archive.write(file, Path("bonefrac") / file.relative_to(src))
    code = "import bonefrac.cache as d; print(d.decoder_fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path / "bf.zip")},
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data.decoder_fingerprint.cache_clear()
    assert out.stdout.strip() == data.decoder_fingerprint()  # the same bytes give the same key
