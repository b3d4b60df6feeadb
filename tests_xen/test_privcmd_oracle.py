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

from xengrant import abi
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


# ----------------------------------------------------------- across domains
def cross_cases(granter: int) -> list[oracle.Case]:
    """Dom0's hypercalls on a real domU's grants (``granter``): the refs are the domU's
    (``rw``, ``rw2``, ``ro`` granted to dom0; ``theirs`` to a domain that does not exist;
    ``gone`` revoked).  Maps that would succeed as host maps are never tried (they would
    write dom0's page tables); a device-only map of a valid grant is undone at once."""
    g, C = granter, oracle.Case
    dev, ro = abi.GNTMAP_device_map, abi.GNTMAP_readonly
    cases = [
        C("x map: ref beyond the domU's table", "map", {"ref": "out_of_range", "dom": g},
          "bad_gntref"),
        C("x map: the domU's revoked ref", "map", {"ref": "gone", "dom": g}, "general_error"),
        C("x map: the domU's read-only grant mapped writable", "map", {"ref": "ro", "dom": g},
          "general_error"),
        C("x map: the domU's grant to another domain", "map", {"ref": "theirs", "dom": g},
          "general_error"),
        C("x map: neither host nor device map", "map", {"ref": "rw", "dom": g, "flags": 0},
          "bad_gntref"),
        C("x map: device map of the domU's grant", "map",
          {"ref": "rw", "dom": g, "flags": dev}, "okay"),
        C("x map: device map, read-only, of the domU's read-only grant", "map",
          {"ref": "ro", "dom": g, "flags": dev | ro}, "okay"),
        C("x map: device map of the domU's grant to another domain", "map",
          {"ref": "theirs", "dom": g, "flags": dev}, "general_error"),
        C("x copy: the domU's grant to its other grant", "copy",
          {"src": ("rw", 0), "src_dom": g, "dst": ("rw2", 8), "dst_dom": g}, "okay"),
        C("x copy: from the domU's revoked ref", "copy",
          {"src": ("gone", 0), "src_dom": g, "dst": ("rw2", 0), "dst_dom": g}, "general_error"),
        C("x copy: from the domU's grant to another domain", "copy",
          {"src": ("theirs", 0), "src_dom": g, "dst": ("rw2", 0), "dst_dom": g},
          "general_error"),
        C("x copy: into the domU's read-only grant", "copy",
          {"src": ("rw", 0), "src_dom": g, "dst": ("ro", 0), "dst_dom": g}, "general_error"),
        C("x copy: from the domU's read-only grant", "copy",
          {"src": ("ro", 0), "src_dom": g, "dst": ("rw2", 16), "dst_dom": g}, "okay"),
        C("x copy: crossing the end of the domU's page", "copy",
          {"src": ("rw", 4000), "src_dom": g, "dst": ("rw2", 0), "dst_dom": g, "len": 200},
          "bad_copy_arg"),
        C("x copy: ref beyond the domU's table", "copy",
          {"src": ("out_of_range", 0), "src_dom": g, "dst": ("rw2", 0), "dst_dom": g},
          "bad_gntref"),
        C("x copy: a frame of the domU by gmfn (not ours)", "copy",
          {"src_gmfn": 1, "src_dom": g, "dst": ("rw2", 0), "dst_dom": g}, None, None),
        C("x query_size: the domU", "query_size", {"dom": g}, "okay"),
        C("x get_version: the domU", "get_version", {"dom": g}, None, 0, ("version",)),
        C("x setup_table: the domU", "setup_table", {"dom": g, "nr_frames": 1 << 20}, None,
          None),
    ]
    return cases


#: the cross-domain cases' names (the domU's id is known only at run time)
CROSS_NAMES = [c.name for c in cross_cases(1)]


def _remote_refs(a: Any) -> tuple[dict[str, int], list[int]]:
    """The domU's grants the cross cases name; the handles to unshare afterwards."""
    made = {}
    for role, to, writable in (("rw", 0, True), ("rw2", 0, True), ("ro", 0, False),
                               ("theirs", oracle.UNKNOWN, True), ("gone", 0, True)):
        made[role] = a.call("share", to=to, count=1, writable=writable)
    a.call("fill", h=made["rw"]["h"], text="ORACLE!!")
    a.call("unshare", h=made["gone"]["h"])
    refs = {role: r["refs"][0] for role, r in made.items()}
    refs["out_of_range"] = oracle.OUT_OF_RANGE
    return refs, [r["h"] for role, r in made.items() if role != "gone"]


@pytest.fixture(scope="module")
def cross_answers(domus: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Dom0's answers on the first session domU's grants, real and emulated (a two-domain
    EmbeddedXen with the same ids, the domU's grants made the same way)."""
    from xengrant import EmbeddedXen

    a = domus[0]
    cases = cross_cases(a.domid)
    refs, handles = _remote_refs(a)
    fd = os.open("/dev/xen/privcmd", os.O_RDWR | os.O_CLOEXEC)
    try:
        real = oracle.run_cases(oracle.privcmd_issue(fd), refs, 0, cases)
    finally:
        os.close(fd)
        for h in handles:
            a.call("unshare", h=h)
    with EmbeddedXen(memory=32 << 20) as xen:
        d0 = xen.create_domain(0, pv=True)
        du = xen.create_domain(a.domid, pv=True)
        shares = {}
        for role, to, writable in (("rw", 0, True), ("rw2", 0, True), ("ro", 0, False),
                                   ("theirs", oracle.UNKNOWN, True), ("gone", 0, True)):
            shares[role] = du.gntshr.share_pages(to, 1, writable)
        shares["rw"].mem[:8] = b"ORACLE!!"
        erefs = {role: s.refs[0] for role, s in shares.items()}  # before unshare empties refs
        du.gntshr.unshare(shares["gone"])
        erefs["out_of_range"] = oracle.OUT_OF_RANGE
        emu = oracle.run_cases(lambda cmd, ops, n: d0.grant_table_op(cmd, ops, n), erefs, 0,
                               cases)
        for role, s in shares.items():
            if role != "gone":
                du.gntshr.unshare(s)
    yield real, emu


@pytest.mark.parametrize("name", CROSS_NAMES)
def test_real_xen_answers_across_domains(
    name: str, cross_answers: tuple[dict[str, Any], dict[str, Any]], domus: Any
) -> None:
    """What Xen 4.17 answers dom0 about a real domU's grants, as the case expects."""
    case = next(c for c in cross_cases(domus[0].domid) if c.name == name)
    real, _ = cross_answers
    assert oracle.check(case, real[name]) == [], real[name]


@pytest.mark.parametrize("name", CROSS_NAMES)
def test_emulator_agrees_across_domains(
    name: str, cross_answers: tuple[dict[str, Any], dict[str, Any]], domus: Any
) -> None:
    """The emulator, with two domains of the same ids, answers as the real Xen did."""
    case = next(c for c in cross_cases(domus[0].domid) if c.name == name)
    real, emu = cross_answers
    assert oracle.agree(case, emu[name], real[name]) == []
