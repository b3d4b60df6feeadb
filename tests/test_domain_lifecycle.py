"""Domains dying with grants in use (``domain_kill``, ``gnttab_release_mappings``).

A granter destroyed while its pages are mapped lingers as a dying zombie: its
mappers keep valid pages until they unmap, and the last unmap completes the
destruction (``complete_domain_destroy``) and gives every frame back.  A
mapper destroyed while mapping others' grants has its mappings undone and
the granters' GTF_reading/GTF_writing cleared, so they can end access at
once.  Every test ends with the machine's frames all accounted for.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

import pytest

from grant_helpers import (
    HOST,
    PAGE,
    Dom,
    MakeDomain,
    Xen,
    errno_of,
    flags_of,
    fresh_gfn,
    grant,
    map_grants,
    ram,
    read,
    unmap1,
    write,
)
from xengrant import abi
from xengrant.emu.machine import NO_OWNER
from xengrant.errors import GrantTableFull

RO = abi.GNTMAP_readonly
PERMIT = abi.GTF_permit_access
INUSE = abi.GTF_reading | abi.GTF_writing


def map_ok(mapper: Dom, specs: Sequence[tuple[int, int, int]]) -> Any:
    """One map batch of ``(dom, ref, flags)`` at contiguous fresh holes; each must succeed."""
    holes = mapper.get_pages(len(specs))
    ops = map_grants(mapper, [(*spec, gfn) for spec, gfn in zip(specs, holes)])
    assert [op.status for op in ops] == [abi.GNTST_okay] * len(specs)
    return ops


def query_size(dom: Dom) -> Any:
    op = abi.gnttab_query_size(dom=abi.DOMID_SELF)
    dom.grant_table_op(abi.GNTTABOP_query_size, op)
    return op


def test_granter_destroyed_while_mapped(xen: Xen, make_domain: MakeDomain) -> None:
    b = make_domain()
    base = xen.free_frames
    a = make_domain()
    r1, g1 = grant(a, b.domid, data=b"first page")
    r2, g2 = grant(a, b.domid, data=b"second page", writable=False)
    m1, m2 = map_ok(b, [(a.domid, r1, HOST), (a.domid, r2, HOST | RO)])
    mfns = [xen.domain_state(a.domid).p2m[g][0] for g in (g1, g2)]
    h1, h2 = (op.host_addr >> 12 for op in (m1, m2))

    xen.destroy_domain(a.domid)

    # A zombie: still known to the hypervisor, dead to itself.
    zombie = xen.hv.domains[a.domid]
    assert zombie.is_dying and zombie.p2m == {} and zombie.tot_pages == 0
    assert errno_of(lambda: query_size(a)) == errno.ESRCH
    assert errno_of(lambda: a.hypercalls.populate_physmap([fresh_gfn()])) == errno.ESRCH
    assert [xen.hv.machine.owner[m] for m in mfns] == [NO_OWNER, NO_OWNER]
    assert [xen.hv.machine.refcount[m] for m in mfns] == [1, 1]
    assert flags_of(xen, a.domid, r1) == PERMIT | INUSE
    # The mapper keeps valid pages, both ways.
    assert read(b, h1, 10) == b"first page"
    assert read(b, h2, 11) == b"second page"
    write(b, h1, b"still mine", 100)
    assert read(b, h1, 10, 100) == b"still mine"
    assert errno_of(lambda: b.view([h2], True)) == errno.EFAULT
    frames_while_mapped = xen.free_frames

    assert unmap1(b, m1) == abi.GNTST_okay
    assert a.domid in xen.hv.domains
    assert xen.free_frames == frames_while_mapped + 1
    assert xen.mem[mfns[0] * PAGE : (mfns[0] + 1) * PAGE] == bytes(PAGE)  # scrubbed
    assert read(b, h2, 11) == b"second page"

    assert unmap1(b, m2) == abi.GNTST_okay
    assert a.domid not in xen.hv.domains
    assert errno_of(lambda: xen.domain_state(a.domid)) == errno.ESRCH
    assert xen.free_frames == base
    assert xen.domain_state(b.domid).maptrack.in_use == 0
    assert unmap1(b, m1) == abi.GNTST_bad_handle


def test_copy_from_a_dying_granters_pinned_grant_is_bad_domain(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """acquire_grant_for_copy: a pinned grant of a dying domain -> GNTST_bad_domain."""
    b = make_domain()
    base = xen.free_frames
    a = make_domain()
    ref, _ = grant(a, b.domid, data=b"payload")
    (m,) = map_ok(b, [(a.domid, ref, HOST | RO)])
    (mine,) = ram(b)
    frames = xen.free_frames
    xen.destroy_domain(a.domid)
    ops = (abi.gnttab_copy * 1)()
    ops[0].source.u.ref, ops[0].source.domid = ref, a.domid
    ops[0].dest.u.gmfn, ops[0].dest.domid = mine, abi.DOMID_SELF
    ops[0].len, ops[0].flags = 7, abi.GNTCOPY_source_gref
    pins = dict(xen.hv.domains[a.domid].gt.active)
    assert b.grant_table_op(abi.GNTTABOP_copy, ops) == 0
    assert ops[0].status == abi.GNTST_bad_domain
    assert read(b, mine, 7) == bytes(7)
    assert xen.hv.domains[a.domid].gt.active == pins
    assert unmap1(b, m) == abi.GNTST_okay
    assert b.hypercalls.decrease_reservation([mine]) == 1
    assert xen.free_frames == base
    assert frames < base


def test_mapper_destroyed_while_mapping(xen: Xen, make_domain: MakeDomain) -> None:
    a = make_domain()
    g1, g2 = ram(a, 2)
    write(a, g1, b"w")
    base = xen.free_frames
    b = make_domain()
    gt = a.grant_table
    r1, r2 = gt.get_n(2)
    gt.grant_access(r1, b.domid, g1, True)
    gt.grant_access(r2, b.domid, g2, False)
    map_ok(b, [(a.domid, r1, HOST), (a.domid, r1, HOST | RO), (a.domid, r2, HOST | RO)])
    ram(b, 3)  # some memory of its own
    assert flags_of(xen, a.domid, r1) == PERMIT | INUSE
    assert flags_of(xen, a.domid, r2) == PERMIT | abi.GTF_readonly | abi.GTF_reading

    xen.destroy_domain(b.domid)

    assert b.domid not in xen.hv.domains  # it granted nothing: gone at once
    assert flags_of(xen, a.domid, r1) == PERMIT
    assert flags_of(xen, a.domid, r2) == PERMIT | abi.GTF_readonly
    assert xen.domain_state(a.domid).gt.active == {}
    for gfn in (g1, g2):
        assert xen.hv.machine.refcount[xen.domain_state(a.domid).p2m[gfn][0]] == 1
    # The granter ends access immediately: nothing is in use any more.
    a.grant_table.try_end_access(r1, release_ref=True)
    a.grant_table.try_end_access(r2, release_ref=True)
    assert xen.free_frames == base
    assert read(a, g1, 1) == b"w"


def test_both_ends_destroyed(xen: Xen, make_domain: MakeDomain) -> None:
    base = xen.free_frames
    a, b = make_domain(), make_domain()
    refs = [grant(a, b.domid, data=bytes([i]) * 8)[0] for i in range(4)]
    map_ok(b, [(a.domid, r, HOST) for r in refs])
    own, _ = grant(a, a.domid)
    map_ok(a, [(a.domid, own, HOST | RO)])  # and a maps a grant of its own
    xen.destroy_domain(a.domid)
    assert xen.hv.domains[a.domid].is_dying
    xen.destroy_domain(b.domid)
    assert xen.hv.domains == {}
    assert xen.free_frames == base


def test_self_mapping_domain_destroyed(xen: Xen, make_domain: MakeDomain) -> None:
    base = xen.free_frames
    a = make_domain()
    ref, _ = grant(a, a.domid, data=b"me")
    map_ok(a, [(a.domid, ref, HOST), (a.domid, ref, HOST | RO)])
    xen.destroy_domain(a.domid)
    assert a.domid not in xen.hv.domains
    assert xen.free_frames == base


def test_v2_domain_destroyed_frees_its_status_frames(xen: Xen, make_domain: MakeDomain) -> None:
    b = make_domain()
    base = xen.free_frames
    a = make_domain()
    assert a.grant_table.set_version(2) == 2
    ref, _ = grant(a, b.domid, data=b"v2")
    (m,) = map_ok(b, [(a.domid, ref, HOST)])
    xen.destroy_domain(a.domid)
    assert read(b, m.host_addr >> 12, 2) == b"v2"
    assert unmap1(b, m) == abi.GNTST_okay
    assert a.domid not in xen.hv.domains
    assert xen.free_frames == base


def test_double_destroy_is_esrch(xen: Xen, make_domain: MakeDomain) -> None:
    a, b = make_domain(), make_domain()
    xen.destroy_domain(b.domid)
    assert errno_of(lambda: xen.destroy_domain(b.domid)) == errno.ESRCH
    assert errno_of(lambda: xen.destroy_domain(999)) == errno.ESRCH
    # A zombie is dying already: destroying it again is ESRCH too.
    c = make_domain()
    ref, _ = grant(a, c.domid)
    (m,) = map_ok(c, [(a.domid, ref, HOST)])
    xen.destroy_domain(a.domid)
    before = xen.free_frames
    assert errno_of(lambda: xen.destroy_domain(a.domid)) == errno.ESRCH
    assert xen.free_frames == before
    assert xen.hv.domains[a.domid].is_dying
    assert unmap1(c, m) == abi.GNTST_okay


def test_domid_reuse_after_full_destruction(xen: Xen, make_domain: MakeDomain) -> None:
    b = make_domain()
    base = xen.free_frames
    a = make_domain(5)
    ref, _ = grant(a, b.domid, data=b"old life")
    (m,) = map_ok(b, [(5, ref, HOST)])
    xen.destroy_domain(5)
    # The zombie still holds the id.
    assert errno_of(lambda: make_domain(5)) == errno.EEXIST
    assert unmap1(b, m) == abi.GNTST_okay
    assert xen.free_frames == base

    again = make_domain(5, max_grant_frames=4)
    assert again.domid == 5
    assert xen.domain_state(5).is_dying is False
    q = query_size(again)
    assert (q.status, q.nr_frames, q.max_nr_frames) == (abi.GNTST_okay, 1, 4)
    assert again.grant_table.get_version() == 1
    # A fresh, zeroed table: the old grant does not survive the id.
    assert flags_of(xen, 5, ref) == 0
    ops = (abi.gnttab_map_grant_ref * 1)()
    ops[0].host_addr, ops[0].flags = b.get_pages(1)[0] << 12, HOST
    ops[0].ref, ops[0].dom = ref, 5
    assert b.grant_table_op(abi.GNTTABOP_map_grant_ref, ops) == 0
    assert ops[0].status == abi.GNTST_general_error
    assert unmap1(b, m) == abi.GNTST_bad_handle
    xen.destroy_domain(5)
    assert xen.free_frames == base


def test_table_full_then_free_works_again(xen: Xen, make_domain: MakeDomain) -> None:
    b = make_domain()
    a = make_domain(max_grant_frames=1)
    gt = a.grant_table
    (gfn,) = ram(a)
    refs = gt.get_n_nonblock(512 - 8)
    assert len(refs) == 504
    for ref in refs:
        gt.grant_access(ref, b.domid, gfn, False)
    assert gt.get_nonblock() is None
    assert gt.get_n_nonblock(1) == []
    frames = xen.free_frames
    with pytest.raises(GrantTableFull):
        gt.share_pages(b.domid, 1)
    with pytest.raises(GrantTableFull):
        gt.grant_foreign_access(b.domid, gfn)
    assert xen.free_frames == frames
    (m,) = map_ok(b, [(a.domid, refs[-1], HOST | RO)])
    # Freeing one (not the mapped one) makes room again.
    gt.try_end_access(refs[0], release_ref=True)
    assert gt.num_free_grants() == 1
    share = gt.share_pages(b.domid, 1)
    assert share.refs == [refs[0]]
    assert gt.get_nonblock() is None
    share.unshare()
    assert gt.get_nonblock() == refs[0]
    gt.put(refs[0])
    assert unmap1(b, m) == abi.GNTST_okay
    for ref in refs[1:]:
        gt.try_end_access(ref, release_ref=True)
    assert gt.num_free_grants() == 504
    assert xen.domain_state(a.domid).gt.active == {}
