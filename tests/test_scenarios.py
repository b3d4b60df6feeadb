"""The differential scenario files (tests/scenarios/*.json) on every backend here.

The same files run in dom0 on real Xen (tests_xen/test_scenarios_xen.py),
where the emulator's transcript and real Xen's must agree.  Here they run on:

- ``emulated-self``: one emulated domain granting to itself (as dom0 does);
- ``emulated-pair``: a granter and a mapper domain;
- ``linux-fake``: the Linux backend over the fake kernel (tests/linux_fake.py).

Each must leave nothing behind: no maptrack entry, no active grant, every
frame back, every fake gntalloc page freed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import xengrant
from xengrant.linux import LinuxGntshr, LinuxGnttab

sys.path.insert(0, str(Path(__file__).parent / "scenarios"))
import runner

from linux_fake import FakeGntalloc, FakeGntdev, FakeKernel

SCENARIOS = runner.paths()


@pytest.fixture(params=["emulated-self", "emulated-pair", "linux-fake"])
def side(request: pytest.FixtureRequest) -> Iterator[tuple[runner.Side, Any]]:
    kind = request.param
    if kind == "linux-fake":
        k = FakeKernel(pages=4096, limit=1024)
        shr, tab = LinuxGntshr(device=FakeGntalloc(k)), LinuxGnttab(device=FakeGntdev(k))
        yield runner.Side("linux", shr, 0, tab, 0), lambda: k.outstanding()
        tab.close()
        shr.close()
        k.close()
        return
    xen = xengrant.EmbeddedXen(memory=64 << 20)
    try:
        if kind == "emulated-self":
            a = b = xen.create_domain(0, pv=True)
        else:
            a, b = xen.create_domain(), xen.create_domain()
        doms = {a.domid, b.domid}

        def table_frames() -> int:
            # the grant table grows for big shares and never shrinks (as in Xen)
            return sum(len(xen.domain_state(d).gt.shared) for d in doms)

        free = xen.free_frames + table_frames()

        def leftovers() -> dict[str, int]:
            b.gnttab.close()
            return {
                "maptrack": sum(xen.domain_state(d).maptrack.in_use for d in doms),
                "active": sum(len(xen.domain_state(d).gt.active) for d in doms),
                "frames": free - xen.free_frames - table_frames(),
            }

        yield runner.Side("emulated", a.gntshr, a.domid, b.gnttab, b.domid), leftovers
    finally:
        xen.close()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, side: tuple[runner.Side, Any]) -> None:
    s, leftovers = side
    scenario = runner.load(path)
    transcript = runner.run(scenario, s)
    assert len(transcript) == len(scenario["steps"])
    assert all(v == 0 for v in leftovers().values()), leftovers()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_backends_agree(path: Path) -> None:
    """Emulator and Linux backend (fake kernel) see the same data and outcomes."""
    scenario = runner.load(path)
    with xengrant.EmbeddedXen(memory=64 << 20) as xen:
        d0 = xen.create_domain(0, pv=True)
        emu = runner.run(scenario, runner.Side("emulated", d0.gntshr, 0, d0.gnttab, 0))
        d0.gnttab.close()
    k = FakeKernel(pages=4096, limit=1024)
    shr, tab = LinuxGntshr(device=FakeGntalloc(k)), LinuxGnttab(device=FakeGntdev(k))
    try:
        lin = runner.run(scenario, runner.Side("linux", shr, 0, tab, 0))
    finally:
        k.close()
    assert runner.comparable(lin, scenario) == runner.comparable(emu, scenario)


def test_runner_catches_wrong_expectations() -> None:
    bad = {
        "name": "bad",
        "steps": [
            {"op": "share", "as": "s", "count": 1},
            {"op": "map", "as": "m", "grants": [{"ref": 1000000}], "how": "one"},
        ],
    }
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        d = xen.create_domain(0, pv=True)
        with pytest.raises(runner.ScenarioFailure, match="unexpected"):
            runner.run(bad, runner.Side("emulated", d.gntshr, 0, d.gnttab, 0))
        assert xen.domain_state(0).maptrack.in_use == 0
        leak = {"name": "leak", "steps": [{"op": "share", "as": "s", "count": 1}]}
        with pytest.raises(runner.ScenarioFailure, match="left"):
            runner.run(leak, runner.Side("emulated", d.gntshr, 0, d.gnttab, 0))
        d.gnttab.close()
