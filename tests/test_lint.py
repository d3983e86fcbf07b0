"""The code stays ruff-clean (lint and format), as STYLE.md asks; imports point one way (the
layer contract in pyproject.toml); the test folders can never stand in for a library of the same
name."""

import subprocess
import sys

import pytest

from tests.support import REPO


@pytest.mark.parametrize(
    "cmd", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"]
)
def test_ruff(cmd):
    # The environment's own ruff, found through this interpreter, never through PATH.
    p = subprocess.run(
        [sys.executable, "-m", "ruff", *cmd], cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_imports_follow_the_layer_contract():
    # import-linter's lint-imports, through this interpreter (its console script is not on PATH
    # when the environment is not activated).
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_test_folders_cannot_shadow_libraries(pytestconfig):
    # Every test folder is a package below `tests` (tests.kernels, never a top-level `kernels`
    # that transformers would import instead of Hugging Face's package), and pytest puts no
    # test folder itself on sys.path.
    folders = {p.parent for p in (REPO / "tests").rglob("*.py")}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"test folders without __init__.py: {missing}"
    assert pytestconfig.getini("pythonpath") == []
