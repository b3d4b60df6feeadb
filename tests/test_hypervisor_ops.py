"""Every GNTTABOP through the raw hypercall interface, with Xen 4.17's GNTST codes.

Ops are the ctypes structs of :mod:`xengrant.abi`, issued with
``Domain.grant_table_op(cmd, ops)``; the expected status of every failure is
the one ``xen/common/grant_table.c`` (4.17) writes for that input, per entry in
batches.  After each failure path the tests check nothing leaked: free machine
frames, maptrack handles in use, pinned active entries.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import xengrant
from grant_helpers import (
    HOST,
    PAGE,
    Dom,
    MakeDomain,
    Xen,
    copy,
    errno_of,
    flags_of,
    free_ram,
    fresh_gfn,
    grant,
    map1,
    map_grants,
    ram,
    raw_entry,
    read,
    set_version,
    status_of,
    unmap,
    unmap1,
    write,
)
from xengrant import abi
from xengrant.emu.domain import P2M_GNTTAB_STATUS, P2M_GRANT_MAP_RW, P2M_RAM_RW
from xengrant.emu.grant_table import (
    GNTPIN_devw_inc,
    GNTPIN_hstr_inc,
    GNTPIN_hstw_inc,
)
from xengrant.errors import Busy, GrantTableFull, HypercallError
from xengrant.guest.memory import GNTTAB_GFN_BASE

RO = abi.GNTMAP_readonly
READING, WRITING = abi.GTF_reading, abi.GTF_writing
PERMIT = abi.GTF_permit_access
SRC_GREF, DST_GREF = abi.GNTCOPY_source_gref, abi.GNTCOPY_dest_gref
INVALID_GFN = 0xFFFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------- helpers
def put_entry_v1(xen: Xen, domid: int, ref: int, flags: int, to: int, frame: int) -> None:
    g = xen.domain_state(domid).gt
    struct.pack_into("<HHI", xen.mem, g.entry_offset(ref), flags, to, frame)


def pins(xen: Xen, domid: int) -> dict[int, int]:
    return {ref: act.pin for ref, act in xen.domain_state(domid).gt.active.items()}


def snapshot(xen: Xen) -> tuple[int, dict[int, Any]]:
    """What a failed op must leave unchanged: frames, handles, pins, pages, p2m."""
    doms = {
        d.domid: (d.maptrack.in_use, pins(xen, d.domid), d.tot_pages, dict(d.p2m))
        for d in xen.hv.iter_domains()
    }
    return xen.free_frames, doms


@contextmanager
def unchanged(xen: Xen) -> Iterator[None]:
    """The block must leave ``snapshot(xen)`` as it found it."""
    before = snapshot(xen)
    yield
    assert snapshot(xen) == before


def mfn_of(xen: Xen, domid: int, gfn: int) -> int:
    return xen.domain_state(domid).p2m[gfn][0]


def ungrant(granter: Dom, ref: int, gfn: int | None = None) -> None:
    granter.grant_table.try_end_access(ref, release_ref=True)
    if gfn is not None:
        free_ram(granter, [gfn])


def last_reason(xen: Xen) -> str:
    return xen.debug_log[-1][3]


# ===================================================================== map
def test_map_writable_sets_flags_pins_and_bus_address(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    base = xen.free_frames
    ref, gfn = grant(a, b.domid, data=b"hello from a")
    mfn = mfn_of(xen, a.domid, gfn)
    hole = b.get_pages(1)[0]

    op = map1(b, a.domid, ref, HOST, hole)

    assert (op.status, op.handle, op.dev_bus_addr) == (abi.GNTST_okay, 0, mfn << 12)
    assert raw_entry(xen, a.domid, ref) == struct.pack(
        "<HHI", PERMIT | READING | WRITING, b.domid, gfn
    )
    assert pins(xen, a.domid) == {ref: GNTPIN_hstw_inc}
    assert xen.domain_state(b.domid).maptrack.in_use == 1
    assert xen.domain_state(b.domid).p2m[hole] == (mfn, P2M_GRANT_MAP_RW)
    assert xen.hv.machine.refcount[mfn] == 2
    # Real shared memory both ways.
    assert read(b, hole, 12) == b"hello from a"
    write(b, hole, b"reply", 100)
    assert read(a, gfn, 5, 100) == b"reply"

    assert unmap1(b, op) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert pins(xen, a.domid) == {}
    assert xen.domain_state(b.domid).maptrack.in_use == 0
    assert hole not in xen.domain_state(b.domid).p2m
    assert xen.hv.machine.refcount[mfn] == 1
    ungrant(a, ref, gfn)
    assert xen.free_frames == base


def test_map_readonly_sets_only_reading(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, gfn = grant(a, b.domid, data=b"ro")
    op = map1(b, a.domid, ref, HOST | RO)
    assert op.status == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT | READING
    assert pins(xen, a.domid) == {ref: GNTPIN_hstr_inc}
    hole = op.host_addr >> 12
    assert read(b, hole, 2) == b"ro"
    assert errno_of(lambda: b.view([hole], True)) == errno.EFAULT
    assert unmap1(b, op) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT
    ungrant(a, ref, gfn)


def test_map_own_grant(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain()
    ref, gfn = grant(a, a.domid, data=b"self")
    op = map1(a, a.domid, ref)
    assert op.status == abi.GNTST_okay
    assert op.dev_bus_addr == mfn_of(xen, a.domid, gfn) << 12
    assert read(a, op.host_addr >> 12, 4) == b"self"
    assert flags_of(xen, a.domid, ref) == PERMIT | READING | WRITING
    assert unmap1(a, op) == abi.GNTST_okay
    assert pins(xen, a.domid) == {}
    ungrant(a, ref, gfn)


@pytest.mark.parametrize(
    "flags", [0, RO, abi.GNTMAP_application_map, abi.GNTMAP_contains_pte | RO, 1 << 16]
)
def test_map_without_host_or_device_map_is_bad_gntref(
    xen: Xen, pair: tuple[Dom, Dom], flags: int
) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    with unchanged(xen):
        op = map1(b, a.domid, ref, flags)
        assert op.status == abi.GNTST_bad_gntref
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert last_reason(xen).startswith("Bad flags in grant map op")


@pytest.mark.parametrize(
    "flags",
    [
        abi.GNTMAP_device_map,
        abi.GNTMAP_device_map | HOST,
        abi.GNTMAP_device_map | RO,
        HOST | abi.GNTMAP_application_map,
        HOST | abi.GNTMAP_contains_pte,
    ],
)
def test_map_device_or_pte_flags_from_hvm_is_general_error(
    xen: Xen, pair: tuple[Dom, Dom], flags: int
) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    with unchanged(xen):
        assert map1(b, a.domid, ref, flags).status == abi.GNTST_general_error
    assert last_reason(xen) == "No device mapping in HVM domain"


def test_map_device_map_from_pv(xen: Xen, make_domain: MakeDomain) -> None:
    a, b = make_domain(), make_domain(pv=True)
    ref, gfn = grant(a, b.domid)
    mfn = mfn_of(xen, a.domid, gfn)
    op = map1(b, a.domid, ref, abi.GNTMAP_device_map)
    assert (op.status, op.dev_bus_addr) == (abi.GNTST_okay, mfn << 12)
    assert pins(xen, a.domid) == {ref: GNTPIN_devw_inc}
    with unchanged(xen):
        # unmap_common: a device mapping with the wrong bus address.
        assert unmap(b, [(0, op.handle, (mfn + 1) << 12)]) == [abi.GNTST_bad_dev_addr]
    assert unmap(b, [(0, op.handle, mfn << 12)]) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {}
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert xen.domain_state(b.domid).maptrack.in_use == 0


def test_pv_host_and_device_map_are_unmapped_half_by_half(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """unmap_common: host_addr 0 or dev_bus_addr 0 leaves that half mapped; the
    handle is freed only when both halves are gone."""
    a, b = make_domain(), make_domain(pv=True)
    ref, gfn = grant(a, b.domid)
    mfn = mfn_of(xen, a.domid, gfn)
    op = map1(b, a.domid, ref, HOST | abi.GNTMAP_device_map)
    assert op.status == abi.GNTST_okay
    assert pins(xen, a.domid) == {ref: GNTPIN_hstw_inc + GNTPIN_devw_inc}
    assert xen.hv.machine.refcount[mfn] == 3
    # The host half; dev_bus_addr 0 keeps the device half.
    assert unmap(b, [(op.host_addr, op.handle, 0)]) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {ref: GNTPIN_devw_inc}
    assert flags_of(xen, a.domid, ref) == PERMIT | READING | WRITING
    assert xen.domain_state(b.domid).maptrack.in_use == 1
    # Host half gone: host_addr is ignored now, the bus address still checked.
    assert unmap(b, [(op.host_addr, op.handle, 0)]) == [abi.GNTST_okay]
    assert unmap(b, [(0, op.handle, 0x1000)]) == [abi.GNTST_bad_dev_addr]
    assert unmap(b, [(op.host_addr, op.handle, mfn << 12)]) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {}
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert xen.domain_state(b.domid).maptrack.in_use == 0
    assert xen.hv.machine.refcount[mfn] == 1
    assert unmap(b, [(0, op.handle, mfn << 12)]) == [abi.GNTST_bad_handle]


def test_unmap_of_a_host_mapping_ignores_dev_bus_addr(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """Since Xen 4.16 the bus address is checked only for device mappings."""
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    op = map1(b, a.domid, ref)
    assert unmap(b, [(op.host_addr, op.handle, 0xABC000)]) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {}


def test_map_grant_of_a_bad_frame_is_bad_page(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """get_paged_frame: a hole, or a foreign (grant-mapped) gfn of the granter."""
    a, b = pair
    c_ref, _ = grant(b, a.domid, data=b"b's page")
    foreign = map1(a, b.domid, c_ref)
    assert foreign.status == abi.GNTST_okay
    hole = a.get_pages(1)[0]
    r1, _ = grant(a, b.domid, gfn=hole)
    r2, _ = grant(a, b.domid, gfn=foreign.host_addr >> 12)
    mine = ram(b)[0]
    with unchanged(xen):
        ops = map_grants(b, [(a.domid, r1, HOST), (a.domid, r2, HOST | RO)])
        assert [op.status for op in ops] == [abi.GNTST_bad_page] * 2
        assert copy(b, ((r1, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF)) == [
            abi.GNTST_bad_page
        ]
    assert flags_of(xen, a.domid, r1) == flags_of(xen, a.domid, r2) == PERMIT
    assert unmap1(a, foreign) == abi.GNTST_okay


@pytest.mark.parametrize("dom", [999, abi.DOMID_SELF, abi.DOMID_XEN])
def test_map_unknown_domain_is_bad_domain(xen: Xen, pair: tuple[Dom, Dom], dom: int) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    with unchanged(xen):
        assert map1(b, dom, ref).status == abi.GNTST_bad_domain


@pytest.mark.parametrize("ref", [512, 513, 4096, 0xFFFFFFFF])
def test_map_ref_past_the_table_is_bad_gntref(xen: Xen, pair: tuple[Dom, Dom], ref: int) -> None:
    a, b = pair
    assert xen.domain_state(a.domid).gt.nr_grant_entries == 512
    with unchanged(xen):
        assert map1(b, a.domid, ref).status == abi.GNTST_bad_gntref
    assert last_reason(xen) == f"Bad ref {ref:#x} for d{a.domid}"


def test_map_entry_not_permit_access_is_general_error(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    gt = a.grant_table
    invalid = gt.get()  # allocated, never granted
    transfer = gt.grant_transfer(b.domid)
    with unchanged(xen):
        entries = {r: raw_entry(xen, a.domid, r) for r in (invalid, transfer, 511)}
        specs = [(a.domid, invalid, HOST), (a.domid, transfer, HOST), (a.domid, 511, HOST | RO)]
        ops = map_grants(b, specs)
        assert [op.status for op in ops] == [abi.GNTST_general_error] * 3
    assert {r: raw_entry(xen, a.domid, r) for r in entries} == entries


def test_map_entry_for_another_domain_is_general_error(
    xen: Xen, make_domain: MakeDomain
) -> None:
    a, b, c = make_domain(), make_domain(), make_domain()
    ref, _gfn = grant(a, c.domid)
    with unchanged(xen):
        assert map1(b, a.domid, ref).status == abi.GNTST_general_error
        assert map1(b, a.domid, ref, HOST | RO).status == abi.GNTST_general_error
    assert flags_of(xen, a.domid, ref) == PERMIT
    # Once c has it pinned, b is refused by the active entry's domid.
    cop = map1(c, a.domid, ref)
    assert cop.status == abi.GNTST_okay
    assert map1(b, a.domid, ref).status == abi.GNTST_general_error
    assert last_reason(xen).startswith(f"Bad domain ({c.domid} != {b.domid})")
    assert unmap1(c, cop) == abi.GNTST_okay


def test_map_readonly_grant_writable_is_general_error(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid, writable=False)
    with unchanged(xen):
        assert map1(b, a.domid, ref).status == abi.GNTST_general_error
        assert last_reason(xen) == "Attempt to write-pin a r/o grant entry"
    assert flags_of(xen, a.domid, ref) == PERMIT | abi.GTF_readonly
    ro = map1(b, a.domid, ref, HOST | RO)
    assert ro.status == abi.GNTST_okay
    # Already pinned read-only: a writable pin still re-checks GTF_readonly.
    with unchanged(xen):
        assert map1(b, a.domid, ref).status == abi.GNTST_general_error
    assert flags_of(xen, a.domid, ref) == PERMIT | abi.GTF_readonly | READING
    assert unmap1(b, ro) == abi.GNTST_okay


def test_map_onto_populated_gfn_is_general_error(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid, data=b"granted")
    assert b.grant_table.nr_frames == 1  # its frame 0 now sits at GNTTAB_GFN_BASE
    mine = ram(b)[0]
    write(b, mine, b"my own data")
    with unchanged(xen):
        assert map1(b, a.domid, ref, HOST, mine).status == abi.GNTST_general_error
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert read(b, mine, 11) == b"my own data"
    # Its own grant-table frame is no hole either.
    with unchanged(xen):
        assert map1(b, a.domid, ref, HOST, GNTTAB_GFN_BASE).status == abi.GNTST_general_error


def test_map_batch_reports_each_entry(xen: Xen, make_domain: MakeDomain) -> None:
    a, b, c = make_domain(), make_domain(), make_domain()
    r1, g1 = grant(a, b.domid, data=b"one")
    r2, g2 = grant(a, b.domid, data=b"two", writable=False)
    r3, _ = grant(a, c.domid)
    ops = map_grants(
        b,
        [
            (a.domid, r1, HOST),
            (a.domid, 600, HOST),
            (a.domid, r2, HOST | RO),
            (999, r1, HOST),
            (a.domid, r1, 0),
            (a.domid, r3, HOST),
            (a.domid, r2, HOST),
        ],
    )
    assert [op.status for op in ops] == [
        abi.GNTST_okay,
        abi.GNTST_bad_gntref,
        abi.GNTST_okay,
        abi.GNTST_bad_domain,
        abi.GNTST_bad_gntref,
        abi.GNTST_general_error,
        abi.GNTST_general_error,
    ]
    # Failed entries took a handle too and put it back at the free list's tail.
    assert [ops[0].handle, ops[2].handle] == [0, 2]
    assert read(b, ops[0].host_addr >> 12, 3) == b"one"
    assert read(b, ops[2].host_addr >> 12, 3) == b"two"
    assert pins(xen, a.domid) == {r1: GNTPIN_hstw_inc, r2: GNTPIN_hstr_inc}
    assert xen.domain_state(b.domid).maptrack.in_use == 2
    assert flags_of(xen, a.domid, r3) == PERMIT
    assert unmap(b, [(ops[0].host_addr, 0), (ops[2].host_addr, 2)]) == [0, 0]
    assert pins(xen, a.domid) == {}
    ungrant(a, r1, g1)
    ungrant(a, r2, g2)


def test_map_failure_keeps_the_callers_handle_and_bus_address(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    """map_grant_ref writes only op->status on failure; the whole op is copied back."""
    a, b = pair
    ops = (abi.gnttab_map_grant_ref * 1)()
    ops[0].host_addr = b.get_pages(1)[0] << 12
    ops[0].flags, ops[0].ref, ops[0].dom = HOST, 600, a.domid
    ops[0].handle, ops[0].dev_bus_addr = 0xDEAD, 0xBEEF000
    b.grant_table_op(abi.GNTTABOP_map_grant_ref, ops)
    assert (ops[0].status, ops[0].handle, ops[0].dev_bus_addr) == (
        abi.GNTST_bad_gntref,
        0xDEAD,
        0xBEEF000,
    )


def test_maptrack_exhaustion_is_no_space(xen: Xen, make_domain: MakeDomain) -> None:
    """One maptrack frame holds 256 handles, but Xen 4.17's per-vCPU free list
    keeps its last entry as the tail sentinel (``_get_maptrack_handle``) and a
    one-vCPU guest has nobody to steal from: 255 maps succeed, the 256th gets
    GNTST_no_space ("Failed to obtain maptrack handle")."""
    a, b = make_domain(), make_domain(max_maptrack_frames=1)
    gfn = ram(a)[0]
    refs = a.grant_table.get_n(257)
    for ref in refs:
        a.grant_table.grant_access(ref, b.domid, gfn, True)
    ops = map_grants(b, [(a.domid, ref, HOST | RO) for ref in refs[:256]])
    assert [op.status for op in ops[:255]] == [abi.GNTST_okay] * 255
    assert [op.handle for op in ops[:255]] == list(range(255))
    assert ops[255].status == abi.GNTST_no_space
    assert last_reason(xen).startswith("Failed to obtain maptrack handle")
    mt = xen.domain_state(b.domid).maptrack
    assert (mt.in_use, mt.frames) == (255, 1)
    with unchanged(xen):
        assert map1(b, a.domid, refs[256]).status == abi.GNTST_no_space
    assert flags_of(xen, a.domid, refs[256]) == PERMIT
    # Freed handles go to the tail; the old sentinel is handed out first.
    assert unmap1(b, ops[7]) == abi.GNTST_okay
    again = map1(b, a.domid, refs[7], HOST | RO)
    assert (again.status, again.handle) == (abi.GNTST_okay, 255)
    assert map1(b, a.domid, refs[256]).status == abi.GNTST_no_space
    assert unmap1(b, ops[9]) == abi.GNTST_okay
    assert map1(b, a.domid, refs[9], HOST | RO).handle == 7
    # Unmap everything: nothing stays pinned or tracked.
    live = [(h, m.host_gfn) for h, m in mt.live()]
    assert len(live) == 255
    assert unmap(b, [(g << 12, h) for h, g in live]) == [abi.GNTST_okay] * 255
    assert mt.in_use == 0
    assert pins(xen, a.domid) == {}
    assert xen.hv.machine.refcount[mfn_of(xen, a.domid, gfn)] == 1


@pytest.mark.parametrize("readonly", [True, False])
def test_pin_counter_overflow_at_128(xen: Xen, pair: tuple[Dom, Dom], readonly: bool) -> None:
    """Xen 4.17 ``act->pin & GNTPIN_incr2oflow_mask(pin_incr)`` (since 4.15,
    8cec5d065c): the 129th pin of a kind is refused; pins of other kinds are not."""
    a, b = pair
    ref, gfn = grant(a, b.domid)
    flags = HOST | (RO if readonly else 0)
    inc = GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    ops = map_grants(b, [(a.domid, ref, flags)] * 129)
    assert [op.status for op in ops[:128]] == [abi.GNTST_okay] * 128
    assert ops[128].status == abi.GNTST_general_error
    assert pins(xen, a.domid) == {ref: 128 * inc}
    assert last_reason(xen) == (
        f"Bad domain ({b.domid} != {b.domid}), or risk of counter overflow "
        f"{128 * inc:08x}, or subpage 0"
    )
    mine = ram(b)[0]
    with unchanged(xen):
        # The full counter refuses its own kind: a map of that kind, and a
        # copy that would increment it (a source pins hstr, a destination hstw).
        assert map1(b, a.domid, ref, flags).status == abi.GNTST_general_error
        side = ((ref, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF)
        if not readonly:
            side = ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 0), 8, DST_GREF)
        assert copy(b, side) == [abi.GNTST_general_error]
    # The other kind still pins (and unpins): a map and a copy.
    other = map1(b, a.domid, ref, HOST if readonly else HOST | RO)
    assert other.status == abi.GNTST_okay
    assert unmap1(b, other) == abi.GNTST_okay
    cross = ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 0), 8, DST_GREF)
    if not readonly:
        cross = ((ref, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF)
    assert copy(b, cross) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {ref: 128 * inc}
    # One unmap brings the counter to 127: pins work again.
    assert unmap1(b, ops[0]) == abi.GNTST_okay
    more = map1(b, a.domid, ref, flags)
    assert more.status == abi.GNTST_okay
    assert pins(xen, a.domid) == {ref: 128 * inc}
    statuses = unmap(b, [(op.host_addr, op.handle) for op in [*ops[1:128], more]])
    assert statuses == [abi.GNTST_okay] * 128
    assert pins(xen, a.domid) == {}
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert xen.hv.machine.refcount[mfn_of(xen, a.domid, gfn)] == 1


# =================================================================== unmap
def test_unmap_clears_writing_with_the_last_writable_pin(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    w = map1(b, a.domid, ref, HOST)
    r = map1(b, a.domid, ref, HOST | RO)
    w2 = map1(b, a.domid, ref, HOST)
    assert flags_of(xen, a.domid, ref) == PERMIT | READING | WRITING
    assert pins(xen, a.domid) == {ref: 2 * GNTPIN_hstw_inc + GNTPIN_hstr_inc}
    assert unmap1(b, w) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT | READING | WRITING
    assert unmap1(b, w2) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT | READING
    assert pins(xen, a.domid) == {ref: GNTPIN_hstr_inc}
    assert unmap1(b, r) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert pins(xen, a.domid) == {}


def test_unmap_readonly_first_keeps_both_flags(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    r = map1(b, a.domid, ref, HOST | RO)
    w = map1(b, a.domid, ref, HOST)
    assert unmap1(b, r) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT | READING | WRITING
    assert unmap1(b, w) == abi.GNTST_okay
    assert flags_of(xen, a.domid, ref) == PERMIT


@pytest.mark.parametrize("handle", [5, 1024 * 256, 1024 * 256 + 1, 0xFFFFFFFF])
def test_unmap_unknown_handle_is_bad_handle(xen: Xen, pair: tuple[Dom, Dom], handle: int) -> None:
    a, b = pair
    ref, _gfn = grant(a, b.domid)
    op = map1(b, a.domid, ref)
    with unchanged(xen):
        assert unmap(b, [(op.host_addr, handle)]) == [abi.GNTST_bad_handle]
    assert unmap1(b, op) == abi.GNTST_okay


def test_double_unmap_is_bad_handle(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, gfn = grant(a, b.domid)
    op = map1(b, a.domid, ref)
    assert unmap1(b, op) == abi.GNTST_okay
    with unchanged(xen):
        assert unmap1(b, op) == abi.GNTST_bad_handle
        assert last_reason(xen) == f"Zero flags for d{b.domid} handle {op.handle:#x}"
        # Both in one batch: the second finds the handle already freed.
        op = map1(b, a.domid, ref)
        assert unmap(b, [(op.host_addr, op.handle)] * 2) == [abi.GNTST_okay, abi.GNTST_bad_handle]
    assert xen.hv.machine.refcount[mfn_of(xen, a.domid, gfn)] == 1


def test_unmap_at_the_wrong_address_is_general_error(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    r1, _ = grant(a, b.domid)
    r2, _ = grant(a, b.domid)
    m1, m2 = map1(b, a.domid, r1), map1(b, a.domid, r2)
    elsewhere = b.get_pages(1)[0] << 12
    mine = ram(b)[0] << 12
    with unchanged(xen):
        statuses = unmap(b, [(elsewhere, m1.handle), (m2.host_addr, m1.handle), (mine, m1.handle)])
        assert statuses == [abi.GNTST_general_error] * 3
    assert flags_of(xen, a.domid, r1) == PERMIT | READING | WRITING
    assert unmap(b, [(m1.host_addr, m1.handle), (m2.host_addr, m2.handle)]) == [0, 0]


def test_unmap_with_host_addr_zero_keeps_the_mapping(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid, data=b"still here")
    op = map1(b, a.domid, ref)
    with unchanged(xen):
        assert unmap(b, [(0, op.handle)]) == [abi.GNTST_okay]
    assert read(b, op.host_addr >> 12, 10) == b"still here"
    assert unmap1(b, op) == abi.GNTST_okay
    assert pins(xen, a.domid) == {}


def test_unmap_and_replace(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """replace_grant_p2m_mapping: a translated guest cannot replace (new_addr != 0)."""
    a, b = pair
    ref, _ = grant(a, b.domid)
    op = map1(b, a.domid, ref)
    ops = (abi.gnttab_unmap_and_replace * 1)()
    ops[0].host_addr, ops[0].new_addr, ops[0].handle = op.host_addr, b.get_pages(1)[0] << 12, 0
    with unchanged(xen):
        assert b.grant_table_op(abi.GNTTABOP_unmap_and_replace, ops) == 0
        assert ops[0].status == abi.GNTST_general_error
    ops[0].new_addr = 0
    assert b.grant_table_op(abi.GNTTABOP_unmap_and_replace, ops) == 0
    assert ops[0].status == abi.GNTST_okay
    assert pins(xen, a.domid) == {}
    assert xen.domain_state(b.domid).maptrack.in_use == 0
    assert b.grant_table_op(abi.GNTTABOP_unmap_and_replace, ops) == 0
    assert ops[0].status == abi.GNTST_bad_handle


# ==================================================================== copy
def test_copy_gref_to_gmfn(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    data = bytes(range(256)) * 16
    ref, _ = grant(a, b.domid, data=data, writable=False)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(b, ((ref, a.domid, 100), (mine, abi.DOMID_SELF, 3000), 1000, SRC_GREF))
        assert st == [abi.GNTST_okay]
        assert read(b, mine, 1000, 3000) == data[100:1100]
        assert read(b, mine, 3000) == bytes(3000)
    assert flags_of(xen, a.domid, ref) == PERMIT | abi.GTF_readonly


def test_copy_gmfn_to_gref(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, gfn = grant(a, b.domid)
    mine = ram(b)[0]
    write(b, mine, b"X" * PAGE)
    with unchanged(xen):
        assert copy(b, ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 0), PAGE, DST_GREF)) == [0]
        assert read(a, gfn) == b"X" * PAGE
    assert flags_of(xen, a.domid, ref) == PERMIT


def test_copy_gref_to_gref_across_domains(xen: Xen, make_domain: MakeDomain) -> None:
    a, b, c = make_domain(), make_domain(), make_domain()
    src, _ = grant(a, b.domid, data=b"abcdefgh" * 512, writable=False)
    dst, dgfn = grant(c, b.domid)
    with unchanged(xen):
        st = copy(
            b,
            ((src, a.domid, 8), (dst, c.domid, 4000), 96, SRC_GREF | DST_GREF),
            ((src, a.domid, 0), (dst, c.domid, 0), 16, SRC_GREF | DST_GREF),
        )
        assert st == [0, 0]
        got = read(c, dgfn)
        assert got[4000:] == (b"abcdefgh" * 12)
        assert got[:16] == b"abcdefghabcdefgh"
        assert got[16:4000] == bytes(3984)


def test_copy_while_mapped_leaves_the_mappings_pins(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, gfn = grant(a, b.domid, data=b"mapped")
    op = map1(b, a.domid, ref, HOST | RO)
    mine = ram(b)[0]
    with unchanged(xen):
        assert copy(b, ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 0), 4, DST_GREF)) == [0]
        assert copy(b, ((ref, a.domid, 0), (mine, abi.DOMID_SELF, 8), 6, SRC_GREF)) == [0]
    assert flags_of(xen, a.domid, ref) == PERMIT | READING
    assert read(a, gfn, 6) == bytes(4) + b"ed"
    assert read(b, mine, 6, 8) == bytes(4) + b"ed"
    assert unmap1(b, op) == 0


@pytest.mark.parametrize("side", ["source", "dest"])
def test_copy_gmfn_with_numeric_domid_is_permission_denied(
    xen: Xen, pair: tuple[Dom, Dom], side: str
) -> None:
    """gnttab_copy_lock_domain: "Only DOMID_SELF may reference via frame", own id too."""
    a, b = pair
    ref, _ = grant(a, b.domid)
    mine = ram(b)[0]
    if side == "source":
        spec = ((mine, b.domid, 0), (ref, a.domid, 0), 8, DST_GREF)
    else:
        spec = ((ref, a.domid, 0), (mine, b.domid, 0), 8, SRC_GREF)
    with unchanged(xen):
        assert copy(b, spec) == [abi.GNTST_permission_denied]


def test_copy_unknown_domain_is_bad_domain(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((ref, 999, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF),
            ((mine, abi.DOMID_SELF, 0), (ref, 999, 0), 8, DST_GREF),
            ((ref, a.domid, 0), (ref, 998, 0), 8, SRC_GREF | DST_GREF),
        )
        assert st == [abi.GNTST_bad_domain] * 3


def test_copy_bad_ref_is_bad_gntref(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((512, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF),
            ((mine, abi.DOMID_SELF, 0), (0xFFFFFFFF, a.domid, 0), 8, DST_GREF),
            # The source is claimed (and released again) before the bad dest.
            ((ref, a.domid, 0), (600, a.domid, 0), 8, SRC_GREF | DST_GREF),
            # Refs are checked before the offsets.
            ((512, a.domid, 4000), (mine, abi.DOMID_SELF, 0), 200, SRC_GREF),
        )
        assert st == [abi.GNTST_bad_gntref] * 4
    assert flags_of(xen, a.domid, ref) == PERMIT


def test_copy_wrong_type_or_domid_is_general_error(xen: Xen, make_domain: MakeDomain) -> None:
    a, b, c = make_domain(), make_domain(), make_domain()
    other, _ = grant(a, c.domid)
    invalid = a.grant_table.get()
    transfer = a.grant_table.grant_transfer(b.domid)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((other, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF),
            ((invalid, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF),
            ((transfer, a.domid, 0), (mine, abi.DOMID_SELF, 0), 8, SRC_GREF),
            ((mine, abi.DOMID_SELF, 0), (other, a.domid, 0), 8, DST_GREF),
        )
        assert st == [abi.GNTST_general_error] * 4


def test_copy_into_readonly_grant_is_general_error(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, gfn = grant(a, b.domid, data=b"keep", writable=False)
    mine = ram(b)[0]
    write(b, mine, b"overwrite")
    with unchanged(xen):
        assert copy(b, ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 0), 9, DST_GREF)) == [
            abi.GNTST_general_error
        ]
        assert last_reason(xen) == "Attempt to write-pin a r/o grant entry"
    assert read(a, gfn, 4) == b"keep"
    assert flags_of(xen, a.domid, ref) == PERMIT | abi.GTF_readonly


def test_copy_bad_gmfn_is_bad_page(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid)
    mop = map1(b, a.domid, ref)  # a foreign (grant-mapped) gfn is no frame of b's
    hole = b.get_pages(1)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((hole, abi.DOMID_SELF, 0), (ref, a.domid, 0), 8, DST_GREF),
            ((ref, a.domid, 0), (hole, abi.DOMID_SELF, 0), 8, SRC_GREF),
            ((mop.host_addr >> 12, abi.DOMID_SELF, 0), (ref, a.domid, 0), 8, DST_GREF),
        )
        assert st == [abi.GNTST_bad_page] * 3
    assert unmap1(b, mop) == 0


@pytest.mark.parametrize(
    ("s_off", "d_off", "length"), [(4000, 0, 97), (0, 4000, 97), (4095, 4095, 2), (0, 0, 4097)]
)
def test_copy_crossing_the_page_is_bad_copy_arg(
    xen: Xen, pair: tuple[Dom, Dom], s_off: int, d_off: int, length: int
) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((ref, a.domid, s_off), (mine, abi.DOMID_SELF, d_off), length, SRC_GREF),
            ((mine, abi.DOMID_SELF, s_off), (ref, a.domid, d_off), length, DST_GREF),
        )
        assert st == [abi.GNTST_bad_copy_arg] * 2
        assert last_reason(xen) == "copy beyond page area"
    # Up to the last byte is fine.
    assert copy(b, ((ref, a.domid, 4000), (mine, abi.DOMID_SELF, 0), 96, SRC_GREF)) == [0]


def test_copy_zero_length_is_validated_in_4_17(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """Xen 4.17 has no len == 0 shortcut (master's a4a790f432 came later)."""
    a, b = pair
    ref, _ = grant(a, b.domid)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((600, a.domid, 0), (mine, abi.DOMID_SELF, 0), 0, SRC_GREF),
            ((mine, b.domid, 0), (ref, a.domid, 0), 0, DST_GREF),
            ((ref, 999, 0), (mine, abi.DOMID_SELF, 0), 0, SRC_GREF),
            ((ref, a.domid, 0), (mine, abi.DOMID_SELF, 0), 0, SRC_GREF),
            ((ref, a.domid, 4096), (mine, abi.DOMID_SELF, 4096), 0, SRC_GREF),
        )
        assert st == [
            abi.GNTST_bad_gntref,
            abi.GNTST_permission_denied,
            abi.GNTST_bad_domain,
            abi.GNTST_okay,
            abi.GNTST_okay,
        ]


