"""The differential scenario files on real Xen and on the emulator.

Each scenario runs on the emulator (one domain granting to itself, as dom0
does here) and on real Xen through the Linux backend; both must meet the
file's expectations, and their transcripts must agree on the data seen and on
which operations succeed and which fail (and, where Linux can report it, on
the GNTST status).

Each file also runs across domains: a PV domU's agent grants and dom0 maps,
and dom0 grants and the domU maps (tests_xen/remote.py drives the domU's
real gntalloc/gntdev), against the emulator with two domains of the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import remote
import runner

from xengrant.linux import Backend, portable_backend

SCENARIOS = runner.paths()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_agrees_with_emulator(path: Path, xen: Backend) -> None:
    scenario = runner.load(path)
    with portable_backend("emulated", domid=0) as emu:
        emulated = runner.run(scenario, runner.Side("emulated", emu.gntshr, 0, emu.gnttab, 0))
    real = runner.run(scenario, runner.Side("linux", xen.gntshr, 0, xen.gnttab, 0))
    a, b = runner.comparable(real, scenario), runner.comparable(emulated, scenario)
    if a != b:
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        pytest.fail("real Xen and the emulator disagree:\n" + json.dumps(diff, indent=1))


# ----------------------------------------------------------- across domains
def _emulated_pair(granter: int, mapper: int) -> tuple[Any, Any, Any]:
    from xengrant import EmbeddedXen

    xen = EmbeddedXen(memory=64 << 20)
    g = xen.create_domain(granter, pv=True)
    m = xen.create_domain(mapper, pv=True)
    return xen, g, m


#: (direction, file): every file both ways.  share_map_1024 with the domU mapping maps 1024
#: grants one by one there: remote.cross_runner sends those maps, their writes and their
#: unmaps as one agent request each (it was left out when each was a xenstore round trip:
#: ~3000 of them, minutes under TCG).
ACROSS = [(d, p) for d in ("domU-to-dom0", "dom0-to-domU") for p in SCENARIOS]


@pytest.mark.parametrize(("direction", "path"), ACROSS, ids=[f"{d}-{p.stem}" for d, p in ACROSS])
def test_scenario_across_domains_agrees_with_emulator(
    path: Path, direction: str, xen: Backend, agents_clean: Any
) -> None:
    """The file with the granter and the mapper in different real domains (a domU's agent and
    dom0), against the emulator with two domains of the same ids."""
    a = agents_clean[0]
    scenario = runner.load(path)
    if direction == "domU-to-dom0":
        shr, tab = remote.RemoteGntshr(a), None
        side = runner.Side("linux", shr, a.domid, xen.gnttab, 0)
        granter, mapper = a.domid, 0
    else:
        shr, tab = None, remote.RemoteGnttab(a)
        side = runner.Side("linux", xen.gntshr, 0, tab, a.domid)
        granter, mapper = 0, a.domid

    def mems() -> list[Any]:
        live = list((shr.live if shr else {}).values()) + list((tab.live if tab else {}).values())
        return [x.mem for x in live]

    real = remote.cross_runner(scenario, side, mems).run()
    emu_xen, g, m = _emulated_pair(granter, mapper)
    try:
        emu_side = runner.Side("emulated", g.gntshr, granter, m.gnttab, mapper)
        emulated = runner.run(scenario, emu_side)
    finally:
        emu_xen.close()
    x, y = runner.comparable(real, scenario), runner.comparable(emulated, scenario)
    if x != y:
        diff = [(p, q) for p, q in zip(x, y) if p != q]
        pytest.fail("real Xen across domains and the emulator disagree:\n" + json.dumps(diff))
