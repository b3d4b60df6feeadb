"""A copy pinning a grant that is already pinned (Xen 4.17 ``acquire_grant_for_copy``).

A grant another op already pins skips the type and domid checks, but a copy
*into* it is the first writable pin when only read pins exist: ``_set_status``
runs again (``!(readonly) && !(act->pin & (GNTPIN_hstw_mask|GNTPIN_devw_mask))``)
and refuses a read-only entry.  A copy *from* it adds a read pin and changes no
flag.  Checked on v1 and v2 tables, with the C copy run on and off.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import xengrant
from grant_helpers import PAGE, MakeDomain, Xen, active, copy, status_of
from xengrant import abi
from xengrant.emu import gnttab_copy
from xengrant.emu.grant_table import GNTPIN_hstr_inc

SRC, DST = abi.GNTCOPY_source_gref, abi.GNTCOPY_dest_gref
SELF = abi.DOMID_SELF


@pytest.fixture(params=[True, False], ids=["fastpath", "python"])
def fastpath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gnttab_copy, "FASTPATH", request.param)
    yield


def in_use(xen: Xen, domid: int, ref: int) -> int:
    g = xen.domain_state(domid).gt
    flags = status_of(xen, domid, ref) if g.version == 2 else g.read_entry(xen.mem, ref)[0]
    return flags & (abi.GTF_reading | abi.GTF_writing)


@pytest.mark.parametrize("version", [1, 2])
def test_copy_into_a_read_only_grant_mapped_read_only_is_refused(
    xen: Xen, make_domain: MakeDomain, fastpath: None, version: int
) -> None:
    front, back = make_domain(), make_domain()
    front.grant_table.set_version(version)
    share = front.grant_table.share_pages(back.domid, 1, writable=False)
    share.mem[:4] = b"mine"
    ref = share.refs[0]
    mine = back.alloc_pages(1)
    mine.mem[:4] = b"evil"
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
        assert in_use(xen, front.domid, ref) == abi.GTF_reading
        st = copy(back, ((mine.gfns[0], SELF, 0), (ref, front.domid, 0), 4, DST))
        assert st == [abi.GNTST_general_error]
        assert bytes(share.mem[:4]) == b"mine"
        assert in_use(xen, front.domid, ref) == abi.GTF_reading  # writing never left set
        # reading from it adds a read pin and leaves the flags as they were
        st = copy(back, ((ref, front.domid, 0), (mine.gfns[0], SELF, 8), 4, SRC))
        assert st == [abi.GNTST_okay]
        assert bytes(mine.mem[8:12]) == b"mine"
        assert in_use(xen, front.domid, ref) == abi.GTF_reading
        assert active(xen, front.domid) == 1
    assert in_use(xen, front.domid, ref) == 0 and active(xen, front.domid) == 0
    share.unshare()


@pytest.mark.parametrize("version", [1, 2])
def test_copy_into_a_writable_grant_mapped_read_only(
    xen: Xen, make_domain: MakeDomain, fastpath: None, version: int
) -> None:
    """The first write pin sets GTF_writing for the copy and clears it after."""
    front, back = make_domain(), make_domain()
    front.grant_table.set_version(version)
    share = front.grant_table.share_pages(back.domid, 1)
    ref = share.refs[0]
    mine = back.alloc_pages(1)
    mine.mem[:5] = b"write"
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False) as m:
        st = copy(back, ((mine.gfns[0], SELF, 0), (ref, front.domid, PAGE - 5), 5, DST))
        assert st == [abi.GNTST_okay]
        assert bytes(m.mem[PAGE - 5 :]) == b"write"
        assert in_use(xen, front.domid, ref) == abi.GTF_reading
    share.unshare()


@pytest.mark.parametrize("version", [1, 2])
def test_writable_map_over_a_read_pin_of_a_read_only_grant(
    xen: Xen, make_domain: MakeDomain, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """map_grant_ref, step 7 on a pinned entry: the first writable pin runs
    _set_status again, which refuses the read-only entry; a second read-only map
    only adds a pin."""
    from xengrant.emu import gnttab_map

    monkeypatch.setattr(gnttab_map, "FASTPATH", False)
    front, back = make_domain(), make_domain()
    front.grant_table.set_version(version)
    share = front.grant_table.share_pages(back.domid, 1, writable=False)
    ref = share.refs[0]
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
        with pytest.raises(xengrant.errors.GrantError) as ei:
            back.gnttab.map_grant_ref(front.domid, ref)
        assert ei.value.status == abi.GNTST_general_error
        assert in_use(xen, front.domid, ref) == abi.GTF_reading
        with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
            pin = xen.domain_state(front.domid).gt.active[ref].pin
            assert pin == 2 * GNTPIN_hstr_inc
            assert in_use(xen, front.domid, ref) == abi.GTF_reading
    assert in_use(xen, front.domid, ref) == 0 and active(xen, front.domid) == 0
    share.unshare()