def test_copy_batch_reports_each_entry(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, gfn = grant(a, b.domid, data=b"0123456789")
    mine = ram(b)[0]
    st = copy(
        b,
        ((ref, a.domid, 0), (mine, abi.DOMID_SELF, 0), 4, SRC_GREF),
        ((ref, a.domid, 0), (mine, abi.DOMID_SELF, 0), 4, SRC_GREF | DST_GREF),
        ((ref, a.domid, 4), (mine, abi.DOMID_SELF, 4), 6, SRC_GREF),
        ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 4093), 4, DST_GREF),
    )
    assert st == [0, abi.GNTST_bad_gntref, 0, abi.GNTST_bad_copy_arg]
    assert read(b, mine, 10) == b"0123456789"
    assert pins(xen, a.domid) == {}
    ungrant(a, ref, gfn)


def test_v2_sub_page_grant_copies_only_its_window(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    gt = a.grant_table
    assert gt.set_version(2) == 2
    gfn = ram(a)[0]
    write(a, gfn, bytes(range(256)) * 16)
    ref = gt.get()
    gt.grant_access_subpage(ref, b.domid, gfn, 1024, 512)
    mine = ram(b)[0]
    with unchanged(xen):
        st = copy(
            b,
            ((ref, a.domid, 1024), (mine, abi.DOMID_SELF, 0), 512, SRC_GREF),
            ((ref, a.domid, 1100), (mine, abi.DOMID_SELF, 0), 10, SRC_GREF),
            ((ref, a.domid, 1000), (mine, abi.DOMID_SELF, 0), 100, SRC_GREF),
            ((ref, a.domid, 1500), (mine, abi.DOMID_SELF, 0), 100, SRC_GREF),
            ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 1535), 2, DST_GREF),
            ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 2000), 8, DST_GREF),
        )
        assert st == [0, 0] + [abi.GNTST_general_error] * 4
        assert last_reason(xen).startswith("copy dest out of bounds")
        assert read(b, mine, 512) == bytes(range(76, 86)) + (bytes(range(256)) * 2)[10:]
    assert status_of(xen, a.domid, ref) == 0
    # A sub-page grant is never mappable.
    with unchanged(xen):
        assert map1(b, a.domid, ref, HOST | RO).status == abi.GNTST_general_error
    # Inside the window a write lands.
    assert copy(b, ((mine, abi.DOMID_SELF, 0), (ref, a.domid, 1530), 6, DST_GREF)) == [0]
    assert read(a, gfn, 6, 1530) == read(b, mine, 6)


