"""v2 grant tables through the guest API, and what ``set_version`` leaves behind.

Xen 4.17 (grant_table.c): a v2 entry is a 16-byte header plus a 64-bit frame
(``grant_entry_v2_t``), its GTF_reading/GTF_writing live in a separate status
word (``_set_status_v2`` sets them, ``gnttab_clear_flags`` clears them), and
``gnttab_swap_grant_ref`` swaps the status words with the entries.  Linux's
``gnttab_end_foreign_access_ref_v2`` ends access by clearing the header, a
full barrier, then reading the status word.
"""

from __future__ import annotations

import pytest

import xengrant
from grant_helpers import PAGE, MakeDomain, Xen, active, in_use, ram, read, status_of
from xengrant import abi
from xengrant.errors import Busy, GrantError
from xengrant.guest.memory import GNTTAB_STATUS_GFN_BASE

INUSE = abi.GTF_reading | abi.GTF_writing


def v2_pair(make_domain: MakeDomain) -> tuple[xengrant.Domain, xengrant.Domain]:
    front, back = make_domain(), make_domain()
    assert front.grant_table.set_version(2) == 2
    return front, back


# ------------------------------------------------------------ share / map
def test_share_pages_on_v2_maps_and_unshares(xen: Xen, make_domain: MakeDomain) -> None:
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    free0 = gt.num_free_grants()
    share = gt.share_pages(back.domid, 2)
    assert gt.num_free_grants() == free0 - 2
    for ref, gfn in zip(share.refs, share.resource.gfns):
        e = gt.entry(ref)
        # grant_entry_v2.full_page: the 64-bit frame at offset 8 (GrantEntry.frame)
        assert (e.flags, e.domid, e.frame) == (abi.GTF_permit_access, back.domid, gfn)
        assert (e.page_off, e.length) == (0, PAGE)
    share.mem[:6] = b"v2 map"
    with back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
        assert bytes(m.mem[:6]) == b"v2 map"
        m.mem[PAGE : PAGE + 4] = b"back"
        assert bytes(share.mem[PAGE : PAGE + 4]) == b"back"
        for ref in share.refs:
            # _set_status_v2: reading|writing in the status word, the header untouched
            assert status_of(xen, front.domid, ref) == INUSE
            assert gt.entry(ref).flags == abi.GTF_permit_access | INUSE
            assert gt.entry(ref).in_use
        with pytest.raises(Busy):
            share.try_unshare()
        assert active(xen, front.domid) == 2
    # gnttab_clear_flags cleared the status words on the unmap
    assert [status_of(xen, front.domid, r) for r in share.refs] == [0, 0]
    refs = list(share.refs)
    share.unshare()
    assert [gt.entry(r).flags for r in refs] == [0, 0]
    assert gt.num_free_grants() == free0
    assert active(xen, front.domid) == 0
    assert in_use(xen, back.domid) == 0


def test_read_only_share_on_v2(xen: Xen, make_domain: MakeDomain) -> None:
    front, back = v2_pair(make_domain)
    share = front.grant_table.share_pages(back.domid, 1, writable=False)
    ref = share.refs[0]
    assert front.grant_table.entry(ref).flags == abi.GTF_permit_access | abi.GTF_readonly
    # _set_status_v2: "Attempt to write-pin a r/o grant entry", nothing left set
    with pytest.raises(GrantError) as ei:
        back.gnttab.map_grant_ref(front.domid, ref)
    assert ei.value.status == abi.GNTST_general_error
    assert "r/o" in str(ei.value)
    assert status_of(xen, front.domid, ref) == 0
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
        assert status_of(xen, front.domid, ref) == abi.GTF_reading
    assert status_of(xen, front.domid, ref) == 0
    share.unshare()


def test_map_pins_a_v2_entry_granted_to_another(xen: Xen, make_domain: MakeDomain) -> None:
    """_set_status_v2 checks the header's domid: a bystander cannot map it."""
    front, back = v2_pair(make_domain)
    other = make_domain()
    share = front.grant_table.share_pages(back.domid, 1)
    with pytest.raises(GrantError) as ei:
        other.gnttab.map_grant_ref(front.domid, share.refs[0])
    assert ei.value.status == abi.GNTST_general_error
    # refused by the first check, before any status bit is set (not by the re-check)
    assert "Bad flags" in str(ei.value) and "Unstable" not in str(ei.value)
    assert status_of(xen, front.domid, share.refs[0]) == 0
    share.unshare()


