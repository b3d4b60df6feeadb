"""Zephyr's gnttab API (drivers/xen/gnttab.c) on ``Domain`` and ``Domain.grant_table``.

One group per function of the seed document (zephyr-gnttab-api.txt):
``gnttab_grant_access``, ``gnttab_end_access``, ``gnttab_alloc_and_grant``,
``gnttab_get_pages``, ``gnttab_put_pages``, ``gnttab_map_refs``,
``gnttab_unmap_refs``, ``gnttabop_error``.

Zephyr's stored ``gnttab_end_access`` frees the ref when the peer still uses
it and keeps it on success (an inverted test); here the ref is freed on
success only.  Map and unmap take the same ctypes arrays of
``struct gnttab_map_grant_ref`` / ``gnttab_unmap_grant_ref`` a Zephyr caller
prepares, and every entry gets the ``GNTST_*`` code Xen 4.17 writes.
"""

from __future__ import annotations

from typing import Any

import pytest

import xengrant
from grant_helpers import Dom, MakeDomain, Xen, flags, in_use, read
from xengrant import abi
from xengrant.emu.domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW
from xengrant.errors import Busy, GrantError, GrantTableFull

PAGE = 4096
RESERVED = abi.GNTTAB_NR_RESERVED_ENTRIES
ONE_FRAME_REFS = abi.GRANT_PER_PAGE_V1 - RESERVED
PERMIT = abi.GTF_permit_access
RO = abi.GTF_readonly
INUSE = abi.GTF_reading | abi.GTF_writing
HOST = abi.GNTMAP_host_map
#: what a caller leaves in handle/dev_bus_addr before the call
SENTINEL_HANDLE = 0xFFFFFFFF
SENTINEL_DBA = 0xAB


def map_ops(specs: list[tuple[int, int, int, int]]) -> Any:
    """A prepared ``gnttab_map_grant_ref`` array: (gfn, flags, dom, ref) each."""
    ops = (abi.gnttab_map_grant_ref * len(specs))()
    for op, (gfn, fl, dom, ref) in zip(ops, specs):
        op.host_addr, op.flags, op.dom, op.ref = gfn << 12, fl, dom, ref
        op.handle, op.dev_bus_addr = SENTINEL_HANDLE, SENTINEL_DBA
    return ops


def unmap_ops(specs: list[tuple[int, int]]) -> Any:
    """A prepared ``gnttab_unmap_grant_ref`` array: (gfn, handle) each."""
    ops = (abi.gnttab_unmap_grant_ref * len(specs))()
    for op, (gfn, handle) in zip(ops, specs):
        op.host_addr, op.dev_bus_addr, op.handle = gfn << 12, 0, handle
    return ops


