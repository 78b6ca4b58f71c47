"""Asset staging without Docker: copy just the files an asset needs into a clean folder.

Pointing an asset at the repository root with exclude globs would make CDK walk `.venv`
and `node_modules` on every synth; copying the few source folders is faster and keeps the
asset hash a function of the shipped source only.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".mypy_cache", "tests")


def stage(name: str, paths: list[str]) -> str:
    """Copy repo-relative `paths` (files or folders) into a fresh folder; return its path.

    The layout below the folder mirrors the repository, so `functions/...` stays
    importable as `functions.…` and `pyproject.toml` finds its package dirs.
    """
    root = Path(tempfile.mkdtemp(prefix=f"trainctl-{name}-"))
    # Synth copies assets into the cloud assembly, so the staging copy can go at exit.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for rel in paths:
        src = REPO_ROOT / rel
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=_IGNORE)
        elif src.is_file():
            shutil.copy2(src, dst)
        else:
            raise FileNotFoundError(f"asset {name}: {src} does not exist")
    return str(root)


def functions_asset() -> str:
    """The Lambda code asset: the `functions` package, importable as `functions.<name>`."""
    return stage("functions", ["functions"])


def core_layer_asset() -> str:
    """The core Lambda layer: `python/trainctl_core` at the root (→ /opt/python/trainctl_core)."""
    return str(Path(stage("core-layer", ["layers/core"])) / "layers" / "core")


def agent_asset() -> str:
    """The instance agent source: an installable project with `trainctl` and `trainctl_core`.

    `functions` and `infra` are listed in pyproject's package-dir, so empty packages keep
    `pip install` happy without shipping the control plane to every instance.
    """
    path = stage(
        "agent", ["pyproject.toml", "README.md", "layers/core/python/trainctl_core", "training/trainctl"]
    )
    for package in ("functions", "infra"):
        (Path(path) / package).mkdir(exist_ok=True)
        (Path(path) / package / "__init__.py").touch()
    return path
