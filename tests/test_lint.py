"""The tree is ruff-clean under pyproject.toml's rules, complexity (C901 at 12) included."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("rpg_jax", "tests", "benchmarks", "studies", "configs", "train.py")


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *LINTED],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_checks_complexity(tmp_path):
    """The complexity rule is on: a function with 13 branches is reported."""
    body = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(13))
    (tmp_path / "branchy.py").write_text(f"def branchy(x):\n{body}    return -1\n")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--config", str(ROOT / "pyproject.toml"), str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "C901" in result.stdout, result.stdout + result.stderr
