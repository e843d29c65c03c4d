"""The architecture is a checked contract: import-linter's layers in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("commands", "tools", "training", "evaluation", "streams", "models", "index")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports resolves root_packages from sys.path: run it from the tree under test only.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True, text=True,
                          timeout=600)


def test_layer_contract_is_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_upward_import_breaks_the_contract_and_names_the_line(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fusion = tmp_path / "index" / "fusion.py"
    # A lazy (function-local) import counts as much as a top-level one.
    fusion.write_text(fusion.read_text() + "\n\ndef _oops() -> None:\n    import streams.window  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "index.fusion -> streams.window" in result.stdout
    assert "BROKEN" in result.stdout
