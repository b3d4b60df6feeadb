"""Edges no other test reaches: gfn 0, the default limits, growth that fails,
a map hypercall that fails as a whole, and the text the guest API prints.

Each rule cites the Xen 4.17 function it follows (xen/common/grant_table.c
unless said otherwise).
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

import xengrant
from grant_helpers import (
    HOST,
    MakeDomain,
    Xen,
    active,
    grant,
    in_use,
    map1,
    ram,
    read,
    unmap,
    unmap1,
)
from xengrant import abi
from xengrant.emu.domain import P2M_GNTTAB_SHARED
from xengrant.emu.gnttab_setup import INVALID_GFN
from xengrant.emu.maptrack import DEFAULT_MAX_MAPTRACK_FRAMES, MAPTRACK_PER_PAGE
from xengrant.errors import GrantTableFull, HypercallError
from xengrant.guest.gnttab import GrantEntry, decode_flags
from xengrant.guest.memory import GNTTAB_STATUS_GFN_BASE


def _setup_table(dom: xengrant.Domain, nr_frames: int, frame_list: int) -> int:
    op = abi.gnttab_setup_table(dom=abi.DOMID_SELF, nr_frames=nr_frames, frame_list=frame_list)
    assert dom.grant_table_op(abi.GNTTABOP_setup_table, op) == 0
    return int(op.status)


def _holds(dom: xengrant.Domain, gfn: int) -> bool:
    """Whether ``gfn`` of ``dom`` has a frame behind it (its MMU would not fault)."""
    try:
        dom.view([gfn], False).close()
    except HypercallError as e:
        assert e.errno == errno.EFAULT
        return False
    return True


# ------------------------------------------------------------------ gfn 0
def test_grant_mapped_at_gfn_0_is_released_with_its_dying_mapper(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """gnttab_release_mappings undoes a host mapping wherever it is, gfn 0 too."""
    front, back = make_domain(), make_domain()
    ref, _gfn = grant(front, back.domid, data=b"at zero")
    mop = map1(back, front.domid, ref, HOST, gfn=0)
    assert mop.status == abi.GNTST_okay
    assert read(back, 0, 7) == b"at zero"
    assert active(xen, front.domid) == 1 and in_use(xen, back.domid) == 1
    xen.destroy_domain(back.domid)
    assert active(xen, front.domid) == 0
    assert front.grant_table.entry(ref).flags == abi.GTF_permit_access
    front.grant_table.try_end_access(ref, release_ref=True)


def test_unmap_with_host_addr_0_leaves_the_host_mapping(xen: Xen, make_domain: MakeDomain) -> None:
    """unmap_common: ``op->host_addr && (map->flags & GNTMAP_host_map)`` -- a host_addr
    of 0 names no host mapping, so a grant mapped at gfn 0 stays mapped (status okay,
    handle still live); only the domain's death releases it."""
    front, back = make_domain(), make_domain()
    ref, _gfn = grant(front, back.domid)
    mop = map1(back, front.domid, ref, HOST, gfn=0)
    assert mop.status == abi.GNTST_okay
    assert _holds(back, 0)
    for _ in range(2):
        assert unmap1(back, mop) == abi.GNTST_okay
        assert _holds(back, 0)
        assert active(xen, front.domid) == 1 and in_use(xen, back.domid) == 1
    xen.destroy_domain(back.domid)
    assert active(xen, front.domid) == 0
    front.grant_table.try_end_access(ref, release_ref=True)


def test_table_frame_at_gfn_0_is_listed_and_moved(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_setup_table lists a translated guest's frame where it is (gnttab_shared_gfn):
    gfn 0 is a place like any other, not INVALID_GFN; moving the frame away leaves
    gfn 0 a hole (xenmem_add_to_physmap_one removes the old gfn)."""
    a = make_domain(max_grant_frames=4)
    (buf,) = ram(a)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 1, 0) == 0
    assert _setup_table(a, 2, buf << 12) == abi.GNTST_okay
    # frame 0 was never placed (the guest API would put it at GNTTAB_GFN_BASE)
    assert struct.unpack("<2Q", read(a, buf, 16)) == (INVALID_GFN, 0)
    assert _holds(a, 0)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 1, 0x7100) == 0
    assert not _holds(a, 0)
    assert _setup_table(a, 3, buf << 12) == abi.GNTST_okay
    assert struct.unpack("<3Q", read(a, buf, 24)) == (INVALID_GFN, 0x7100, INVALID_GFN)


def test_status_frame_at_gfn_0_goes_with_v1(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_unpopulate_status_frames: back to v1, the status frame leaves the physmap,
    gfn 0 included."""
    a = make_domain()
    a.grant_table.set_version(2)
    status = abi.XENMAPIDX_grant_table_status
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, status | 0, 0) == 0
    assert _holds(a, 0) and not _holds(a, GNTTAB_STATUS_GFN_BASE)
    a.grant_table.set_version(1)
    assert not _holds(a, 0)


