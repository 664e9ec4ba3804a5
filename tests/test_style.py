"""ruff's lint and format checks (pyproject.toml [tool.ruff]) hold for the tree, so CI's one test command keeps
the style as it keeps the behaviour."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([RUFF, *command], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
