"""The real-Xen suite: run as root in a Xen dom0 (the xenlab harness boots one).

Every test skips where ``/dev/xen/gntdev`` does not exist.  Dom0 grants to
itself (domid 0) and maps back, so both sides of every share run against the
real hypervisor and Linux's real gntalloc/gntdev drivers.

The cross-domain tests also need the toolstack (xl, xenstored; the harness
starts them) and the domU boot files: ``domus`` is two PV domUs running the
agent (domu_agent.py) for the whole session, ``make_domu`` creates more
(destroyed at the end of the test).  They skip where those are missing.

Each test's setup, call and teardown are bounded (dom0's python has no
pytest-timeout): after ``XENGRANT_TEST_TIMEOUT`` seconds (default 300;
``@pytest.mark.timeout(s)`` for one test) SIGALRM dumps every thread's stack
and raises :class:`TestTimeout` in the test, which fails it and the run goes
on.  Should the test not come back to the interpreter even then (a call that
never returns to Python), faulthandler ends the process 60 s later with the
stacks, and the stage fails instead of hanging until the QEMU bound.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
for candidate in (HERE.parent / "scenarios", HERE.parent / "tests" / "scenarios"):
    if (candidate / "runner.py").exists():
        sys.path.insert(0, str(candidate))
        break

import domu  # noqa: E402

from xengrant.linux import (  # noqa: E402
    Backend,
    EventChannels,
    LinuxXenStore,
    available,
    gntalloc_limit,
    open_backend,
)

ON_XEN = available() and os.access("/dev/xen/gntalloc", os.R_OK | os.W_OK)
#: seconds per phase (setup, call, teardown) of a test
TEST_TIMEOUT = float(os.environ.get("XENGRANT_TEST_TIMEOUT", "300"))


class TestTimeout(Exception):
    """A test phase ran over its bound (XENGRANT_TEST_TIMEOUT or its timeout mark)."""

    __test__ = False  # not a test class


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): this test's bound per phase")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _bounded(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _bounded(item, "call"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    with _bounded(item, "teardown"):
        yield


class _bounded:
    """SIGALRM after the item's bound: the stacks on stderr, then TestTimeout in the test."""

    def __init__(self, item: pytest.Item, phase: str) -> None:
        mark = item.get_closest_marker("timeout")
        self.seconds = float(mark.args[0]) if mark is not None else TEST_TIMEOUT
        self.what = f"{item.nodeid} ({phase})"
        self.old: Any = None

    def _fire(self, signum: int, frame: Any) -> None:
        sys.stderr.write(f"\n+++ {self.what} ran over {self.seconds:g} s; stacks:\n")
        faulthandler.dump_traceback(all_threads=True)
        raise TestTimeout(f"{self.what} ran over {self.seconds:g} s")

    def __enter__(self) -> None:
        if self.seconds <= 0:
            return
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        faulthandler.dump_traceback_later(self.seconds + 60.0, exit=True)

    def __exit__(self, *exc: object) -> None:
        if self.seconds <= 0:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, self.old)


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


# ------------------------------------------------------------------ domUs
@pytest.fixture(scope="session")
def dom0_xs() -> Iterator[LinuxXenStore]:
    """Dom0's xenstore connection (xenstored's socket)."""
    if not (ON_XEN and domu.available()):
        pytest.skip("no xl/xenstored/domU boot files (run xenlab/run.sh)")
    with LinuxXenStore(timeout=30.0) as xs:
        yield xs


@pytest.fixture(scope="session")
def free_before(dom0_xs: LinuxXenStore) -> int:
    """Xen's free memory (MiB) before the session's first domU."""
    return domu.free_memory_mib()


@pytest.fixture(scope="session")
def domus(dom0_xs: LinuxXenStore, free_before: int) -> Iterator[tuple[domu.DomU, domu.DomU]]:
    """Two PV domUs running the agent, for the whole session.

    The second ``xl create`` starts when the first has built its domain (two at
    once once failed to decompress the kernel: "Invalid kernel"); the boots overlap.
    """
    procs = []
    made: list[domu.DomU] = []
    try:
        for name in ("xg-a", "xg-b"):
            if procs:
                procs[-1][1].wait(timeout=120)
            procs.append((name, domu.start(dom0_xs, name)))
        for name, proc in procs:
            try:
                made.append(domu.finish(dom0_xs, name, proc))
            except RuntimeError as e:  # xl create failed ("Invalid kernel" under TCG): once more
                print(f"xl create {name} failed, once more, alone: {e}")
                domu.xl("destroy", name, check=False)
                made.append(domu.finish(dom0_xs, name, domu.start(dom0_xs, name)))
        print(f"domUs {made}: ready {[d.ready for d in made]}")
        yield made[0], made[1]
    finally:
        for d in made:
            d.destroy()
        for name, proc in procs:
            if proc.poll() is None:
                proc.kill()
            domu.xl("destroy", name, check=False)


@pytest.fixture
def make_domu(dom0_xs: LinuxXenStore) -> Iterator[Any]:
    """Create more agent domUs (``make_domu(name)``); destroyed after the test."""
    made: list[domu.DomU] = []

    def make(name: str) -> domu.DomU:
        d = domu.create(dom0_xs, name)
        made.append(d)
        return d

    yield make
    for d in made:
        d.destroy()


@pytest.fixture
def agents_clean(domus: tuple[domu.DomU, domu.DomU]) -> Iterator[tuple[domu.DomU, domu.DomU]]:
    """The session's domUs; after the test, neither holds a share, mapping or port."""
    yield domus
    for d in domus:
        state = d.call("state")
        for h in state["handles"]:  # don't let one failure cascade into the next tests
            for op in ("unmap", "unshare", "free", "close"):
                try:
                    d.call(op, h=h)
                    break
                except Exception:
                    continue
        for port in state["ports"]:
            d.call("unbind", port=port)
        assert state["handles"] == [] and state["live_maps"] == 0, (d, state)
        assert state["ports"] == [], (d, state)