# ================================================================ transfer
def _transfer(giver: Dom, frame: int, domid: int, ref: int) -> int:
    ops = (abi.gnttab_transfer * 1)()
    ops[0].mfn, ops[0].domid, ops[0].ref = frame, domid, ref
    assert giver.grant_table_op(abi.GNTTABOP_transfer, ops) == 0
    return int(ops[0].status)


def test_transfer_from_pv_to_hvm(xen: Xen, make_domain: MakeDomain) -> None:
    giver, recv = make_domain(pv=True), make_domain()
    dest = fresh_gfn()
    ref = recv.grant_table.grant_transfer(giver.domid, dest)
    assert flags_of(xen, recv.domid, ref) == abi.GTF_accept_transfer
    (mfn,) = ram(giver)
    payload = bytes(range(256)) * 16
    write(giver, mfn, payload)
    frames = xen.free_frames
    g_pages, r_pages = (xen.domain_state(d.domid).tot_pages for d in (giver, recv))

    assert _transfer(giver, mfn, recv.domid, ref) == abi.GNTST_okay

    done = abi.GTF_accept_transfer | abi.GTF_transfer_committed | abi.GTF_transfer_completed
    assert raw_entry(xen, recv.domid, ref) == struct.pack("<HHI", done, giver.domid, dest)
    assert xen.free_frames == frames
    assert mfn not in xen.domain_state(giver.domid).p2m
    assert xen.domain_state(recv.domid).p2m[dest] == (mfn, P2M_RAM_RW)
    assert xen.hv.machine.owner[mfn] == recv.domid
    assert xen.domain_state(giver.domid).tot_pages == g_pages - 1
    assert xen.domain_state(recv.domid).tot_pages == r_pages + 1
    assert recv.grant_table.end_transfer(ref) == dest
    assert flags_of(xen, recv.domid, ref) == 0
    assert read(recv, dest) == payload
    free_ram(recv, [dest])
    assert xen.free_frames == frames + 1


