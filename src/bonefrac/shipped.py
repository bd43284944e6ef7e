"""Where the models that ship with bonefrac are: the source checkout's models/<name>, else the installed copy.

models/ at the repository root is the one copy in git; setup.py copies its folders into wheels as
bonefrac/_shipped/<name>, because an installed package has no repository root to look in.
"""

from __future__ import annotations

from pathlib import Path


def checkout_models(package_dir: Path) -> Path | None:
    """The models/ folder of the source checkout that holds `package_dir` (src/bonefrac beside pyproject.toml),
    or None: for an installed package the same relative path is some unrelated folder (`pip install --target
    /deps` would look in /models)."""
    if package_dir.parent.name != "src":  # also a package right under / (no parents to climb)
        return None
    root = package_dir.parent.parent
    return root / "models" if (root / "pyproject.toml").is_file() else None


def _checkout_dir() -> Path | None:
    # The path as imported first: a checkout whose src/ is a link resolves to outside it.
    here = Path(__file__).absolute().parent
    return checkout_models(here) or checkout_models(here.resolve())


CHECKOUT_DIR = _checkout_dir()
PACKAGE_DIR = Path(__file__).resolve().parent / "_shipped"


def candidates(name: str) -> list[Path]:
    """The folders that may hold the shipped model `name`, in lookup order: the source checkout's models/<name>
    (editable installs, `make demo`; none for an installed package), then the copy inside an installed wheel."""
    return [d / name for d in (CHECKOUT_DIR, PACKAGE_DIR) if d is not None]


def find(name: str, *markers: str) -> Path | None:
    """The first of candidates(name) that holds one of the files `markers`, or None."""
    return next((path for path in candidates(name) if any((path / m).is_file() for m in markers)), None)
