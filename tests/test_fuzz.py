"""A short coverage-guided fuzz run (atheris) of the frame reader and `classify`.

The check is tests/fuzz/harness.py: whatever the bytes, nothing escapes but a
quarantine or a closed connection. The suite gives each target 2 s from the seed
corpus; a longer run is `python -m tests.fuzz --minutes N` (README, Hostile input).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install atheris); "
                           "tests/unit/test_fuzz_harness.py runs the same harness with hypothesis")
def test_a_short_fuzz_run_finds_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.fuzz", "--seconds", "2",
                           "--work", str(tmp_path / "corpus")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("Done ") == 2, done.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*"))