def _pv_table(xen: Xen, dom: Dom) -> int:
    """A PV guest's first grant-table frame (machine frame == its gfn)."""
    frames = xen.domain_state(dom.domid).gt.shared
    assert xen.domain_state(dom.domid).p2m[frames[0]][0] == frames[0]
    return frames[0]


def test_transfer_between_pv_guests_writes_the_mfn(xen: Xen, make_domain: MakeDomain) -> None:
    giver, recv = make_domain(pv=True), make_domain(pv=True)
    table = _pv_table(xen, recv)
    write(recv, table, struct.pack("<HHI", abi.GTF_accept_transfer, giver.domid, 0), 8 * 10)
    (mfn,) = ram(giver)
    write(giver, mfn, b"moving house")
    assert _transfer(giver, mfn, recv.domid, 10) == abi.GNTST_okay
    flags, _dom, frame = struct.unpack("<HHI", read(recv, table, 8, 80))
    assert frame == mfn
    assert flags == (
        abi.GTF_accept_transfer | abi.GTF_transfer_committed | abi.GTF_transfer_completed
    )
    assert read(recv, mfn, 12) == b"moving house"


def test_transfer_from_hvm_is_general_error_and_keeps_the_page(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    recv, giver = pair
    ref = recv.grant_table.grant_transfer(giver.domid, fresh_gfn())
    gfn = ram(giver)[0]
    write(giver, gfn, b"mine")
    entry = raw_entry(xen, recv.domid, ref)
    with unchanged(xen):
        assert _transfer(giver, gfn, recv.domid, ref) == abi.GNTST_general_error
        # get_gfn_unshare comes first: nothing at the gfn is GNTST_bad_page.
        assert _transfer(giver, giver.get_pages(1)[0], recv.domid, ref) == abi.GNTST_bad_page
    assert read(giver, gfn, 4) == b"mine"
    assert raw_entry(xen, recv.domid, ref) == entry


@pytest.mark.parametrize("case", ["permit_access", "other_domid", "invalid", "past_table"])
def test_transfer_to_a_bad_entry_loses_the_page(
    xen: Xen, make_domain: MakeDomain, case: str
) -> None:
    """Once stolen, a failed transfer frees the page (gnttab_transfer's
    ``unlock_and_copyback`` path): the giver does not get it back."""
    giver, recv, other = make_domain(pv=True), make_domain(), make_domain()
    gt = recv.grant_table
    if case == "permit_access":
        ref, _ = grant(recv, giver.domid)
    elif case == "other_domid":
        ref = gt.grant_transfer(other.domid, fresh_gfn())
    elif case == "invalid":
        ref = gt.get()
    else:
        ref = 512
    entry = raw_entry(xen, recv.domid, ref) if ref < 512 else b""
    (mfn,) = ram(giver)
    frames = xen.free_frames
    pages = xen.domain_state(giver.domid).tot_pages
    r_pages = xen.domain_state(recv.domid).tot_pages
    assert _transfer(giver, mfn, recv.domid, ref) == abi.GNTST_general_error
    assert xen.free_frames == frames + 1
    assert mfn not in xen.domain_state(giver.domid).p2m
    assert xen.domain_state(giver.domid).tot_pages == pages - 1
    assert xen.domain_state(recv.domid).tot_pages == r_pages
    assert xen.hv.machine.refcount[mfn] == 0
    if entry:
        assert raw_entry(xen, recv.domid, ref) == entry


def test_transfer_to_unknown_domain_loses_the_page(xen: Xen, make_domain: MakeDomain) -> None:
    giver = make_domain(pv=True)
    (mfn,) = ram(giver)
    frames = xen.free_frames
    assert _transfer(giver, mfn, 999, 8) == abi.GNTST_bad_domain
    assert xen.free_frames == frames + 1
    assert mfn not in xen.domain_state(giver.domid).p2m


def test_transfer_to_a_full_domain_loses_the_page(xen: Xen, make_domain: MakeDomain) -> None:
    giver, recv = make_domain(pv=True), make_domain(max_pages=0)
    ref = recv.grant_table.grant_transfer(giver.domid, fresh_gfn())
    (mfn,) = ram(giver)
    frames = xen.free_frames
    assert _transfer(giver, mfn, recv.domid, ref) == abi.GNTST_general_error
    assert last_reason(xen).endswith("dying or has no headroom")
    assert xen.free_frames == frames + 1
    assert flags_of(xen, recv.domid, ref) == abi.GTF_accept_transfer


def test_transfer_of_a_mapped_page_is_bad_page_and_keeps_it(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """steal_page wants exactly the owner's reference: -EINVAL -> GNTST_bad_page."""
    giver, recv, mapper = make_domain(pv=True), make_domain(), make_domain()
    ref = recv.grant_table.grant_transfer(giver.domid, fresh_gfn())
    (mfn,) = ram(giver)
    write(giver, mfn, b"shared")
    table = _pv_table(xen, giver)
    write(giver, table, struct.pack("<HHI", PERMIT, mapper.domid, mfn), 8 * 9)
    mop = map1(mapper, giver.domid, 9)
    assert mop.status == abi.GNTST_okay
    entry = raw_entry(xen, recv.domid, ref)
    with unchanged(xen):
        assert _transfer(giver, mfn, recv.domid, ref) == abi.GNTST_bad_page
    assert raw_entry(xen, recv.domid, ref) == entry
    assert read(mapper, mop.host_addr >> 12, 6) == b"shared"
    assert unmap1(mapper, mop) == 0
    # Unmapped, it can go.
    assert _transfer(giver, mfn, recv.domid, ref) == abi.GNTST_okay


def test_transfer_of_a_frame_not_owned_is_bad_page(xen: Xen, make_domain: MakeDomain) -> None:
    giver, recv = make_domain(pv=True), make_domain()
    ref = recv.grant_table.grant_transfer(giver.domid, fresh_gfn())
    other = ram(recv)[0]
    with unchanged(xen):
        for frame in (_pv_table(xen, giver), mfn_of(xen, recv.domid, other), 0, 10**9):
            assert _transfer(giver, frame, recv.domid, ref) == abi.GNTST_bad_page


# ============================================ setup_table and table-wide ops
@pytest.mark.parametrize(
    "cmd",
    [abi.GNTTABOP_setup_table, abi.GNTTABOP_query_size, abi.GNTTABOP_get_status_frames],
    ids=["setup_table", "query_size", "get_status_frames"],
)
@pytest.mark.parametrize("count", [0, 2])
def test_single_op_commands_want_count_one(
    xen: Xen, make_domain: MakeDomain, cmd: int, count: int
) -> None:
    a = make_domain()
    ops = (abi.GNTTABOP_STRUCTS[cmd] * 2)()
    for op in ops:
        op.dom = abi.DOMID_SELF
    with unchanged(xen):
        assert errno_of(lambda: a.grant_table_op(cmd, ops, count)) == errno.EINVAL
    # Too short a buffer for the count still answers -EINVAL first.
    one = (abi.GNTTABOP_STRUCTS[cmd] * 1)()
    assert errno_of(lambda: a.grant_table_op(cmd, one, count)) == errno.EINVAL


def test_set_and_get_version_ignore_count(xen: Xen, make_domain: MakeDomain) -> None:
    """do_grant_table_op passes no count to gnttab_set_version/gnttab_get_version."""
    a = make_domain()
    sv = (abi.gnttab_set_version * 1)()
    sv[0].version = 2
    assert a.grant_table_op(abi.GNTTABOP_set_version, sv, 0) == 0
    assert xen.domain_state(a.domid).gt.version == 2
    gv = (abi.gnttab_get_version * 1)()
    gv[0].dom = abi.DOMID_SELF
    assert a.grant_table_op(abi.GNTTABOP_get_version, gv, 5) == 0
    assert gv[0].version == 2


def _setup_table(dom: Dom, target: int, nr: int, frame_list: int) -> int:
    op = abi.gnttab_setup_table(dom=target, nr_frames=nr, frame_list=frame_list)
    assert dom.grant_table_op(abi.GNTTABOP_setup_table, op) == 0
    return int(op.status)


def _query(dom: Dom, target: int = abi.DOMID_SELF) -> tuple[int, int, int]:
    op = abi.gnttab_query_size(dom=target, nr_frames=77, max_nr_frames=88)
    assert dom.grant_table_op(abi.GNTTABOP_query_size, op) == 0
    return int(op.status), int(op.nr_frames), int(op.max_nr_frames)


def test_setup_table_grows_and_lists_frames(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain(max_grant_frames=4)
    assert a.grant_table.nr_frames == 1  # frame 0 placed at GNTTAB_GFN_BASE
    buf = ram(a)[0]
    frames = xen.free_frames
    assert _query(a) == (abi.GNTST_okay, 1, 4)
    assert _setup_table(a, abi.DOMID_SELF, 3, (buf << 12) + 16) == abi.GNTST_okay
    assert _query(a) == (abi.GNTST_okay, 3, 4)
    assert xen.free_frames == frames - 2
    # A translated guest is told where each frame is in its physmap.
    listed = struct.unpack("<3Q", read(a, buf, 24, 16))
    assert listed == (GNTTAB_GFN_BASE, INVALID_GFN, INVALID_GFN)
    # Shrinking is not a thing; asking for fewer just lists them.
    assert _setup_table(a, a.domid, 1, buf << 12) == abi.GNTST_okay
    assert _setup_table(a, abi.DOMID_SELF, 0, 0) == abi.GNTST_okay
    assert _query(a) == (abi.GNTST_okay, 3, 4)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 2, 0x7000) == 0
    assert _setup_table(a, abi.DOMID_SELF, 4, buf << 12) == abi.GNTST_okay
    listed = struct.unpack("<4Q", read(a, buf, 32))
    assert listed == (GNTTAB_GFN_BASE, INVALID_GFN, 0x7000, INVALID_GFN)


def test_setup_table_for_pv_lists_machine_frames(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain(pv=True)
    (buf,) = ram(a)
    assert _setup_table(a, abi.DOMID_SELF, 2, buf << 12) == abi.GNTST_okay
    shared = xen.domain_state(a.domid).gt.shared
    assert struct.unpack("<2Q", read(a, buf, 16)) == tuple(shared)


def test_setup_table_past_max_is_general_error(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain(max_grant_frames=4)
    buf = ram(a)[0]
    with unchanged(xen):
        assert _setup_table(a, abi.DOMID_SELF, 5, buf << 12) == abi.GNTST_general_error
        assert _setup_table(a, abi.DOMID_SELF, 0xFFFFFFFF, buf << 12) == abi.GNTST_general_error
    assert read(a, buf, 8) == bytes(8)
    assert _setup_table(a, abi.DOMID_SELF, 4, buf << 12) == abi.GNTST_okay


def test_setup_table_bad_frame_list_is_bad_virt_addr(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain()
    assert a.grant_table.nr_frames == 1
    hole = a.get_pages(1)[0]
    assert _setup_table(a, abi.DOMID_SELF, 2, hole << 12) == abi.GNTST_bad_virt_addr
    # The table grew all the same: Xen grows, then copies out.
    assert _query(a)[:2] == (abi.GNTST_okay, 2)
    # A grant-table frame is no place for a hypercall buffer either.
    assert _setup_table(a, abi.DOMID_SELF, 1, GNTTAB_GFN_BASE << 12) == abi.GNTST_bad_virt_addr
    assert read(a, GNTTAB_GFN_BASE, 8) == bytes(8)


def test_table_ops_naming_another_domain(xen: Xen, make_domain: MakeDomain) -> None:
    """XSM_TARGET (dummy policy): only the domain itself or the control domain."""
    dom0, a, b = make_domain(0), make_domain(max_grant_frames=8), make_domain()
    buf_b, buf0 = ram(b)[0], ram(dom0)[0]
    with unchanged(xen):
        assert _setup_table(b, a.domid, 2, buf_b << 12) == abi.GNTST_permission_denied
        assert _query(b, a.domid) == (abi.GNTST_permission_denied, 77, 88)
        sf = abi.gnttab_get_status_frames(nr_frames=0, dom=a.domid, frame_list=buf_b << 12)
        assert b.grant_table_op(abi.GNTTABOP_get_status_frames, sf) == 0
        assert sf.status == abi.GNTST_permission_denied
        gv = abi.gnttab_get_version(dom=a.domid)
        assert errno_of(lambda: b.grant_table_op(abi.GNTTABOP_get_version, gv)) == errno.EPERM
    # Unknown domains, for everyone.
    with unchanged(xen):
        for caller in (b, dom0):
            assert _setup_table(caller, 999, 1, buf_b << 12) == abi.GNTST_bad_domain
            assert _query(caller, 999) == (abi.GNTST_bad_domain, 77, 88)
            gv = abi.gnttab_get_version(dom=999)
            with pytest.raises(HypercallError) as ei:
                caller.grant_table_op(abi.GNTTABOP_get_version, gv)
            assert ei.value.errno == errno.ESRCH
    # dom0 may: the frames of a are listed in dom0's buffer.
    assert _query(dom0, a.domid) == (abi.GNTST_okay, 1, 8)
    assert _setup_table(dom0, a.domid, 3, buf0 << 12) == abi.GNTST_okay
    assert _query(a) == (abi.GNTST_okay, 3, 8)
    assert struct.unpack("<3Q", read(dom0, buf0, 24)) == (INVALID_GFN,) * 3
    gv = abi.gnttab_get_version(dom=a.domid)
    assert dom0.grant_table_op(abi.GNTTABOP_get_version, gv) == 0
    assert gv.version == 1


def test_query_size_reports_limits(xen: Xen, make_domain: MakeDomain) -> None:
    assert _query(make_domain()) == (abi.GNTST_okay, 1, 64)
    a = make_domain(max_grant_frames=2)
    assert _query(a) == (abi.GNTST_okay, 1, 2)
    assert _query(a, a.domid) == (abi.GNTST_okay, 1, 2)


def test_set_version_round_trip_keeps_reserved_entries(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    g = xen.domain_state(a.domid).gt
    for ref in range(10):
        put_entry_v1(xen, a.domid, ref, PERMIT | abi.GTF_readonly, b.domid, 0x1000 + ref)
    frames = xen.free_frames

    assert set_version(a, 2) == (0, 2)
    assert g.version == 2 and len(g.status) == 1
    assert xen.free_frames == frames - 1
    for ref in range(8):
        assert raw_entry(xen, a.domid, ref) == struct.pack(
            "<HHIQ", PERMIT | abi.GTF_readonly, b.domid, 0, 0x1000 + ref
        )
        assert status_of(xen, a.domid, ref) == 0
    assert raw_entry(xen, a.domid, 8) == bytes(16)
    assert raw_entry(xen, a.domid, 9) == bytes(16)
    # Status frames can be placed only under v2.
    status_idx = abi.XENMAPIDX_grant_table_status
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, status_idx, 0x6000) == 0
    assert xen.domain_state(a.domid).p2m[0x6000] == (g.status[0], P2M_GNTTAB_STATUS)

    assert set_version(a, 1) == (0, 1)
    assert g.version == 1 and g.status == []
    assert 0x6000 not in xen.domain_state(a.domid).p2m
    assert xen.free_frames == frames
    for ref in range(8):
        assert raw_entry(xen, a.domid, ref) == struct.pack(
            "<HHI", PERMIT | abi.GTF_readonly, b.domid, 0x1000 + ref
        )
    assert raw_entry(xen, a.domid, 8) == bytes(8)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, status_idx, 0x6000) == (
        -errno.EINVAL
    )


def test_set_version_carries_pinned_reserved_entries(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """Refs 0..7 may stay mapped (console, xenstore) across a version change."""
    a, b = pair
    gfn = ram(a)[0]
    write(a, gfn, b"xenstore ring")
    put_entry_v1(xen, a.domid, 1, PERMIT, b.domid, gfn)
    op = map1(b, a.domid, 1)
    assert op.status == abi.GNTST_okay
    assert set_version(a, 2) == (0, 2)
    assert flags_of(xen, a.domid, 1) == PERMIT
    assert status_of(xen, a.domid, 1) == READING | WRITING
    assert read(b, op.host_addr >> 12, 13) == b"xenstore ring"
    assert set_version(a, 1) == (0, 1)
    assert flags_of(xen, a.domid, 1) == PERMIT | READING | WRITING
    assert set_version(a, 2) == (0, 2)
    assert unmap1(b, op) == abi.GNTST_okay
    assert status_of(xen, a.domid, 1) == 0
    assert flags_of(xen, a.domid, 1) == PERMIT


def test_set_version_v2_to_v1_keeps_only_permit_access(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """gnttab_set_version: other reserved v2 entries become invalid under v1."""
    a, b = pair
    assert set_version(a, 2) == (0, 2)
    g = xen.domain_state(a.domid).gt
    struct.pack_into("<HHIQ", xen.mem, g.entry_offset(2), PERMIT, b.domid, 0, 0x1234)
    struct.pack_into(
        "<HHIQ", xen.mem, g.entry_offset(3), abi.GTF_accept_transfer, b.domid, 0, 1 << 40
    )
    assert set_version(a, 1) == (0, 1)
    assert raw_entry(xen, a.domid, 2) == struct.pack("<HHI", PERMIT, b.domid, 0x1234)
    assert raw_entry(xen, a.domid, 3) == bytes(8)


@pytest.mark.parametrize("kind", ["transitive", "wide_frame"])
def test_set_version_v2_to_v1_unrepresentable_is_erange(
    xen: Xen, pair: tuple[Dom, Dom], kind: str
) -> None:
    a, b = pair
    assert set_version(a, 2) == (0, 2)
    g = xen.domain_state(a.domid).gt
    if kind == "transitive":
        struct.pack_into("<HHHHI", xen.mem, g.entry_offset(4), abi.GTF_transitive, b.domid, 0, 0, 9)
    else:
        struct.pack_into("<HHIQ", xen.mem, g.entry_offset(4), PERMIT, b.domid, 0, 1 << 32)
    entry = raw_entry(xen, a.domid, 4)
    with unchanged(xen):
        assert set_version(a, 1) == (errno.ERANGE, 2)
    assert g.version == 2 and raw_entry(xen, a.domid, 4) == entry


def test_set_version_with_a_mapped_grant_is_ebusy(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid)
    op = map1(b, a.domid, ref)
    entry = raw_entry(xen, a.domid, ref)
    with unchanged(xen):
        assert set_version(a, 2) == (errno.EBUSY, 1)
    assert raw_entry(xen, a.domid, ref) == entry
    assert unmap1(b, op) == abi.GNTST_okay
    assert set_version(a, 2) == (0, 2)


@pytest.mark.parametrize("version", [0, 3, 0xFFFFFFFF])
def test_set_version_bad_version_is_einval(xen: Xen, make_domain: MakeDomain, version: int) -> None:
    a = make_domain()
    with unchanged(xen):
        # gnttab_set_version's "out:" writes the version in force back, errors too.
        assert set_version(a, version) == (errno.EINVAL, 1)


def test_set_version_same_version_is_a_no_op(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    ref, _ = grant(a, b.domid)
    op = map1(b, a.domid, ref)
    with unchanged(xen):
        assert set_version(a, 1) == (0, 1)
    assert flags_of(xen, a.domid, ref) == PERMIT | READING | WRITING
    assert unmap1(b, op) == 0


def test_set_version_2_refused_by_max_ver_1() -> None:
    with xengrant.EmbeddedXen(memory=4 << 20, max_grant_version=1) as xen:
        a = xen.create_domain()
        assert set_version(a, 2) == (errno.ENOSYS, 1)
        assert set_version(a, 1) == (0, 1)


def test_get_version(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain()
    assert a.grant_table.get_version() == 1
    assert a.grant_table.get_version(a.domid) == 1
    assert a.grant_table.set_version(2) == 2
    assert a.grant_table.get_version() == 2
    assert errno_of(lambda: a.grant_table.get_version(999)) == errno.ESRCH


def test_get_status_frames(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain()
    buf = ram(a)[0]

    def status_frames(nr: int) -> int:
        op = abi.gnttab_get_status_frames(nr_frames=nr, dom=abi.DOMID_SELF, frame_list=buf << 12)
        assert a.grant_table_op(abi.GNTTABOP_get_status_frames, op) == 0
        return int(op.status)

    assert status_frames(1) == abi.GNTST_general_error  # v1 has none
    assert status_frames(0) == abi.GNTST_okay
    assert set_version(a, 2) == (0, 2)
    assert status_frames(1) == abi.GNTST_okay
    assert struct.unpack("<Q", read(a, buf, 8)) == (INVALID_GFN,)
    status_idx = abi.XENMAPIDX_grant_table_status
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, status_idx, 0x6100) == 0
    assert status_frames(1) == abi.GNTST_okay
    assert struct.unpack("<Q", read(a, buf, 8)) == (0x6100,)
    assert status_frames(2) == abi.GNTST_general_error


def test_add_to_physmap_status_frame_grows_the_table(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_get_status_frame_mfn grows the table until status frame idx exists."""
    a, small = make_domain(), make_domain(max_grant_frames=8)
    status_idx = abi.XENMAPIDX_grant_table_status
    for dom in (a, small):
        assert set_version(dom, 2) == (0, 2)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, status_idx | 1, 0x6200) == 0
    g = xen.domain_state(a.domid).gt
    assert (g.nr_grant_frames, len(g.status)) == (16, 2)
    with unchanged(xen):
        assert small.hypercalls.add_to_physmap(
            abi.XENMAPSPACE_grant_table, status_idx | 1, 0x6200
        ) == -errno.EINVAL


def test_swap_grant_ref(xen: Xen, make_domain: MakeDomain) -> None:
    a, b, c = make_domain(), make_domain(), make_domain()
    r1, _ = grant(a, b.domid)
    r2, g2 = grant(a, c.domid, writable=False)
    e1, e2 = raw_entry(xen, a.domid, r1), raw_entry(xen, a.domid, r2)
    ops = (abi.gnttab_swap_grant_ref * 5)()
    for op, (x, y) in zip(ops, [(r1, r2), (r1, 512), (0xFFFFFFFF, r1), (r2, r2), (3, r1)]):
        op.ref_a, op.ref_b = x, y
    assert a.grant_table_op(abi.GNTTABOP_swap_grant_ref, ops) == 0
    assert [op.status for op in ops] == [0, abi.GNTST_bad_gntref, abi.GNTST_bad_gntref, 0, 0]
    # Swapped once, then r1 (holding e2) was swapped into ref 3.
    assert raw_entry(xen, a.domid, 3) == e2
    assert raw_entry(xen, a.domid, r2) == e1
    assert raw_entry(xen, a.domid, r1) == bytes(8)
    # c's grant now lives at ref 3.
    op = map1(c, a.domid, 3, HOST | RO)
    assert op.status == abi.GNTST_okay
    assert read(c, op.host_addr >> 12, 8) == read(a, g2, 8)
    with unchanged(xen):
        ops = (abi.gnttab_swap_grant_ref * 2)()
        ops[0].ref_a, ops[0].ref_b = 3, r1
        ops[1].ref_a, ops[1].ref_b = r1, 3
        assert a.grant_table_op(abi.GNTTABOP_swap_grant_ref, ops) == 0
        assert [op.status for op in ops] == [abi.GNTST_eagain] * 2
    assert unmap1(c, op) == 0


@pytest.mark.parametrize("cmd", [abi.GNTTABOP_dump_table, 13, 99, 0xFFF])
def test_removed_and_unknown_commands_are_enosys(
    xen: Xen, make_domain: MakeDomain, cmd: int
) -> None:
    a = make_domain()
    buf = (ctypes.c_uint8 * 64)()
    with unchanged(xen):
        assert errno_of(lambda: a.grant_table_op(cmd, buf, 1)) == errno.ENOSYS


def test_negative_count_is_einval(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain()
    uop = memoryview((abi.gnttab_map_grant_ref * 1)()).cast("B")
    assert a.hypercalls.grant_table_op(abi.GNTTABOP_map_grant_ref, uop, -1) == -errno.EINVAL


def test_table_grows_to_max_then_is_full(xen: Xen, make_domain: MakeDomain) -> None:
    b, small = make_domain(), make_domain(max_grant_frames=2)
    gt = small.grant_table
    frames = xen.free_frames
    refs = gt.get_n_nonblock(1024 - 8)
    assert len(refs) == 1016 and min(refs) == 8 and max(refs) == 1023
    assert _query(small)[:2] == (abi.GNTST_okay, 2)
    assert xen.free_frames == frames - 1
    assert gt.num_free_grants() == 0
    assert gt.get_n_nonblock(1) == []
    assert gt.get_nonblock() is None
    before = snapshot(xen)
    with pytest.raises(GrantTableFull):
        gt.share_pages(b.domid, 1)
    with pytest.raises(GrantTableFull):
        gt.get_n(2000)
    assert snapshot(xen) == before
    gt.put_n(refs[:3])
    assert gt.num_free_grants() == 3
    share = gt.share_pages(b.domid, 2)
    assert len(share.refs) == 2
    share.unshare()
    assert xen.free_frames == before[0]


# ======================================================================= v2
def test_v2_map_sets_the_status_word_not_the_header(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    gt = a.grant_table
    assert gt.set_version(2) == 2
    ref, gfn = grant(a, b.domid, data=b"v2 page")
    assert raw_entry(xen, a.domid, ref) == struct.pack("<HHIQ", PERMIT, b.domid, 0, gfn)
    w = map1(b, a.domid, ref)
    assert w.status == abi.GNTST_okay
    assert w.dev_bus_addr == mfn_of(xen, a.domid, gfn) << 12
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert status_of(xen, a.domid, ref) == READING | WRITING
    assert gt.entry(ref).in_use
    r = map1(b, a.domid, ref, HOST | RO)
    assert read(b, r.host_addr >> 12, 7) == b"v2 page"
    assert unmap1(b, w) == 0
    assert status_of(xen, a.domid, ref) == READING
    # Linux's v2 end of access: clear the header, barrier, check the status.
    with pytest.raises(Busy):
        gt.try_end_access(ref)
    assert flags_of(xen, a.domid, ref) == 0
    assert unmap1(b, r) == 0
    assert status_of(xen, a.domid, ref) == 0
    gt.try_end_access(ref, release_ref=True)
    assert pins(xen, a.domid) == {}


def test_v2_map_failures_leave_the_status_word_clear(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    a, b = pair
    assert a.grant_table.set_version(2) == 2
    ro, _ = grant(a, b.domid, writable=False)
    other, _ = grant(a, a.domid)
    with unchanged(xen):
        ops = map_grants(
            b, [(a.domid, ro, HOST), (a.domid, other, HOST | RO), (a.domid, 256, HOST)]
        )
        assert [op.status for op in ops] == [
            abi.GNTST_general_error,
            abi.GNTST_general_error,
            abi.GNTST_bad_gntref,  # 256 entries per v2 frame
        ]
    assert status_of(xen, a.domid, ro) == status_of(xen, a.domid, other) == 0
