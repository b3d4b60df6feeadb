"""The real-Xen suite: run as root in a Xen dom0 (the xenlab harness boots one).

Every test skips where ``/dev/xen/gntdev`` does not exist.  Dom0 grants to
itself (domid 0) and maps back, so both sides of every share run against the
real hypervisor and Linux's real gntalloc/gntdev drivers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for candidate in (HERE.parent / "scenarios", HERE.parent / "tests" / "scenarios"):
    if (candidate / "runner.py").exists():
        sys.path.insert(0, str(candidate))
        break

from xengrant.linux import Backend, EventChannels, available, gntalloc_limit, open_backend  # noqa: E402

ON_XEN = available() and os.access("/dev/xen/gntalloc", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ON_XEN:
        skip = pytest.mark.skip(reason="not a Xen dom0 with gntalloc/gntdev (run xenlab/run.sh)")
        for item in items:
            item.add_marker(skip)


def _gntdev_vmas() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "/dev/xen/gnt" in line]


@pytest.fixture
def xen() -> Iterator[Backend]:
    """The real-Xen portable backend (dom0, domid 0); checks nothing is left mapped."""
    b = open_backend()
    assert b.domid == 0
    try:
        yield b
        left = dict(b.gnttab.live)
        for m in left.values():  # don't let one failure cascade into the next tests
            m.mem.release()
            m.unmap()
        assert left == {}, f"mappings left: {left}"
        assert _gntdev_vmas() == [], _gntdev_vmas()
    finally:
        b.close()


@pytest.fixture
def evtchn() -> Iterator[EventChannels]:
    with EventChannels() as ev:
        yield ev


@pytest.fixture
def limit() -> int:
    lim = gntalloc_limit()
    assert lim is not None
    return lim
