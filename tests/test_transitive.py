"""v2 transitive grants through GNTTABOP_copy (Xen 4.17 ``acquire_grant_for_copy``).

A grants a page to B; B re-grants it to C with a ``GTF_transitive`` entry
naming (A, A's ref); C copies through B's ref and reaches A's page.  The
expected statuses are those of grant_table.c 4.17: a bad ``trans_domid``, a
self-referential or nested transitive entry -> ``GNTST_general_error``; the
inner grant's own failures (bad ref -> ``GNTST_bad_gntref``, not for B ->
``GNTST_general_error``) come back as they are.  Mapping a transitive entry is
``GNTST_general_error`` (``_set_status_v2`` with mapflag).  Every test checks
that no pin, in-use flag, maptrack handle or frame is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import xengrant
from grant_helpers import PAGE, Dom, MakeDomain, Xen, copy, map1, unmap1
from xengrant import abi
from xengrant.emu import gnttab_copy
from xengrant.emu.grant_table import GNTPIN_hstw_inc
from xengrant.guest.memory import GNTTAB_GFN_BASE

SRC, DST = abi.GNTCOPY_source_gref, abi.GNTCOPY_dest_gref
SELF = abi.DOMID_SELF


@pytest.fixture(params=[True, False], ids=["fastpath", "python"])
def fastpath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with the C copy fast path on and off (transitive ops always fall to Python)."""
    monkeypatch.setattr(gnttab_copy, "FASTPATH", request.param)
    yield


def snapshot(xen: Xen, *doms: Dom) -> tuple[Any, ...]:
    """Free frames, and per domain its pinned active entries and maptrack handles in use."""
    per = []
    for d in doms:
        st = xen.domain_state(d.domid)
        per.append((len(st.gt.active), st.maptrack.in_use))
    return (xen.free_frames, *per)


def status_of(xen: Xen, domid: int, ref: int) -> int:
    """The in-use bits of ``ref`` (status word under v2, flags under v1)."""
    flags, _domid, _frame = xen.domain_state(domid).gt.read_entry(xen.hv.mem, ref)
    return flags & (abi.GTF_reading | abi.GTF_writing)


class Chain:
    """A -> B -> C: A's page granted to B as ``aref``, B's transitive ``tref`` for C."""

    def __init__(self, make_domain: MakeDomain, writable: bool = True) -> None:
        self.a, self.b, self.c = make_domain(), make_domain(), make_domain()
        self.b.grant_table.set_version(2)
        self.page = self.a.alloc_pages(1)
        self.page.mem[:] = bytes(range(256)) * 16
        self.aref = self.a.grant_table.get()
        self.a.grant_table.grant_access(self.aref, self.b.domid, self.page.gfns[0], writable)
        self.tref = self.b.grant_table.get()
        self.mine = self.c.alloc_pages(1)

    def transitive(
        self, trans_domid: int | None = None, trans_gref: int | None = None, writable: bool = True
    ) -> None:
        self.b.grant_table.grant_access_transitive(
            self.tref,
            self.c.domid,
            self.a.domid if trans_domid is None else trans_domid,
            self.aref if trans_gref is None else trans_gref,
            writable,
        )

    def c_reads(self, off: int = 0, length: int = PAGE) -> int:
        """C copies ``length`` bytes at ``off`` from B's transitive ref into its page."""
        return copy(
            self.c, ((self.tref, self.b.domid, off), (self.mine.gfns[0], SELF, off), length, SRC)
        )[0]

    def idle(self, xen: Xen) -> None:
        """Nothing pinned, no in-use flag on either entry."""
        assert not xen.domain_state(self.a.domid).gt.active
        assert not xen.domain_state(self.b.domid).gt.active
        assert status_of(xen, self.a.domid, self.aref) == 0
        assert status_of(xen, self.b.domid, self.tref) == 0