# ----------------------------------------------------------------- limits
def test_default_maptrack_limit_is_1024_frames(xen: Xen, make_domain: MakeDomain) -> None:
    """opt_max_maptrack_frames defaults to 1024 pages of 256 16-byte grant_mappings;
    the toolstack's -1 means that default."""
    assert DEFAULT_MAX_MAPTRACK_FRAMES == 1024 and MAPTRACK_PER_PAGE == 256
    for kw in ({}, {"max_maptrack_frames": -1}, {"max_maptrack_frames": None}):
        d = make_domain(**kw)
        assert xen.domain_state(d.domid).maptrack.limit == 1024 * 256
    d = make_domain(max_maptrack_frames=3)
    assert xen.domain_state(d.domid).maptrack.limit == 3 * 256
    with xengrant.EmbeddedXen(memory=8 << 20, max_maptrack_frames=2) as small:
        assert small.domain_state(small.create_domain().domid).maptrack.limit == 512


def test_maptrack_full_is_no_space_and_the_last_handle_is_kept(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """One maptrack page: 255 handles (the free list keeps its tail sentinel,
    _get_maptrack_handle), then "Failed to obtain maptrack handle" (GNTST_no_space)."""
    front, back = make_domain(), make_domain(max_maptrack_frames=1)
    refs = [grant(front, back.domid)[0] for _ in range(2)]
    mops = [map1(back, front.domid, refs[i % 2]) for i in range(MAPTRACK_PER_PAGE - 1)]
    assert {m.status for m in mops} == {abi.GNTST_okay}
    assert sorted(m.handle for m in mops) == list(range(MAPTRACK_PER_PAGE - 1))
    extra = map1(back, front.domid, refs[0])
    assert extra.status == abi.GNTST_no_space
    assert "Failed to obtain maptrack handle" in back.hypercalls.last_reasons[0]
    assert in_use(xen, back.domid) == MAPTRACK_PER_PAGE - 1
    assert unmap1(back, mops[0]) == abi.GNTST_okay
    again = map1(back, front.domid, refs[0])
    assert again.status == abi.GNTST_okay
    for m in [*mops[1:], again]:
        assert unmap1(back, m) == abi.GNTST_okay
    assert in_use(xen, back.domid) == 0


def test_table_growth_out_of_memory(xen: Xen) -> None:
    """gnttab_setup_table: gnttab_grow_table failing is GNTST_general_error,
    "Expand grant table of %pd to %u failed"; the guest API answers GrantTableFull."""
    with xengrant.EmbeddedXen(memory=1 << 20) as small:
        pv = small.create_domain(pv=True)
        gt = pv.grant_table  # its first frame, mapped
        hvm = small.create_domain()
        hvm_gt = hvm.grant_table
        (buf,) = ram(pv)
        hog = small.create_domain()
        hogged = []  # kept: a dropped Pages gives its frames back
        while True:
            try:
                hogged.append(hog.alloc_pages(1))
            except MemoryError:
                break
        assert small.free_frames == 0
        st = _setup_table(pv, 2, buf << 12)
        assert st == abi.GNTST_general_error
        assert pv.hypercalls.last_reasons == [f"Expand grant table of d{pv.domid} to 2 failed"]
        assert read(pv, buf, 8) == bytes(8)
        assert gt.nr_frames == 1
        n = gt.nr_entries - abi.GNTTAB_NR_RESERVED_ENTRIES
        refs = gt.get_n_nonblock(n)
        assert len(refs) == n
        assert gt.get_nonblock() is None  # cannot grow: no memory
        with pytest.raises(GrantTableFull):
            gt.grant_foreign_access(0, 0x1234)
        gt.put_n(refs)
        # a translated guest grows with add_to_physmap: refused alike (-EINVAL)
        assert hvm.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 1, 0x7600) == (
            -errno.EINVAL
        )
        refs = hvm_gt.get_n_nonblock(n)
        assert len(refs) == n and hvm_gt.nr_frames == 1
        assert hvm_gt.get_nonblock() is None
        assert hvm_gt.get_n_nonblock(1) == []
        hvm_gt.put_n(refs)
        for pages in hogged:
            pages.free()


