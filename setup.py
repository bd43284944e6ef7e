"""Build hook for the shipped models; everything else about the package is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import FileError

# models/<name>/ at the repository root is the one copy in git (the source checkout and editable installs read
# it there), but a wheel has no repository root: copy each folder into the built package as
# bonefrac/_shipped/<name>/, where an installed bonefrac finds it (bonefrac.shipped). MANIFEST.in puts the
# folders into the sdist, so a wheel built from the sdist carries them too.
SHIPPED = ("fracatlas_effnet_lite", "copy_detector")


def shipped_files(folder: Path) -> list[Path]:
    """The files of a shipped model folder that go into a wheel: regular files, without hidden files or caches
    (an editor's .DS_Store, .ipynb_checkpoints, __pycache__) that a copy of the whole tree would ship too."""
    def wanted(path: Path) -> bool:
        parts = path.relative_to(folder).parts
        return path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in parts)
    return [p for p in sorted(folder.rglob("*")) if wanted(p)]


class BuildPyWithModels(build_py):
    """build_py that also copies the shipped model folders into the package (not for editable installs)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads models/ in place
            return
        shipped = Path(self.build_lib) / "bonefrac" / "_shipped"
        shutil.rmtree(shipped, ignore_errors=True)  # a reused build/ folder must not ship files deleted since
        for name in SHIPPED:
            source = Path(__file__).resolve().parent / "models" / name
            if not source.is_dir():  # fail here, not on the air-gapped machine that installs the wheel
                raise FileError(f"models/{name} is missing: the wheel would ship without it")
            target = shipped / name
            for path in shipped_files(source):
                dest = target / path.relative_to(source)
                self.mkpath(str(dest.parent))
                self.copy_file(str(path), str(dest))


setup(cmdclass={"build_py": BuildPyWithModels})
