"""`make lint` as a test: ruff (the dev extra, configured in pyproject.toml) finds nothing in edgezo, tests, bench."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "edgezo", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True)
    assert "No module named ruff" not in out.stderr, "ruff is missing: pip install -e '.[dev]'"
    assert out.returncode == 0, out.stdout[-3000:]
