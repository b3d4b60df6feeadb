"""The differential scenario files on real Xen and on the emulator, in one dom0 process.

Each scenario runs on the emulator (one domain granting to itself, as dom0
does here) and on real Xen through the Linux backend; both must meet the
file's expectations, and their transcripts must agree on the data seen and on
which operations succeed and which fail (and, where Linux can report it, on
the GNTST status).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
