"""The real hypervisor as the oracle of the emulator's fidelity.

Dom0 issues grant-table hypercalls itself through /dev/xen/privcmd
(``IOCTL_PRIVCMD_HYPERCALL``): bad refs, refs beyond the table, a read-only
grant mapped writable, a bad handle, copies crossing a page, query_size,
get/set_version (tests/scenarios/oracle.py).  Real Xen 4.17 must answer what
each case expects, and the emulator, asked the same in the same process, must
answer the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import oracle
import pytest

from xengrant.linux import Backend, portable_backend


@pytest.fixture(scope="module")
def answers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    from xengrant.linux import open_backend

    real_b: Backend = open_backend()
    fd = os.open("/dev/xen/privcmd", os.O_RDWR | os.O_CLOEXEC)
    try:
        refs, shares = oracle.make_refs(real_b.gntshr, 0)
        real = oracle.run_cases(oracle.privcmd_issue(fd), refs, 0)
        for s in shares:
            real_b.gntshr.unshare(s)
    finally:
        os.close(fd)
        real_b.close()
    with portable_backend("emulated", domid=0) as emu_b:
        d0 = emu_b.domain
        refs, shares = oracle.make_refs(emu_b.gntshr, 0)
        emu = oracle.run_cases(lambda cmd, ops, n: d0.grant_table_op(cmd, ops, n), refs, 0)
        for s in shares:
            emu_b.gntshr.unshare(s)
    print("privcmd oracle, real Xen:", json.dumps(real, indent=None))
    yield real, emu


@pytest.mark.parametrize("case", oracle.CASES, ids=[c.name for c in oracle.CASES])
def test_real_xen_answers(
    case: oracle.Case, answers: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    real, _ = answers
    assert oracle.check(case, real[case.name]) == [], real[case.name]


@pytest.mark.parametrize("case", oracle.CASES, ids=[c.name for c in oracle.CASES])
def test_emulator_agrees(case: oracle.Case, answers: tuple[dict[str, Any], dict[str, Any]]) -> None:
    real, emu = answers
    keys = ("rc", "status", *case.compare)
    assert {k: emu[case.name].get(k) for k in keys} == {k: real[case.name].get(k) for k in keys}
