"""The hypercall oracle's cases (tests/scenarios/oracle.py) on the emulator.

In dom0, tests_xen/test_privcmd_oracle.py issues the same hypercalls to the
real Xen 4.17 through /dev/xen/privcmd and checks the same expectations, so
every status here is the real hypervisor's answer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import xengrant

sys.path.insert(0, str(Path(__file__).parent / "scenarios"))
import oracle


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    with xengrant.EmbeddedXen(memory=32 << 20) as xen:
        d0 = xen.create_domain(0, pv=True)
        refs, shares = oracle.make_refs(d0.gntshr, 0)
        out = oracle.run_cases(lambda cmd, ops, n: d0.grant_table_op(cmd, ops, n), refs, 0)
        assert xen.domain_state(0).maptrack.in_use == 0
        for s in shares:
            d0.gntshr.unshare(s)
        return out


@pytest.mark.parametrize("case", oracle.CASES, ids=[c.name for c in oracle.CASES])
def test_emulator_answers_as_xen(case: oracle.Case, results: dict[str, dict[str, object]]) -> None:
    assert oracle.check(case, results[case.name]) == []