# ------------------------------------------------------------------ success
def test_copy_from_and_to_a_transitive_grant(
    xen: Xen, make_domain: MakeDomain, fastpath: None
) -> None:
    ch = Chain(make_domain)
    ch.transitive()
    e = ch.b.grant_table.entry(ch.tref)
    assert (e.flags, e.domid) == (abi.GTF_transitive, ch.c.domid)
    before = snapshot(xen, ch.a, ch.b, ch.c)
    assert ch.c_reads(100, 1000) == abi.GNTST_okay
    assert bytes(ch.mine.mem[100:1100]) == bytes(ch.page.mem[100:1100])
    assert bytes(ch.mine.mem[:100]) == bytes(100)
    ch.mine.mem[:16] = b"written-by-dom-C"
    st = copy(ch.c, ((ch.mine.gfns[0], SELF, 0), (ch.tref, ch.b.domid, 4000), 16, DST))
    assert st == [abi.GNTST_okay]
    assert bytes(ch.page.mem[4000:4016]) == b"written-by-dom-C"
    # both sides through B's ref in one op (the same ref pinned twice)
    st = copy(ch.c, ((ch.tref, ch.b.domid, 4000), (ch.tref, ch.b.domid, 0), 16, SRC | DST))
    assert st == [abi.GNTST_okay]
    assert bytes(ch.page.mem[:16]) == b"written-by-dom-C"
    assert snapshot(xen, ch.a, ch.b, ch.c) == before
    ch.idle(xen)
    # the copy's pins were transient: everybody can end access now
    ch.b.grant_table.try_end_access(ch.tref, release_ref=True)
    ch.a.grant_table.try_end_access(ch.aref, release_ref=True)


def test_transitive_back_to_the_original_granter(xen: Xen, make_domain: MakeDomain) -> None:
    """trans_domid == the copier is allowed (grant_table.c: "easy, and means ...")."""
    a, b = make_domain(), make_domain()
    b.grant_table.set_version(2)
    page = a.alloc_pages(1)
    page.mem[:5] = b"round"
    aref = a.grant_table.get()
    a.grant_table.grant_access(aref, b.domid, page.gfns[0])
    tref = b.grant_table.get()
    b.grant_table.grant_access_transitive(tref, a.domid, a.domid, aref)
    mine = a.alloc_pages(1)
    assert copy(a, ((tref, b.domid, 0), (mine.gfns[0], SELF, 0), 5, SRC)) == [0]
    assert bytes(mine.mem[:5]) == b"round"
    assert not xen.domain_state(a.domid).gt.active
    assert not xen.domain_state(b.domid).gt.active


def test_sub_page_limits_of_the_underlying_grant_apply(xen: Xen, make_domain: MakeDomain) -> None:
    ch = Chain(make_domain)
    ch.a.grant_table.try_end_access(ch.aref)
    ch.a.grant_table.set_version(2)
    ch.aref = ch.a.grant_table.get()
    ch.a.grant_table.grant_access_subpage(ch.aref, ch.b.domid, ch.page.gfns[0], 1000, 200)
    ch.transitive()
    before = snapshot(xen, ch.a, ch.b, ch.c)
    assert ch.c_reads(1000, 200) == abi.GNTST_okay
    assert bytes(ch.mine.mem[1000:1200]) == bytes(ch.page.mem[1000:1200])
    assert ch.c_reads(999, 10) == abi.GNTST_general_error
    assert ch.c_reads(1100, 101) == abi.GNTST_general_error
    assert snapshot(xen, ch.a, ch.b, ch.c) == before
    ch.idle(xen)


