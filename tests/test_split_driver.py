"""examples/split_driver: the same frontend and backend code in one process
and in two processes (docs/first-split-driver.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "examples" / "split_driver" / "run.py"


@pytest.mark.parametrize("mode", [[], ["--processes"]], ids=["one-process", "two-processes"])
def test_split_driver_runs(mode: list[str]) -> None:
    """The handshake completes, 100 requests come back upper-cased through a
    two-page ring, and both ends close (the run exits 0)."""
    out = subprocess.run([sys.executable, str(RUN), *mode], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any("mapped 2 ring page(s)" in line and "64 slots" in line for line in lines)
    assert any("served 100, unmapped, Closed" in line for line in lines)
    assert "answers all upper-cased: b'HELLO 0 FROM THE FRONTEND'" in out.stdout