# --------------------------------------------------------- gnttab_grant_access
def test_grant_access_returns_a_ref(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page = front.alloc_pages(1)
    page.mem[:6] = b"zephyr"
    gfn = page.gfns[0]
    ref = table.grant_foreign_access(back.domid, gfn, readonly=False)
    assert ref >= RESERVED
    e = table.entry(ref)
    assert (e.flags, e.domid, e.frame) == (PERMIT, back.domid, gfn)
    (hole,) = back.get_pages(1)
    ops = map_ops([(hole, HOST, front.domid, ref)])
    assert back.grant_table.map_refs(ops) == 0
    assert ops[0].status == abi.GNTST_okay
    assert read(back, hole, 6) == b"zephyr"
    assert back.grant_table.unmap_refs(unmap_ops([(hole, ops[0].handle)])) == 0
    back.put_pages([hole])
    table.try_end_access(ref, release_ref=True)
    page.free()
    assert in_use(xen, back.domid) == 0


def test_grant_access_readonly(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    page = front.alloc_pages(1)
    ref = front.grant_table.grant_foreign_access(back.domid, page.gfns[0], readonly=True)
    assert flags(front, ref) == PERMIT | RO
    holes = back.get_pages(2)
    ops = map_ops(
        [
            (holes[0], HOST, front.domid, ref),
            (holes[1], HOST | abi.GNTMAP_readonly, front.domid, ref),
        ]
    )
    back.grant_table.map_refs(ops)
    # _set_status_v1: "Attempt to write-pin a r/o grant entry"
    assert [ops[0].status, ops[1].status] == [abi.GNTST_general_error, abi.GNTST_okay]
    assert flags(front, ref) == PERMIT | RO | abi.GTF_reading
    back.grant_table.unmap_refs(unmap_ops([(holes[1], ops[1].handle)]))
    front.grant_table.try_end_access(ref, release_ref=True)
    back.put_pages(holes)
    page.free()


def test_grant_access_on_a_full_table(xen: Xen, make_domain: MakeDomain) -> None:
    # Zephyr's get_free_entry waits forever on its semaphore; here it raises.
    dom = make_domain(max_grant_frames=1)
    table = dom.grant_table
    held = table.get_n(ONE_FRAME_REFS)
    with pytest.raises(GrantTableFull):
        table.grant_foreign_access(0, 0x100)
    assert table.num_free_grants() == 0
    table.put_n(held)


# ----------------------------------------------------------- gnttab_end_access
def test_end_access_frees_the_ref_on_success(make_domain: MakeDomain) -> None:
    dom = make_domain(max_grant_frames=1)
    table = dom.grant_table
    ref = table.grant_foreign_access(0, 0x100)
    assert table.num_free_grants() == ONE_FRAME_REFS - 1
    table.try_end_access(ref, release_ref=True)
    assert flags(dom, ref) == 0
    assert table.num_free_grants() == ONE_FRAME_REFS
    assert table.get() == ref  # back on the free list


def test_end_access_keeps_a_busy_ref(xen: Xen, make_domain: MakeDomain) -> None:
    # The stored Zephyr copy inverts `if (!rc)`: a busy ref goes back on the
    # free list while the peer still maps the page.  Not copied here.
    front, back = make_domain(max_grant_frames=1), make_domain()
    table = front.grant_table
    page = front.alloc_pages(1)
    ref = table.grant_foreign_access(back.domid, page.gfns[0])
    m = back.gnttab.map_grant_ref(front.domid, ref)
    with pytest.raises(Busy) as ei:
        table.try_end_access(ref, release_ref=True)
    assert ei.value.refs == [ref]
    assert flags(front, ref) == PERMIT | INUSE  # still granted, still mapped
    assert table.num_free_grants() == ONE_FRAME_REFS - 1
    rest = table.get_n_nonblock(ONE_FRAME_REFS - 1)
    assert ref not in rest  # the live ref cannot be handed out again
    assert table.get_nonblock() is None
    m.unmap()
    table.try_end_access(ref, release_ref=True)
    assert table.get_nonblock() == ref
    table.put(ref)
    table.put_n(rest)
    page.free()
    assert in_use(xen, back.domid) == 0


# ------------------------------------------------------ gnttab_alloc_and_grant
def test_alloc_and_grant_defaults_to_domain_0(xen: Xen, make_domain: MakeDomain) -> None:
    dom0 = make_domain(0)
    front = make_domain()
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.alloc_and_grant()
    assert share.domid == 0 and len(share.refs) == 1 and len(share.mem) == PAGE
    ref = share.refs[0]
    assert (table.entry(ref).flags, table.entry(ref).domid) == (PERMIT, 0)
    assert xen.free_frames == frames - 1
    share.mem[:5] = b"dom0!"
    with dom0.gnttab.map_grant_ref(front.domid, ref) as m:
        assert bytes(m.mem[:5]) == b"dom0!"
        m.mem[5:6] = b"?"
    assert bytes(share.mem[:6]) == b"dom0!?"
    share.unshare()  # Zephyr: gnttab_end_access, then k_free
    assert xen.free_frames == frames and table.num_free_grants() == free
    assert in_use(xen, 0) == 0


def test_alloc_and_grant_readonly_and_other_domain(make_domain: MakeDomain) -> None:
    dom0 = make_domain(0)
    front, back = make_domain(), make_domain()
    ro = front.grant_table.alloc_and_grant(readonly=True)
    assert flags(front, ro.refs[0]) == PERMIT | RO
    with pytest.raises(GrantError) as ei:
        dom0.gnttab.map_grant_ref(front.domid, ro.refs[0], writable=True)
    assert ei.value.status == abi.GNTST_general_error
    dom0.gnttab.map_grant_ref(front.domid, ro.refs[0], writable=False).unmap()
    # Zephyr hard-codes domain 0; here the domain is a parameter
    to_back = front.grant_table.alloc_and_grant(back.domid)
    assert front.grant_table.entry(to_back.refs[0]).domid == back.domid
    with pytest.raises(GrantError) as ei:
        dom0.gnttab.map_grant_ref(front.domid, to_back.refs[0])
    assert ei.value.status == abi.GNTST_general_error  # granted to someone else
    ro.unshare()
    to_back.unshare()


def test_alloc_and_grant_out_of_memory(xen: Xen, make_domain: MakeDomain) -> None:
    # Zephyr: -ENOMEM when k_aligned_alloc fails; here MemoryError, no ref kept.
    dom = make_domain(max_pages=1)
    table = dom.grant_table
    held = dom.alloc_pages(1)
    frames, free = xen.free_frames, table.num_free_grants()
    with pytest.raises(MemoryError):
        table.alloc_and_grant()
    assert xen.free_frames == frames and table.num_free_grants() == free
    held.free()
    share = table.alloc_and_grant()
    share.unshare()
    assert table.num_free_grants() == free


def test_alloc_and_grant_table_full(xen: Xen, make_domain: MakeDomain) -> None:
    dom = make_domain(max_grant_frames=1)
    table = dom.grant_table
    held = table.get_n(ONE_FRAME_REFS)
    frames = xen.free_frames
    with pytest.raises(GrantTableFull):
        table.alloc_and_grant()
    assert xen.free_frames == frames  # the page was given back
    table.put_n(held)


# ---------------------------------------------- gnttab_get_pages/put_pages
def test_get_pages_are_unpopulated_holes(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    frames = xen.free_frames
    holes = back.get_pages(4)
    assert holes == list(range(holes[0], holes[0] + 4))  # one contiguous range
    p2m = xen.domain_state(back.domid).p2m
    assert not any(g in p2m for g in holes)
    assert xen.free_frames == frames  # no memory behind them
    page = front.alloc_pages(1)
    ref = front.grant_table.grant_foreign_access(back.domid, page.gfns[0])
    ops = map_ops([(holes[2], HOST, front.domid, ref)])
    back.grant_table.map_refs(ops)
    assert ops[0].status == abi.GNTST_okay
    mfn, kind = p2m[holes[2]]
    assert kind == P2M_GRANT_MAP_RW
    assert mfn == xen.domain_state(front.domid).p2m[page.gfns[0]][0]
    back.grant_table.unmap_refs(unmap_ops([(holes[2], ops[0].handle)]))
    assert holes[2] not in p2m
    back.put_pages(holes)
    assert back.get_pages(4) == holes  # the same range comes back
    with pytest.raises(ValueError):
        back.get_pages(0)
    front.grant_table.try_end_access(ref, release_ref=True)
    page.free()


def test_map_onto_ram_is_refused(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    # host_addr must come from get_pages: over a populated gfn the emulator
    # refuses (Xen would drop the RAM page; documented deviation).
    front, back = pair
    page = front.alloc_pages(1)
    ref = front.grant_table.grant_foreign_access(back.domid, page.gfns[0])
    ram = back.alloc_pages(1)
    ops = map_ops([(ram.gfns[0], HOST, front.domid, ref)])
    back.grant_table.map_refs(ops)
    assert ops[0].status == abi.GNTST_general_error
    assert in_use(xen, back.domid) == 0 and flags(front, ref) == PERMIT
    ram.free()
    page.free()


# --------------------------------------------------- gnttab_map/unmap_refs
def test_map_refs_mixed_batch(xen: Xen, make_domain: MakeDomain) -> None:
    front, back, other = make_domain(), make_domain(), make_domain()
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    pages = front.alloc_pages(3)
    pages.mem[:2] = b"rw"
    pages.mem[PAGE : PAGE + 2] = b"ro"
    r_rw = table.grant_foreign_access(back.domid, pages.gfns[0])
    r_ro = table.grant_foreign_access(back.domid, pages.gfns[1], readonly=True)
    r_other = table.grant_foreign_access(other.domid, pages.gfns[2])
    r_unused = table.get()  # allocated but never granted
    holes = back.get_pages(8)
    specs = [
        (holes[0], HOST, front.domid, r_rw),
        (holes[1], HOST, front.domid, r_unused),
        (holes[2], HOST, front.domid, 5000),  # past the table's 512 entries
        (holes[3], HOST, 999, r_rw),  # no such domain
        (holes[4], HOST, front.domid, r_ro),  # write-pin of a r/o grant
        (holes[5], HOST | abi.GNTMAP_readonly, front.domid, r_ro),
        (holes[6], 0, front.domid, r_rw),  # neither host_map nor device_map
        (holes[7], HOST, front.domid, r_other),  # granted to another domain
    ]
    ops = map_ops(specs)
    assert back.grant_table.map_refs(ops) == 0  # per-entry statuses
    ok = abi.GNTST_okay
    assert [ops[i].status for i in range(8)] == [
        ok,
        abi.GNTST_general_error,  # "Bad flags (0) or dom (0)"
        abi.GNTST_bad_gntref,  # "Bad ref"
        abi.GNTST_bad_domain,
        abi.GNTST_general_error,
        ok,
        abi.GNTST_bad_gntref,  # "Bad flags in grant map op"
        abi.GNTST_general_error,
    ]
    good = (0, 5)
    for i in range(8):
        if i in good:
            assert ops[i].handle != SENTINEL_HANDLE
            mfn = xen.domain_state(back.domid).p2m[holes[i]][0]
            assert ops[i].dev_bus_addr == mfn << 12
        else:  # a failed op leaves handle and dev_bus_addr as passed
            assert (ops[i].handle, ops[i].dev_bus_addr) == (SENTINEL_HANDLE, SENTINEL_DBA)
            assert holes[i] not in xen.domain_state(back.domid).p2m
    assert ops[0].handle != ops[5].handle
    assert in_use(xen, back.domid) == 2
    p2m = xen.domain_state(back.domid).p2m
    assert (p2m[holes[0]][1], p2m[holes[5]][1]) == (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO)
    assert read(back, holes[0], 2) == b"rw" and read(back, holes[5], 2) == b"ro"
    assert flags(front, r_rw) == PERMIT | INUSE
    assert flags(front, r_ro) == PERMIT | RO | abi.GTF_reading
    assert flags(front, r_other) == PERMIT and flags(front, r_unused) == 0

    # unmap, mixed: a wrong host_addr, a handle past the maptrack limit, a good one
    h_rw, h_ro = ops[0].handle, ops[5].handle
    un = unmap_ops([(holes[1], h_rw), (holes[0], 0xFFFF), (holes[5], h_ro)])
    assert back.grant_table.unmap_refs(un) == 0
    # replace_grant_p2m_mapping: "old mapping invalid" -> general_error
    assert [un[i].status for i in range(3)] == [
        abi.GNTST_general_error,
        abi.GNTST_bad_handle,
        abi.GNTST_okay,
    ]
    assert in_use(xen, back.domid) == 1  # the rw mapping is still there
    assert flags(front, r_rw) == PERMIT | INUSE
    assert flags(front, r_ro) == PERMIT | RO
    un = unmap_ops([(holes[0], h_rw), (holes[5], h_ro)])
    back.grant_table.unmap_refs(un)
    assert [un[0].status, un[1].status] == [abi.GNTST_okay, abi.GNTST_bad_handle]  # stale
    assert in_use(xen, back.domid) == 0
    assert not any(h in xen.domain_state(back.domid).p2m for h in holes)
    back.put_pages(holes)
    for ref in (r_rw, r_ro, r_other):
        table.try_end_access(ref, release_ref=True)
    table.put(r_unused)
    pages.free()
    assert xen.free_frames == frames and table.num_free_grants() == free
    assert xen.domain_state(front.domid).gt.active == {}


def test_map_refs_count_argument(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    # gnttab_map_refs(map_ops, count): only the first `count` ops are issued.
    front, back = pair
    page = front.alloc_pages(1)
    ref = front.grant_table.grant_foreign_access(back.domid, page.gfns[0])
    holes = back.get_pages(2)
    ops = map_ops([(holes[0], HOST, front.domid, ref), (holes[1], HOST, front.domid, ref)])
    ops[1].status = 7  # untouched by the call
    back.grant_table.map_refs(ops, 1)
    assert (ops[0].status, ops[1].status, ops[1].handle) == (0, 7, SENTINEL_HANDLE)
    assert in_use(xen, back.domid) == 1
    back.grant_table.unmap_refs(unmap_ops([(holes[0], ops[0].handle)]), 1)
    assert in_use(xen, back.domid) == 0
    front.grant_table.try_end_access(ref, release_ref=True)
    back.put_pages(holes)
    page.free()


# -------------------------------------------------------------- gnttabop_error
#: xen/include/public/grant_table.h GNTTABOP_error_msgs, by GNTST code
XEN_MESSAGES = {
    abi.GNTST_okay: "okay",
    abi.GNTST_general_error: "undefined error",
    abi.GNTST_bad_domain: "unrecognised domain id",
    abi.GNTST_bad_gntref: "invalid grant reference",
    abi.GNTST_bad_handle: "invalid mapping handle",
    abi.GNTST_bad_virt_addr: "invalid virtual address",
    abi.GNTST_bad_dev_addr: "invalid device address",
    abi.GNTST_no_device_space: "no spare translation slot in the I/O MMU",
    abi.GNTST_permission_denied: "permission denied",
    abi.GNTST_bad_page: "bad page",
    abi.GNTST_bad_copy_arg: "copy arguments cross page boundary",
    abi.GNTST_address_too_big: "page address size too large",
    abi.GNTST_eagain: "operation not done; try again",
    abi.GNTST_no_space: "out of space",
}


def test_gnttabop_error_every_code() -> None:
    assert sorted(XEN_MESSAGES) == list(range(-13, 1))
    for status, text in XEN_MESSAGES.items():
        assert xengrant.gnttabop_error(status) == text
        assert abi.gnttabop_error(status) == text
        if status:
            err = GrantError("map_grant_ref", status)
            assert err.message == text and err.status == status
            assert abi.GNTST_NAMES[status] in str(err)


@pytest.mark.parametrize("status", [1, 100, -14, -100, -32768, 32767])
def test_gnttabop_error_unknown_codes(status: int) -> None:
    # Zephyr answers "bad status"; here the text names the code.
    text = xengrant.gnttabop_error(status)
    assert "unknown" in text and str(status) in text
    assert GrantError("copy", status).message == text


def test_gnttabop_error_of_a_real_failure(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    (hole,) = back.get_pages(1)
    ops = map_ops([(hole, HOST, front.domid, 5000)])
    back.grant_table.map_refs(ops)
    assert xengrant.gnttabop_error(ops[0].status) == "invalid grant reference"
    back.put_pages([hole])