# ------------------------------------------------------ hypercall failure
def test_map_batch_refused_by_the_hypercall_gives_its_holes_back(
    make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A negative hypercall return (Xen's -EFAULT when it cannot read the ops):
    GrantTable.map_grants raises HypercallError and keeps no hole."""
    front, back = make_domain(), make_domain()
    share = front.grant_table.share_pages(back.domid, 2)
    hc = back.hypercalls
    real = hc.grant_table_op
    seen: list[int] = []

    def refuse(cmd: int, uop: Any, count: int) -> int:
        if cmd == abi.GNTTABOP_map_grant_ref:
            seen.extend(struct.unpack_from("<Q", uop, 32 * i)[0] >> 12 for i in range(count))
            return -errno.EFAULT
        return int(real(cmd, uop, count))

    monkeypatch.setattr(hc, "grant_table_op", refuse)
    with pytest.raises(HypercallError) as ei:
        back.gnttab.map_domain_grant_refs(front.domid, share.refs)
    assert ei.value.errno == errno.EFAULT
    assert len(seen) == 2
    assert back.get_pages(2) == seen  # the same holes, given back
    back.put_pages(seen)
    monkeypatch.setattr(hc, "grant_table_op", real)
    with back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
        assert len(m.mem) == 2 * 4096
    share.unshare()


# ------------------------------------------------------------------- text
@pytest.mark.parametrize(
    ("flags", "text"),
    [
        (0, "invalid"),
        (abi.GTF_permit_access, "permit_access"),
        (abi.GTF_permit_access | abi.GTF_readonly, "permit_access|readonly"),
        (
            abi.GTF_permit_access | abi.GTF_reading | abi.GTF_writing,
            "permit_access|reading|writing",
        ),
        (
            abi.GTF_permit_access | abi.GTF_PWT | abi.GTF_PCD | abi.GTF_PAT | abi.GTF_sub_page,
            "permit_access|PWT|PCD|PAT|sub_page",
        ),
        (abi.GTF_transitive | abi.GTF_reading, "transitive|reading"),
        (abi.GTF_accept_transfer, "accept_transfer"),
        # for accept_transfer bits 2 and 3 are committed/completed, not readonly/reading
        (
            abi.GTF_accept_transfer | abi.GTF_transfer_committed | abi.GTF_transfer_completed,
            "accept_transfer|committed|completed",
        ),
        (abi.GTF_accept_transfer | abi.GTF_writing, "accept_transfer"),
        (abi.GTF_invalid | abi.GTF_reading, "invalid|reading"),
    ],
)
def test_decode_flags(flags: int, text: str) -> None:
    assert decode_flags(flags) == text


def test_busy_names_the_flags(make_domain: MakeDomain) -> None:
    front, back = make_domain(), make_domain()
    share = front.grant_table.share_pages(back.domid, 1, writable=False)
    with back.gnttab.map_grant_ref(front.domid, share.refs[0], writable=False):
        with pytest.raises(xengrant.errors.Busy) as ei:
            share.try_unshare()
        assert "permit_access|readonly|reading" in str(ei.value)
    share.unshare()


def test_grant_entry_properties() -> None:
    e = GrantEntry(9, abi.GTF_permit_access | abi.GTF_writing, 3, 0x1_2345_6789)
    assert (e.type, e.in_use, e.frame, e.page_off, e.length) == (
        abi.GTF_permit_access,
        True,
        0x1_2345_6789,
        0,
        4096,
    )
    assert not GrantEntry(9, abi.GTF_accept_transfer | abi.GTF_readonly, 3, 0).in_use
    assert GrantEntry(9, abi.GTF_transitive, 3, 0).type == abi.GTF_transitive


def test_table_frame_placed_over_ram_frees_the_page(xen: Xen, make_domain: MakeDomain) -> None:
    """xenmem_add_to_physmap_one: a RAM page at the gfn is removed first
    (guest_physmap_remove_page): freed, and no longer counted in tot_pages; a gfn
    holding another domain's grant mapping is refused (-EINVAL)."""
    a = make_domain()
    (gfn,) = ram(a)
    st = xen.domain_state(a.domid)
    pages, free = st.tot_pages, xen.free_frames
    old_mfn = st.p2m[gfn][0]
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 0, gfn) == 0
    assert st.tot_pages == pages - 1
    assert xen.free_frames == free + 1
    assert xen.hv.machine.refcount[old_mfn] == 0
    assert st.p2m[gfn] == (st.gt.shared[0], P2M_GNTTAB_SHARED)
    b = make_domain()
    ref, _ = grant(b, a.domid)
    mop = map1(a, b.domid, ref, HOST, gfn=0x7300)
    assert mop.status == abi.GNTST_okay
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 0, 0x7300) == -errno.EINVAL
    assert unmap1(a, mop) == abi.GNTST_okay


