"""The hypercall oracle's cases (tests/scenarios/oracle.py) on the emulator.

In dom0, tests_xen/test_privcmd_oracle.py issues the same hypercalls to the
real Xen 4.17 through /dev/xen/privcmd and checks the same expectations, so
every status here is the real hypervisor's answer.  The generated cases have
no expectation of their own: their answers from the real Xen 4.17 are recorded
in tests/oracle_xen417.json (from a xenlab run's console, between
the ``@@@ORACLE-JSON`` lines), and the emulator must give each of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import xengrant

sys.path.insert(0, str(Path(__file__).parent / "scenarios"))
import oracle

RECORDED = Path(__file__).parent / "oracle_xen417.json"
ALL = oracle.CASES + oracle.GENERATED


def _recorded() -> dict[str, dict[str, object]]:
    if not RECORDED.exists():
        return {}
    out: dict[str, dict[str, object]] = json.loads(RECORDED.read_text())
    return out


REAL = _recorded()


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    with xengrant.EmbeddedXen(memory=32 << 20) as xen:
        d0 = xen.create_domain(0, pv=True)
        refs, shares = oracle.make_refs(d0.gntshr, 0)
        out = oracle.run_cases(lambda cmd, ops, n: d0.grant_table_op(cmd, ops, n), refs, 0, ALL)
        assert xen.domain_state(0).maptrack.in_use == 0
        assert not xen.domain_state(0).gt.active
        for s in shares:
            d0.gntshr.unshare(s)
        return out


@pytest.mark.parametrize("case", oracle.CASES, ids=[c.name for c in oracle.CASES])
def test_emulator_answers_as_xen(case: oracle.Case, results: dict[str, dict[str, object]]) -> None:
    assert oracle.check(case, results[case.name]) == []


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_emulator_answers_as_recorded_xen(
    case: oracle.Case, results: dict[str, dict[str, object]]
) -> None:
    if case.name not in REAL:
        pytest.skip("no answer of the real Xen recorded for this case yet")
    assert oracle.agree(case, results[case.name], REAL[case.name]) == []


def test_generated_cases_are_many_and_distinct() -> None:
    names = [c.name for c in oracle.GENERATED]
    assert len(names) == len(set(names)) > 500
    assert {c.cmd for c in oracle.GENERATED} >= {
        "map",
        "copy",
        "setup_table",
        "get_status_frames",
        "query_size",
        "get_version",
        "set_version",
        "swap",
        "unmap",
        "unmap_and_replace",
        "transfer",
        "cache_flush",
        "raw",
    }