def test_pins_share_the_underlying_grant_with_b_s_own_map(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """The inner pin is for B (the intermediate), so it adds to B's mapping's pin."""
    ch = Chain(make_domain)
    ch.transitive()
    mop = map1(ch.b, ch.a.domid, ch.aref)
    assert mop.status == abi.GNTST_okay
    assert ch.c_reads() == abi.GNTST_okay
    assert bytes(ch.mine.mem) == bytes(ch.page.mem)
    act = xen.domain_state(ch.a.domid).gt.active[ch.aref]
    assert act.pin == GNTPIN_hstw_inc  # the map's pin only; the copy's came and went
    assert not xen.domain_state(ch.b.domid).gt.active
    with pytest.raises(xengrant.errors.Busy):
        ch.a.grant_table.try_end_access(ch.aref)
    assert unmap1(ch.b, mop) == abi.GNTST_okay
    ch.idle(xen)
    ch.a.grant_table.try_end_access(ch.aref)


# ------------------------------------------------------------------ failures
def test_mapping_a_transitive_grant_is_general_error(xen: Xen, make_domain: MakeDomain) -> None:
    ch = Chain(make_domain)
    ch.transitive()
    before = snapshot(xen, ch.a, ch.b, ch.c)
    for flags in (abi.GNTMAP_host_map, abi.GNTMAP_host_map | abi.GNTMAP_readonly):
        assert map1(ch.c, ch.b.domid, ch.tref, flags).status == abi.GNTST_general_error
    assert snapshot(xen, ch.a, ch.b, ch.c) == before
    ch.idle(xen)


@pytest.mark.parametrize(
    ("case", "want"),
    [
        ("unknown trans_domid", abi.GNTST_general_error),
        ("self-referential", abi.GNTST_general_error),
        ("trans gref out of range", abi.GNTST_bad_gntref),
        ("underlying grant not for B", abi.GNTST_general_error),
        ("underlying grant read-only, C writes", abi.GNTST_general_error),
        ("underlying grant is transitive too", abi.GNTST_general_error),
        ("transitive entry not for C", abi.GNTST_general_error),
    ],
)
def test_bad_transitive_grants(
    xen: Xen, make_domain: MakeDomain, fastpath: None, case: str, want: int
) -> None:
    ch = Chain(make_domain, writable=case != "underlying grant read-only, C writes")
    write = False
    if case == "unknown trans_domid":
        ch.transitive(trans_domid=0x7FEE)
    elif case == "self-referential":
        ch.transitive(trans_domid=ch.b.domid)
    elif case == "trans gref out of range":
        ch.transitive(trans_gref=1 << 20)
    elif case == "underlying grant not for B":
        ch.a.grant_table.try_end_access(ch.aref)
        ch.a.grant_table.grant_access(ch.aref, ch.c.domid, ch.page.gfns[0])
        ch.transitive()
    elif case == "underlying grant read-only, C writes":
        ch.transitive()
        write = True
    elif case == "underlying grant is transitive too":
        d = make_domain()
        ch.a.grant_table.try_end_access(ch.aref)
        ch.a.grant_table.set_version(2)
        ch.aref = ch.a.grant_table.get()
        dref = d.grant_table.get()
        d.grant_table.grant_access(dref, ch.a.domid, d.alloc_pages(1).gfns[0])
        ch.a.grant_table.grant_access_transitive(ch.aref, ch.b.domid, d.domid, dref)
        ch.transitive()
    else:
        ch.b.grant_table.grant_access_transitive(ch.tref, ch.a.domid, ch.a.domid, ch.aref)
    before = snapshot(xen, ch.a, ch.b, ch.c)
    if write:
        st = copy(ch.c, ((ch.mine.gfns[0], SELF, 0), (ch.tref, ch.b.domid, 0), 8, DST))[0]
    else:
        st = ch.c_reads(0, 8)
    assert st == want
    assert snapshot(xen, ch.a, ch.b, ch.c) == before
    assert bytes(ch.mine.mem[:8]) == bytes(8)
    ch.idle(xen)
    if case == "underlying grant read-only, C writes":
        assert ch.c_reads(0, 8) == abi.GNTST_okay  # reading through it still works
        ch.idle(xen)


def test_transitive_needs_a_v2_table(make_domain: MakeDomain) -> None:
    a, b = make_domain(), make_domain()
    ref = a.grant_table.get()
    with pytest.raises(ValueError, match="v2"):
        a.grant_table.grant_access_transitive(ref, b.domid, b.domid, 0)


@pytest.mark.parametrize("case", ["unknown trans_domid", "self-referential", "nested"])
def test_bad_transitive_grant_as_copy_destination_clears_gtf_writing(
    xen: Xen, make_domain: MakeDomain, fastpath: None, case: str
) -> None:
    """acquire_grant_for_copy, destination side (readonly false): _set_status_v2 set
    GTF_reading|GTF_writing on B's entry before the transitive checks failed;
    ``unlock_out_clear`` must clear GTF_writing as well as GTF_reading."""
    ch = Chain(make_domain)
    if case == "unknown trans_domid":
        ch.transitive(trans_domid=0x7FEE)
    elif case == "self-referential":
        ch.transitive(trans_domid=ch.b.domid)
    else:
        d = make_domain()
        ch.a.grant_table.try_end_access(ch.aref)
        ch.a.grant_table.set_version(2)
        ch.aref = ch.a.grant_table.get()
        dref = d.grant_table.get()
        d.grant_table.grant_access(dref, ch.a.domid, d.alloc_pages(1).gfns[0])
        ch.a.grant_table.grant_access_transitive(ch.aref, ch.b.domid, d.domid, dref)
        ch.transitive()
    ch.mine.mem[:8] = b"C writes"
    before = snapshot(xen, ch.a, ch.b, ch.c)
    st = copy(ch.c, ((ch.mine.gfns[0], SELF, 0), (ch.tref, ch.b.domid, 0), 8, DST))
    assert st == [abi.GNTST_general_error]
    assert status_of(xen, ch.b.domid, ch.tref) == 0  # neither writing nor reading left
    assert snapshot(xen, ch.a, ch.b, ch.c) == before
    assert bytes(ch.page.mem[:8]) != b"C writes"
    ch.idle(xen)
    # B can end access at once: no flag is left for its cmpxchg to trip over
    ch.b.grant_table.try_end_access(ch.tref, release_ref=True)


def test_read_only_transitive_grant_refuses_writes(
    xen: Xen, make_domain: MakeDomain, fastpath: None
) -> None:
    """B re-grants A's writable page read-only: _set_status_v2 refuses the write pin
    of B's entry ("Attempt to write-pin a r/o grant entry"), whether the copy writes
    through it alone or reads and writes it in one op (the second pin of a pinned
    transitive entry is checked too); reading through it works."""
    ch = Chain(make_domain)
    ch.transitive(writable=False)
    e = ch.b.grant_table.entry(ch.tref)
    assert e.flags == abi.GTF_transitive | abi.GTF_readonly
    ch.mine.mem[:8] = b"C writes"
    before = snapshot(xen, ch.a, ch.b, ch.c)
    page = bytes(ch.page.mem)
    st = copy(
        ch.c,
        ((ch.mine.gfns[0], SELF, 0), (ch.tref, ch.b.domid, 0), 8, DST),
        ((ch.tref, ch.b.domid, 100), (ch.tref, ch.b.domid, 0), 8, SRC | DST),
    )
    assert st == [abi.GNTST_general_error, abi.GNTST_general_error]
    assert bytes(ch.page.mem) == page
    assert snapshot(xen, ch.a, ch.b, ch.c) == before
    ch.idle(xen)
    assert ch.c_reads(0, 8) == abi.GNTST_okay
    assert bytes(ch.mine.mem[:8]) == page[:8]
    ch.idle(xen)


def test_transitive_entry_padding_is_ignored(xen: Xen, make_domain: MakeDomain) -> None:
    """grant_entry_v2.transitive: trans_domid is 16 bits, then pad0; Xen reads the
    u16 and the u32 gref alone, so a guest's junk in pad0 changes nothing."""
    ch = Chain(make_domain)
    ch.transitive()
    view = ch.b.view([GNTTAB_GFN_BASE], True)
    with memoryview(view) as mv:
        off = ch.tref * 16
        mv[off + 6 : off + 8] = b"\xff\xff"  # pad0
    view.close()
    assert ch.c_reads(0, 64) == abi.GNTST_okay
    assert bytes(ch.mine.mem[:64]) == bytes(ch.page.mem[:64])
    ch.idle(xen)