def test_dying_mapper_lingering_as_a_zombie_has_no_handle_left(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """gnttab_release_mappings puts every handle back (put_maptrack_handle), even
    when the domain lingers because others still map what it granted."""
    front, back = make_domain(), make_domain()
    ref, _ = grant(front, back.domid)
    mops = [map1(back, front.domid, ref) for _ in range(3)]
    assert {m.status for m in mops} == {abi.GNTST_okay}
    back_ref, _ = grant(back, front.domid)
    kept = map1(front, back.domid, back_ref)
    assert kept.status == abi.GNTST_okay
    xen.destroy_domain(back.domid)
    zombie = xen.hv.domains[back.domid]
    assert zombie.is_dying
    assert zombie.maptrack.in_use == 0
    assert active(xen, front.domid) == 0
    assert unmap1(front, kept) == abi.GNTST_okay
    assert back.domid not in xen.hv.domains


def test_pin_counters_are_xens() -> None:
    """grant_table.c: four 8-bit counters in act->pin (hstw, hstr, devw, devr)."""
    from xengrant.emu import grant_table as g

    assert (g.GNTPIN_hstw_inc, g.GNTPIN_hstr_inc) == (0x1, 0x100)
    assert (g.GNTPIN_devw_inc, g.GNTPIN_devr_inc) == (0x10000, 0x1000000)
    assert (g.GNTPIN_hstw_mask, g.GNTPIN_hstr_mask) == (0xFF, 0xFF00)
    assert (g.GNTPIN_devw_mask, g.GNTPIN_devr_mask) == (0xFF0000, 0xFF000000)
    # GNTPIN_incr2oflow_mask: the top bit of each counter being incremented
    assert g.GNTPIN_incr2oflow_mask(g.GNTPIN_hstw_inc) == 0x80
    assert g.GNTPIN_incr2oflow_mask(g.GNTPIN_devr_inc | g.GNTPIN_hstr_inc) == 0x80008000


def test_each_kind_of_pin(xen: Xen, make_domain: MakeDomain) -> None:
    """A PV mapper can take all four kinds of pin; each adds its own counter."""
    front, back = make_domain(), make_domain(pv=True)
    ref, _ = grant(front, back.domid)
    kinds = [
        (HOST, 0x1),
        (HOST | abi.GNTMAP_readonly, 0x100),
        (abi.GNTMAP_device_map, 0x10000),
        (abi.GNTMAP_device_map | abi.GNTMAP_readonly, 0x1000000),
    ]
    pin = 0
    mops = []
    for flags, inc in kinds:
        mop = map1(back, front.domid, ref, flags)
        assert mop.status == abi.GNTST_okay, flags
        pin += inc
        assert xen.domain_state(front.domid).gt.active[ref].pin == pin
        mops.append(mop)
    for mop, (flags, inc) in zip(mops, kinds):
        if flags & abi.GNTMAP_device_map:
            assert unmap(back, [(0, mop.handle, mop.dev_bus_addr)]) == [abi.GNTST_okay]
        else:
            assert unmap(back, [(mop.host_addr, mop.handle, 0)]) == [abi.GNTST_okay]
        pin -= inc
        act = xen.domain_state(front.domid).gt.active.get(ref)
        assert (act.pin if act is not None else 0) == pin
    assert active(xen, front.domid) == 0 and in_use(xen, back.domid) == 0


def test_transfer_disabled_is_eopnotsupp(make_domain: MakeDomain) -> None:
    """gnttab=transfer=0 (or Arm): GNTTABOP_transfer answers -EOPNOTSUPP."""
    with xengrant.EmbeddedXen(memory=8 << 20) as x:
        x.hv.grant_transfer = False
        giver = x.create_domain(pv=True)
        ops = (abi.gnttab_transfer * 1)()
        with pytest.raises(HypercallError) as ei:
            giver.grant_table_op(abi.GNTTABOP_transfer, ops)
        assert ei.value.errno == errno.EOPNOTSUPP


# ------------------------------------------------------------ domain set-up
def test_domain_ids_stop_below_the_reserved_ones(xen: Xen) -> None:
    """xen.h: DOMID_FIRST_RESERVED (0x7FF0) and above name no ordinary domain."""
    assert xen.create_domain(0x7FEF).domid == 0x7FEF
    for domid in (0x7FF0, abi.DOMID_SELF, 0xFFFF, -1):
        with pytest.raises(HypercallError) as ei:
            xen.create_domain(domid)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(HypercallError) as ei:
        xen.create_domain(0x7FEF)
    assert ei.value.errno == errno.EEXIST


@pytest.mark.parametrize(
    ("kw", "ok"),
    [
        ({"max_grant_frames": 0}, False),
        ({"max_grant_frames": 1}, True),
        ({"max_maptrack_frames": -2}, False),
        ({"max_maptrack_frames": 0}, True),
    ],
)
def test_createdomain_limits(xen: Xen, kw: dict[str, int], ok: bool) -> None:
    """grant_table_init: at least one grant frame; maptrack frames may be 0 (no maps)."""
    if ok:
        d = xen.create_domain(**kw)
        if kw.get("max_maptrack_frames") == 0:
            assert xen.domain_state(d.domid).maptrack.limit == 0
        return
    with pytest.raises(HypercallError) as ei:
        xen.create_domain(**kw)
    assert ei.value.errno == errno.EINVAL


def test_add_to_physmap_past_max_grant_frames_is_einval(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_get_shared_frame_mfn: idx past max_grant_frames cannot grow the table."""
    a = make_domain(max_grant_frames=3)
    free = xen.free_frames
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 3, 0x7200) == -errno.EINVAL
    assert xen.free_frames == free and not _holds(a, 0x7200)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 2, 0x7200) == 0
    assert xen.free_frames == free - 2  # grown to 3 frames for it
    assert _holds(a, 0x7200)


def test_pv_status_frames_leave_the_physmap_with_v1(xen: Xen, make_domain: MakeDomain) -> None:
    """A PV guest sees its status frames at gfn == mfn; back to v1 they are freed
    and no longer reachable (gnttab_unpopulate_status_frames)."""
    pv = make_domain(pv=True)
    pv.grant_table.set_version(2)
    (status_mfn,) = xen.domain_state(pv.domid).gt.status
    assert _holds(pv, status_mfn)
    pv.grant_table.set_version(1)
    assert not _holds(pv, status_mfn)
    assert status_mfn not in xen.domain_state(pv.domid).p2m


def test_hypercall_count_as_a_signed_int(make_domain: MakeDomain) -> None:
    """do_grant_table_op: "if ( (int)count < 0 ) return -EINVAL" -- 0x80000000 and up
    are negative; 0x7FFFFFFF is a count (then the buffer is too short: -EFAULT)."""
    dom = make_domain()
    buf = memoryview(bytearray(40))
    hc = dom.hypercalls
    assert hc.grant_table_op(abi.GNTTABOP_copy, buf, 0x80000000) == -errno.EINVAL
    assert hc.grant_table_op(abi.GNTTABOP_copy, buf, 0xFFFFFFFF) == -errno.EINVAL
    assert hc.grant_table_op(abi.GNTTABOP_copy, buf, 0x7FFFFFFF) == -errno.EFAULT
    assert hc.grant_table_op(abi.GNTTABOP_copy, buf, 0) == 0


def test_add_to_physmap_is_for_translated_guests_and_grant_frames(
    make_domain: MakeDomain,
) -> None:
    """xenmem_add_to_physmap: a PV guest has no physmap to add to; only
    XENMAPSPACE_grant_table is emulated (-EOPNOTSUPP otherwise)."""
    pv, hvm = make_domain(pv=True), make_domain()
    assert pv.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 0, 0x7000) == (
        -errno.EOPNOTSUPP
    )
    assert hvm.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table + 1, 0, 0x7000) == (
        -errno.EOPNOTSUPP
    )
    assert hvm.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 0, 0x7000) == 0


def test_table_frame_placed_over_another_table_frame(xen: Xen, make_domain: MakeDomain) -> None:
    """The gfn holding frame 0 takes frame 1: frame 0 is nowhere now (INVALID_GFN)."""
    a = make_domain(max_grant_frames=4)
    (buf,) = ram(a)
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 0, 0x7400) == 0
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 1, 0x7400) == 0
    assert _setup_table(a, 2, buf << 12) == abi.GNTST_okay
    assert struct.unpack("<2Q", read(a, buf, 16)) == (INVALID_GFN, 0x7400)
    st = xen.domain_state(a.domid)
    assert st.p2m[0x7400] == (st.gt.shared[1], P2M_GNTTAB_SHARED)
    # frame 0 can be placed again elsewhere
    assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, 0, 0x7401) == 0
    assert _setup_table(a, 2, buf << 12) == abi.GNTST_okay
    assert struct.unpack("<2Q", read(a, buf, 16)) == (0x7401, 0x7400)


def test_setup_table_frame_list_across_a_page_boundary(make_domain: MakeDomain) -> None:
    """copy_to_guest: a frame list that starts 8 bytes before the end of a page
    continues at the start of the next gfn."""
    a = make_domain(max_grant_frames=4)
    (first,) = ram(a)
    # a page in between, so the next gfn's frame is not the next machine frame
    assert a.hypercalls.populate_physmap([first + 0x1000]) == [first + 0x1000]
    (second,) = a.hypercalls.populate_physmap([first + 1])
    p2m = a.hypercalls.xen.domain_state(a.domid).p2m
    assert second == first + 1 and p2m[second][0] != p2m[first][0] + 1
    for idx in range(3):
        assert a.hypercalls.add_to_physmap(abi.XENMAPSPACE_grant_table, idx, 0x7500 + idx) == 0
    assert _setup_table(a, 3, (first << 12) + 4088) == abi.GNTST_okay
    assert read(a, first, 8, 4088) == struct.pack("<Q", 0x7500)
    assert read(a, second, 16) == struct.pack("<2Q", 0x7501, 0x7502)


def test_free_frames_belong_to_nobody(xen: Xen, make_domain: MakeDomain) -> None:
    """A freed frame's owner is -1 (no domain; dom0 is 0)."""
    from xengrant.emu.machine import NO_OWNER

    assert NO_OWNER == -1
    xen.create_domain(0)
    d = make_domain()
    (gfn,) = ram(d)
    mfn = xen.domain_state(d.domid).p2m[gfn][0]
    assert xen.hv.machine.owner[mfn] == d.domid
    d.hypercalls.decrease_reservation([gfn])
    assert xen.hv.machine.owner[mfn] == -1


@pytest.mark.parametrize("getter", ["get_nonblock", "get_n_nonblock", "get", "reap_deferred"])
def test_deferred_ends_are_retried_when_refs_are_taken(
    xen: Xen, make_domain: MakeDomain, getter: str
) -> None:
    """Linux gnttab_end_foreign_access: a busy entry is ended later; here each
    allocation of refs retries the deferred ends first."""
    front, back = make_domain(), make_domain()
    gt = front.grant_table
    page = front.alloc_pages(1)
    ref = gt.grant_foreign_access(back.domid, page.gfns[0])
    m = back.gnttab.map_grant_ref(front.domid, ref)
    assert gt.end_access_deferred(ref) is False
    assert gt.deferred == 1
    m.unmap()
    assert gt.deferred == 1  # nothing retried it yet
    if getter == "get_n_nonblock":
        got = gt.get_n_nonblock(1)
    elif getter == "reap_deferred":
        assert gt.reap_deferred() == 0
        got = []
    else:
        got = [getattr(gt, getter)()]
    assert gt.deferred == 0
    assert gt.entry(ref).flags == 0
    if got:
        assert got == [ref]  # ended and freed first, so handed out again (LIFO)
        gt.put_n(got)
    page.free()


def test_deferred_counts_busy_ends_and_orphaned_memory(xen: Xen, make_domain: MakeDomain) -> None:
    """``deferred`` is both kinds of pending release: a busy end of access, and the
    pages of a share dropped while a numpy array still uses them."""
    import gc

    import numpy as np

    front, back = make_domain(), make_domain()
    gt = front.grant_table
    page = front.alloc_pages(1)
    ref = gt.grant_foreign_access(back.domid, page.gfns[0])
    m = back.gnttab.map_grant_ref(front.domid, ref)
    assert gt.end_access_deferred(ref) is False
    share = gt.share_pages(back.domid, 1)
    arr = np.frombuffer(share.mem, dtype=np.uint8)
    free = xen.free_frames
    with pytest.warns(ResourceWarning):
        del share
        gc.collect()
    assert gt.deferred == 2
    m.unmap()
    assert gt.reap_deferred() == 1  # the end of access; the array still holds the page
    assert xen.free_frames == free
    del arr
    gc.collect()
    assert gt.reap_deferred() == 0
    assert xen.free_frames == free + 1
    page.free()


def test_end_access_deferred_ends_at_once_when_idle(make_domain: MakeDomain) -> None:
    """Idle, the entry ends now: True, the ref freed and the resource released."""
    front, back = make_domain(), make_domain()
    gt = front.grant_table
    page = front.alloc_pages(1)
    ref = gt.grant_foreign_access(back.domid, page.gfns[0])
    free = gt.num_free_grants()
    assert gt.end_access_deferred(ref, page) is True
    assert gt.deferred == 0 and gt.num_free_grants() == free + 1
    assert page.freed


@pytest.mark.parametrize("case", ["not allocated", "reserved", "granted"])
def test_grant_access_transitive_checks_the_ref(make_domain: MakeDomain, case: str) -> None:
    front, back = make_domain(), make_domain()
    gt = front.grant_table
    gt.set_version(2)
    ref = gt.get()
    if case == "not allocated":
        gt.put(ref)
    elif case == "reserved":
        ref = 1
    else:
        gt.grant_access_transitive(ref, back.domid, back.domid, 9)
    before = gt.entry(ref)
    with pytest.raises(ValueError):
        gt.grant_access_transitive(ref, back.domid, back.domid, 10)
    assert gt.entry(ref) == before


@pytest.mark.parametrize("count", [0, -1])
def test_share_pages_of_nothing(xen: Xen, make_domain: MakeDomain, count: int) -> None:
    front, back = make_domain(), make_domain()
    free = xen.free_frames
    with pytest.raises(ValueError, match="share_pages: count must be >= 1"):
        front.grant_table.share_pages(back.domid, count)
    assert xen.free_frames == free


def test_table_ops_succeeding_return_0_and_log_nothing(xen: Xen, make_domain: MakeDomain) -> None:
    """do_grant_table_op returns 0 for a set_version that worked, and Xen prints no
    reason for an op that succeeded (gdprintk only on the error paths)."""
    a = make_domain(max_grant_frames=4)
    (buf,) = ram(a)
    count = xen.log_count
    assert a.grant_table_op(abi.GNTTABOP_set_version, abi.gnttab_set_version(version=2)) == 0
    assert a.grant_table_op(abi.GNTTABOP_set_version, abi.gnttab_set_version(version=1)) == 0
    # asking for the version in force changes nothing and is no error either
    assert a.grant_table_op(abi.GNTTABOP_set_version, abi.gnttab_set_version(version=1)) == 0
    assert _setup_table(a, 2, buf << 12) == abi.GNTST_okay
    assert a.hypercalls.last_reasons == []
    assert xen.log_count == count
    assert _setup_table(a, 5, buf << 12) == abi.GNTST_general_error
    assert xen.log_count == count + 1


def test_p2m_types_match_the_c_runs() -> None:
    """_cext.h hard-codes the p2m type numbers the C runs write and check (XG_P2M_*)."""
    import re
    from pathlib import Path

    from xengrant.emu import domain

    here = [Path(xengrant.__file__).parent / "_cext.h",
            Path(__file__).resolve().parent.parent / "src" / "xengrant" / "_cext.h"]
    found = [c for c in here if c.exists()]
    if not found:  # an installed wheel ships no C sources, and the sdist's test run drops src/
        pytest.skip("_cext.h is not here: the package was installed without its C source")
    src = "".join(c.read_text() for c in sorted(found[0].parent.glob("*.[ch]")))
    defines = re.findall(r"#define XG_(P2M_\w+) (\d+)\n", src)
    assert len(defines) == len(dict(defines)), "one definition of each, in one place"
    names = ["P2M_RAM_RW", "P2M_GRANT_MAP_RW", "P2M_GRANT_MAP_RO"]
    names += ["P2M_GNTTAB_SHARED", "P2M_GNTTAB_STATUS"]
    for name in names:
        assert getattr(domain, name) == int(dict(defines)[name]), name
    assert len({getattr(domain, name) for name in names}) == 5


def test_maptrack_lookup_of_handles_never_handed_out() -> None:
    from xengrant.emu.maptrack import Maptrack

    mt = Maptrack(1)
    assert mt.lookup(0) is None and mt.lookup(-1) is None
    placeholder = object()
    h = mt.get(placeholder)  # type: ignore[arg-type]
    assert h == 0 and mt.lookup(0) is placeholder
    assert mt.lookup(len(mt.entries)) is None
    assert mt.lookup(1 << 40) is None


def test_fastpath_default_follows_the_environment() -> None:
    """XENGRANT_FASTPATH=0 starts the C runs off, and the service client's C paths
    (frontring.C_PATHS); anything else (or nothing) on."""
    import os
    import subprocess
    import sys

    code = (
        "from xengrant.emu import batch, gnttab_copy, gnttab_map as m; "
        "from xengrant.service import frontring; "
        "print(batch.FASTPATH_DEFAULT, m.FASTPATH, gnttab_copy.FASTPATH, frontring.C_PATHS)"
    )
    cases = (("0", "False False False False"), ("1", "True True True True"),
             (None, "True True True True"))
    for value, want in cases:
        env = {k: v for k, v in os.environ.items() if k != "XENGRANT_FASTPATH"}
        if value is not None:
            env["XENGRANT_FASTPATH"] = value
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert out.stdout.strip() == want


def test_grant_access_asks_a_service_backing_first(make_domain: MakeDomain) -> None:
    """A domain process of the service prepares the page (a file of its own) before
    the entry is written; -EINVAL (not its RAM) lets Xen refuse the grant itself."""
    front, back = make_domain(), make_domain()
    gt = front.grant_table
    calls: list[tuple[list[int], int]] = []
    answer: list[int] = [0]

    def prepare_grant(gfns: list[int], domid: int) -> None:
        calls.append((list(gfns), domid))
        if answer[0]:
            raise HypercallError("prepare_grant", answer[0])

    front.hypercalls.prepare_grant = prepare_grant  # type: ignore[attr-defined]
    page = front.alloc_pages(2)
    ref = gt.get()
    gt.grant_access(ref, back.domid, page.gfns[0])
    assert calls == [([page.gfns[0]], back.domid)]
    assert gt.entry(ref).flags == abi.GTF_permit_access
    answer[0] = errno.EINVAL
    ref2 = gt.get()
    gt.grant_access(ref2, back.domid, page.gfns[1])
    assert gt.entry(ref2).domid == back.domid
    answer[0] = errno.ENOMEM
    ref3 = gt.get()
    with pytest.raises(HypercallError):
        gt.grant_access(ref3, back.domid, page.gfns[1])
    assert gt.entry(ref3).flags == 0


def test_one_page_written_through_a_read_only_mapping_faults(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """p2m_grant_map_ro: the guest's MMU refuses a writable view of that one page."""
    front, back = make_domain(), make_domain()
    ref, _ = grant(front, back.domid, writable=False)
    mop = map1(back, front.domid, ref, HOST | abi.GNTMAP_readonly)
    assert mop.status == abi.GNTST_okay
    gfn = mop.host_addr >> 12
    with pytest.raises(HypercallError) as ei:
        back.view([gfn], True)
    assert ei.value.errno == errno.EFAULT
    back.view([gfn], False).close()
    assert unmap1(back, mop) == abi.GNTST_okay
