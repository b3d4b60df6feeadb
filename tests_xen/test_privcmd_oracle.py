"""The real hypervisor as the oracle of the emulator's fidelity.

Dom0 issues grant-table hypercalls itself through /dev/xen/privcmd
(``IOCTL_PRIVCMD_HYPERCALL``): the hand-written cases of
tests/scenarios/oracle.py (bad refs, refs beyond the table, a read-only grant
mapped writable, a bad handle, copies crossing a page, query_size,
get/set_version), each with what Xen 4.17 must answer, and the generated ones
(``oracle.GENERATED``: every GNTTABOP, combinations of map flags, copy
arguments in every check order, setup/query/version inputs, command words),
which have no expectation of their own.  The emulator, asked the same in the
same process, must answer every one as the real hypervisor did.

The real answers are also printed, between ``@@@ORACLE-JSON-BEGIN`` and
``@@@ORACLE-JSON-END`` lines on the console, to refresh the recording that
tests/test_oracle.py holds the emulator to without Xen
(tests/oracle_xen417.json).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import oracle
import pytest

from xengrant.linux import Backend, portable_backend

ALL = oracle.CASES + oracle.GENERATED


@pytest.fixture(scope="module")
def answers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    from xengrant.linux import open_backend

    real_b: Backend = open_backend()
    fd = os.open("/dev/xen/privcmd", os.O_RDWR | os.O_CLOEXEC)
    try:
        refs, shares = oracle.make_refs(real_b.gntshr, 0)
        real = oracle.run_cases(oracle.privcmd_issue(fd), refs, 0, ALL)
        for s in shares:
            real_b.gntshr.unshare(s)
    finally:
        os.close(fd)
        real_b.close()
    with portable_backend("emulated", domid=0) as emu_b:
        d0 = emu_b.domain
        refs, shares = oracle.make_refs(emu_b.gntshr, 0)
        emu = oracle.run_cases(lambda cmd, ops, n: d0.grant_table_op(cmd, ops, n), refs, 0, ALL)
        for s in shares:
            emu_b.gntshr.unshare(s)
    _record(real)
    yield real, emu


def _record(real: dict[str, Any]) -> None:
    """Print the real answers on the console (pytest captures stdout; dom0's
    /dev/console is the QEMU serial line that xenlab keeps in console.log)."""
    lines = ["@@@ORACLE-JSON-BEGIN"]
    lines += [json.dumps({name: real[name]}, sort_keys=True) for name in sorted(real)]
    lines.append("@@@ORACLE-JSON-END")
    try:
        with open("/dev/console", "w") as console:
            for line in lines:
                console.write(line + "\n")
    except OSError:
        if sys.__stderr__ is not None:
            sys.__stderr__.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", oracle.CASES, ids=[c.name for c in oracle.CASES])
def test_real_xen_answers(
    case: oracle.Case, answers: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    real, _ = answers
    assert oracle.check(case, real[case.name]) == [], real[case.name]


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_emulator_agrees(case: oracle.Case, answers: tuple[dict[str, Any], dict[str, Any]]) -> None:
    real, emu = answers
    assert oracle.agree(case, emu[case.name], real[case.name]) == []
