"""The code stays ruff-clean (lint and format), as STYLE.md asks."""

import shutil
import subprocess

import pytest
from support import REPO


@pytest.mark.parametrize(
    "cmd", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"]
)
def test_ruff(cmd):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the [test] extra: pip install -e '.[all]'"
    p = subprocess.run([ruff, *cmd], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
