"""The complete programs of examples/ run as a user runs them (type-checked in test_docs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service_helpers import dies_with_this_process

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 120


def _run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=ROOT,
        preexec_fn=dies_with_this_process(),
    )


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["inprocess_pair.py", "two_processes.py", "asyncio_pair.py", "numpy_zero_copy.py",
         "real_xen.py"]
    )


@pytest.mark.parametrize(
    ("name", "last"),
    [
        ("inprocess_pair.py", "in-process pair: ok"),
        ("two_processes.py", "two processes: exit codes [0, 0]"),
        ("asyncio_pair.py", "asyncio pair: ok"),
        ("numpy_zero_copy.py", "numpy zero-copy: ok"),
    ],
)
def test_example_runs(name: str, last: str) -> None:
    if name.startswith("numpy"):
        pytest.importorskip("numpy", reason="numpy_zero_copy.py needs numpy (the test extra)")
    out = _run(name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == last
    assert "ResourceWarning" not in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.skipif(not os.path.exists("/dev/xen/gntdev"), reason="real_xen.py needs a Xen host")
def test_real_xen_example() -> None:
    out = _run("real_xen.py", "--require")
    assert out.returncode == 0, out.stdout + out.stderr


def test_real_xen_example_elsewhere_says_so() -> None:
    if os.path.exists("/dev/xen/gntdev"):
        pytest.skip("a Xen host: test_real_xen_example runs it")
    out = _run("real_xen.py")
    assert out.returncode == 0 and "not a Xen host" in out.stdout
    assert _run("real_xen.py", "--require").returncode == 1