# ------------------------------------------------------------------ swap
def _swap(dom: xengrant.Domain, a: int, b: int) -> int:
    ops = (abi.gnttab_swap_grant_ref * 1)()
    ops[0].ref_a, ops[0].ref_b = a, b
    assert dom.grant_table_op(abi.GNTTABOP_swap_grant_ref, ops) == 0
    return int(ops[0].status)


def test_swap_grant_ref_on_v2_swaps_the_status_words(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_swap_grant_ref (v2): entries and status words change places."""
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    pages = front.alloc_pages(2)
    a, b = gt.get_n(2)
    gt.grant_access(a, back.domid, pages.gfns[0])
    gt.grant_access_subpage(b, back.domid + 1, pages.gfns[1], 100, 200, writable=False)
    # The status frames are the guest's own RAM: it may scribble a stale bit in.
    view = front.view([GNTTAB_STATUS_GFN_BASE], True)
    with memoryview(view) as mv:
        mv[2 * b : 2 * b + 2] = abi.GTF_reading.to_bytes(2, "little")
    view.close()
    assert _swap(front, a, b) == abi.GNTST_okay
    ea, eb = gt.entry(a), gt.entry(b)
    assert (ea.domid, ea.frame, ea.page_off, ea.length) == (back.domid + 1, pages.gfns[1], 100, 200)
    assert ea.flags == abi.GTF_permit_access | abi.GTF_sub_page | abi.GTF_readonly | abi.GTF_reading
    assert (eb.domid, eb.frame, eb.flags) == (back.domid, pages.gfns[0], abi.GTF_permit_access)
    assert status_of(xen, front.domid, a) == abi.GTF_reading
    assert status_of(xen, front.domid, b) == 0
    # swapping back restores both
    assert _swap(front, b, a) == abi.GNTST_okay
    assert status_of(xen, front.domid, b) == abi.GTF_reading
    assert status_of(xen, front.domid, a) == 0
    assert gt.entry(a).frame == pages.gfns[0]


def test_swap_of_a_mapped_v2_entry_is_eagain(xen: Xen, make_domain: MakeDomain) -> None:
    front, back = v2_pair(make_domain)
    share = front.grant_table.share_pages(back.domid, 2)
    a, b = share.refs
    with back.gnttab.map_grant_ref(front.domid, a):
        assert _swap(front, a, b) == abi.GNTST_eagain
        assert _swap(front, b, a) == abi.GNTST_eagain
        assert status_of(xen, front.domid, a) == INUSE
        assert status_of(xen, front.domid, b) == 0
    assert _swap(front, a, b) == abi.GNTST_okay
    share.unshare()


# ----------------------------------------------------------- set_version
def test_set_version_keeps_refs_in_use_and_hands_out_the_rest(make_domain: MakeDomain) -> None:
    """Xen zeroes every entry past the reserved ones; the guest keeps its free list's
    meaning: refs it holds stay held, the others are handed out lowest first."""
    (dom,) = (make_domain(),)
    gt = dom.grant_table
    mx = gt.max_nr_frames
    assert gt.num_free_grants() == mx * abi.GRANT_PER_PAGE_V1 - 8
    held = gt.get_n(3)
    assert held == [8, 9, 10]
    gt.put(9)
    assert gt.num_free_grants() == mx * abi.GRANT_PER_PAGE_V1 - 8 - 2
    assert gt.set_version(2) == 2
    assert gt.version == 2 and gt.per_frame == abi.GRANT_PER_PAGE_V2
    assert gt.num_free_grants() == mx * abi.GRANT_PER_PAGE_V2 - 8 - 2
    assert gt.get_version() == 2
    # refs 8 and 10 are still ours: granting and putting them works, 9 comes out first
    assert gt.get_nonblock() == 9
    assert gt.get_nonblock() == 11
    gt.put_n([8, 9, 10, 11])
    with pytest.raises(ValueError, match="double put"):
        gt.put(10)
    with pytest.raises(ValueError, match="reserved"):
        gt.put(7)
    assert gt.num_free_grants() == mx * abi.GRANT_PER_PAGE_V2 - 8
    # back to v1: 512 entries a frame again, the held ref still held
    ref = gt.get()
    assert ref == 11  # the free list is LIFO: the last put first
    assert gt.set_version(1) == 1
    assert gt.num_free_grants() == mx * abi.GRANT_PER_PAGE_V1 - 8 - 1
    assert gt.get_nonblock() == 8  # rebuilt: lowest first, 11 still held
    gt.put_n([8, 11])
    assert gt.num_free_grants() == mx * abi.GRANT_PER_PAGE_V1 - 8


def test_set_version_drops_refs_past_the_smaller_table(make_domain: MakeDomain) -> None:
    """One v1 frame holds refs 0-511, one v2 frame 0-255: a ref past 255 is gone
    from the table under v2 (outside it), and the table grows for more."""
    dom = make_domain()
    gt = dom.grant_table
    refs = gt.get_n(300)
    assert refs[-1] == 307 and gt.nr_frames == 1
    gt.put_n(refs[:200])  # keep 208..307
    assert gt.set_version(2) == 2
    assert gt.nr_entries == abi.GRANT_PER_PAGE_V2
    assert gt.num_free_grants() == gt.max_nr_frames * 256 - 8 - (256 - 208)
    with pytest.raises(ValueError, match="outside the table"):
        gt.entry(300)
    got = gt.get_n(200)
    assert got == list(range(8, 208))
    nxt = gt.get_nonblock()
    assert nxt == 256 and gt.nr_frames == 2  # grown by a frame


def test_set_version_refused_while_mapped_keeps_the_table(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """gnttab_set_version: a ref past the reserved ones pinned -> -EBUSY, v1 kept."""
    front, back = make_domain(), make_domain()
    gt = front.grant_table
    share = gt.share_pages(back.domid, 1)
    free = gt.num_free_grants()
    with back.gnttab.map_grant_ref(front.domid, share.refs[0]):
        with pytest.raises(xengrant.errors.HypercallError) as ei:
            gt.set_version(2)
        assert ei.value.errno == 16  # EBUSY
    assert gt.version == 1 and gt.get_version() == 1
    assert gt.num_free_grants() == free
    assert gt.entry(share.refs[0]).flags == abi.GTF_permit_access
    share.unshare()


# --------------------------------------------------------------- sub-page
@pytest.mark.parametrize(
    ("page_off", "length"),
    [(-1, 10), (0, 0), (0, -1), (4000, 97), (4096, 1), (1, PAGE)],
)
def test_grant_access_subpage_refuses_a_window_outside_the_page(
    make_domain: MakeDomain, page_off: int, length: int
) -> None:
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    ref = gt.get()
    with pytest.raises(ValueError, match="is not in a page"):
        gt.grant_access_subpage(ref, back.domid, 0x1234, page_off, length)
    assert gt.entry(ref).flags == 0
    gt.put(ref)


@pytest.mark.parametrize(("page_off", "length"), [(0, PAGE), (4095, 1), (0, 1), (4000, 96)])
def test_grant_access_subpage_at_the_edges_of_the_page(
    make_domain: MakeDomain, page_off: int, length: int
) -> None:
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    ref = gt.get()
    gt.grant_access_subpage(ref, back.domid, 0x1234, page_off, length, writable=False)
    e = gt.entry(ref)
    assert (e.page_off, e.length, e.frame, e.domid) == (page_off, length, 0x1234, back.domid)
    assert e.flags == abi.GTF_permit_access | abi.GTF_sub_page | abi.GTF_readonly
    gt.try_end_access(ref, release_ref=True)


def test_grant_access_subpage_needs_v2(make_domain: MakeDomain) -> None:
    dom = make_domain()
    ref = dom.grant_table.get()
    with pytest.raises(ValueError, match="v2"):
        dom.grant_table.grant_access_subpage(ref, 0, 0x1234, 0, 16)


# --------------------------------------------------------------- transfer
def test_transfer_into_a_v2_table(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_transfer writes the frame into the v2 entry's 64-bit frame field: the
    gfn a translated receiver named stays (the page appears there), a PV receiver
    gets the mfn; then committed|completed, and end_transfer reads the frame back."""
    giver = make_domain(pv=True)
    hvm, pv = make_domain(), make_domain(pv=True)
    done = abi.GTF_accept_transfer | abi.GTF_transfer_committed | abi.GTF_transfer_completed
    for recv in (hvm, pv):
        gt = recv.grant_table
        assert gt.set_version(2) == 2
        dest = 0x45678 if recv is hvm else 0
        ref = gt.grant_transfer(giver.domid, dest)
        e = gt.entry(ref)
        assert (e.flags, e.domid, e.frame) == (abi.GTF_accept_transfer, giver.domid, dest)
        (mfn,) = ram(giver)
        payload = (b"v2 transfer to d%d " % recv.domid) * 100
        view = giver.view([mfn], True)
        with memoryview(view) as mv:
            mv[: len(payload)] = payload
        view.close()
        giver.grant_table.transfer(mfn, recv.domid, ref)
        e = gt.entry(ref)
        assert e.flags == done
        want = dest if recv is hvm else mfn
        assert e.frame == want
        assert gt.end_transfer(ref) == want
        assert gt.entry(ref).flags == 0
        assert read(recv, want, len(payload)) == payload
        assert xen.hv.machine.owner[mfn] == recv.domid


def test_transfer_batch_answers_each_op(xen: Xen, make_domain: MakeDomain) -> None:
    """do_grant_table_op's loop: each op's status in its own struct."""
    giver, recv = make_domain(pv=True), make_domain()
    gt = recv.grant_table
    ref = gt.grant_transfer(giver.domid, 0x45000)
    m1, m2, m3 = ram(giver, 3)
    ops = (abi.gnttab_transfer * 4)()
    for op, (mfn, ref_) in zip(ops, [(m1, ref), (m2, ref), (m2, ref), (m3, 1 << 20)]):
        op.mfn, op.domid, op.ref = mfn, recv.domid, ref_
    assert giver.grant_table_op(abi.GNTTABOP_transfer, ops) == 0
    # the second finds the entry committed already: general_error, and the page is
    # lost (Xen frees it), so the third no longer owns it: bad_page; the fourth names
    # a ref past the receiver's table (gnttab_prepare_for_transfer fails: general_error)
    assert [op.status for op in ops] == [
        abi.GNTST_okay,
        abi.GNTST_general_error,
        abi.GNTST_bad_page,
        abi.GNTST_general_error,
    ]
    assert recv.hypercalls.last_reasons == [] and "Bad grant reference" in " ".join(
        giver.hypercalls.last_reasons
    )
    assert gt.end_transfer(ref) == 0x45000


def test_set_version_back_to_1_gives_the_status_frames_back(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """gnttab_unpopulate_status_frames frees the status frames and takes them out
    of the physmap; going to v2 again allocates them afresh."""
    dom = make_domain()
    gt = dom.grant_table
    free = xen.free_frames
    gt.set_version(2)
    assert xen.free_frames == free - 1  # one status frame for one table frame
    assert len(xen.domain_state(dom.domid).gt.status) == 1
    gt.set_version(1)
    assert xen.free_frames == free
    assert xen.domain_state(dom.domid).gt.status == []
    gt.set_version(2)
    assert xen.free_frames == free - 1
    share = gt.share_pages(make_domain().domid, 1)
    assert gt.entry(share.refs[0]).flags == abi.GTF_permit_access
    share.unshare()


# ------------------------------------------------------ v2 entry updates
def test_set_readonly_and_writable_on_v2(xen: Xen, make_domain: MakeDomain) -> None:
    """v2: set_readonly checks GTF_writing in the status word, not the header."""
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    share = gt.share_pages(back.domid, 1)
    ref = share.refs[0]
    with back.gnttab.map_grant_ref(front.domid, ref):
        with pytest.raises(Busy):
            gt.set_readonly(ref)
        assert gt.entry(ref).flags == abi.GTF_permit_access | INUSE
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
        gt.set_readonly(ref)  # mapped for reading only: allowed
        assert gt.entry(ref).flags == abi.GTF_permit_access | abi.GTF_readonly | abi.GTF_reading
        with pytest.raises(GrantError):
            back.gnttab.map_grant_ref(front.domid, ref)
        gt.set_writable(ref)
        assert gt.entry(ref).flags == abi.GTF_permit_access | abi.GTF_reading
    with back.gnttab.map_grant_ref(front.domid, ref) as m:
        m.mem[:2] = b"rw"
    assert bytes(share.mem[:2]) == b"rw"
    share.unshare()


def test_try_end_access_on_v2_while_mapped(xen: Xen, make_domain: MakeDomain) -> None:
    """gnttab_end_foreign_access_ref_v2: the header is cleared, then the status word
    read; mapped, the ref stays allocated (Busy) and Xen's pin is unaffected."""
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    pages = front.alloc_pages(1)
    ref = gt.get()
    gt.grant_access(ref, back.domid, pages.gfns[0], writable=False)
    free = gt.num_free_grants()
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False) as m:
        with pytest.raises(Busy) as ei:
            gt.try_end_access(ref, release_ref=True)
        assert "reading" in str(ei.value)
        assert gt.num_free_grants() == free
        assert len(m.mem) == PAGE
    gt.try_end_access(ref, release_ref=True)
    assert gt.num_free_grants() == free + 1
    assert [e.ref for e in gt.entries()] == []
    pages.free()


def test_entries_lists_the_valid_ones(make_domain: MakeDomain) -> None:
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    share = gt.share_pages(back.domid, 2)
    listed = gt.entries()
    assert [e.ref for e in listed] == share.refs
    assert all(e.domid == back.domid and e.type == abi.GTF_permit_access for e in listed)
    everything = gt.entries(only_valid=False)
    assert len(everything) == gt.nr_entries == abi.GRANT_PER_PAGE_V2
    share.unshare()
    assert gt.entries() == []


def test_pv_guest_shares_and_maps_on_v2(xen: Xen, make_domain: MakeDomain) -> None:
    """A PV guest lists its status frames with GNTTABOP_get_status_frames (Linux
    gnttab_map_status_v2) instead of placing them in its physmap."""
    front, back = make_domain(pv=True), make_domain(pv=True)
    gt = front.grant_table
    assert gt.set_version(2) == 2
    share = gt.share_pages(back.domid, 3)
    share.mem[:3] = b"pv2"
    with back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
        assert bytes(m.mem[:3]) == b"pv2"
        assert [gt.entry(r).flags for r in share.refs] == [abi.GTF_permit_access | INUSE] * 3
    share.unshare()
    # grown past one frame, the status frames are listed again
    refs = gt.get_n(gt.nr_entries)
    assert gt.nr_frames == 2
    page = front.alloc_pages(1)
    gt.grant_access(refs[-1], back.domid, page.gfns[0])
    with back.gnttab.map_grant_ref(front.domid, refs[-1]):
        assert gt.entry(refs[-1]).flags == abi.GTF_permit_access | INUSE
    gt.try_end_access(refs[-1])
    gt.put_n(refs)
    page.free()


def test_gntshr_unshare_on_v2_defers_the_busy_refs(xen: Xen, make_domain: MakeDomain) -> None:
    """gntalloc's DEALLOC_GREF on a v2 table (no C end_run there): idle refs end at
    once, a mapped one when its mapper lets go; the pages go with the last."""
    front, back = v2_pair(make_domain)
    gt = front.grant_table
    free_refs, free_frames = gt.num_free_grants(), xen.free_frames
    share = front.gntshr.share_pages(back.domid, 3)
    busy = share.refs[1]
    m = back.gnttab.map_grant_ref(front.domid, busy)
    front.gntshr.unshare(share)
    assert gt.deferred == 1
    assert gt.num_free_grants() == free_refs - 1
    assert [gt.entry(r).flags for r in (share.refs or [])] == []
    assert xen.free_frames == free_frames - 3  # the pages wait for the busy ref
    m.unmap()
    assert gt.reap_deferred() == 0
    assert gt.num_free_grants() == free_refs
    assert xen.free_frames == free_frames


def test_v2_status_frames_follow_the_table_exactly(xen: Xen, make_domain: MakeDomain) -> None:
    """grant_to_status_frames: ceil(frames * 256 / 2048) -- 8 v2 frames need one
    status frame, the ninth a second; the guest maps exactly those."""
    dom = make_domain()
    gt = dom.grant_table
    gt.set_version(2)
    st = xen.domain_state(dom.domid)
    refs = gt.get_n(8 * abi.GRANT_PER_PAGE_V2 - 8)
    assert gt.nr_frames == 8 and st.gt.nr_grant_frames == 8
    assert len(st.gt.status) == 1
    more = gt.get_n(1)
    assert gt.nr_frames == 9 and st.gt.nr_grant_frames == 9
    assert len(st.gt.status) == 2
    gt.put_n(refs + more)
