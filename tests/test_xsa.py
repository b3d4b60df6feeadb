"""Xen's security history as tests: each XSA of the grant table, replayed.

Each test names its advisory (xenbits.xen.org/xsa/advisory-N.html) and asserts
what Xen 4.17 answers since the fix, with a bystander or the leftovers (pins,
in-use flags, maptrack handles, frames) checked where the bug lived.
"""

from __future__ import annotations

import errno
import random
import struct
import threading
from typing import Any

import pytest

import xengrant
from grant_helpers import (
    HOST,
    Dom,
    MakeDomain,
    Xen,
    copy,
    flags_of,
    grant,
    map1,
    map_grants,
    ram,
    read,
    set_version,
    unmap,
    unmap1,
    write,
)
from test_transitive import Chain
from xengrant import abi
from xengrant.emu import entry as entry_mod
from xengrant.emu import gnttab_map
from xengrant.errors import Busy, GrantError

RO = abi.GNTMAP_readonly
DEV = abi.GNTMAP_device_map
PERMIT = abi.GTF_permit_access
INUSE = abi.GTF_reading | abi.GTF_writing
SRC, DST = abi.GNTCOPY_source_gref, abi.GNTCOPY_dest_gref
SELF = abi.DOMID_SELF


def pins(xen: Xen, domid: int) -> dict[int, int]:
    return {ref: act.pin for ref, act in xen.domain_state(domid).gt.active.items()}


def refcount(xen: Xen, dom: Dom, gfn: int) -> int:
    return int(xen.hv.machine.refcount[xen.domain_state(dom.domid).p2m[gfn][0]])


def swap(dom: Dom, *pairs: tuple[int, int]) -> list[int]:
    ops = (abi.gnttab_swap_grant_ref * len(pairs))()
    for op, (a, b) in zip(ops, pairs):
        op.ref_a, op.ref_b = a, b
    assert dom.grant_table_op(abi.GNTTABOP_swap_grant_ref, ops) == 0
    return [int(op.status) for op in ops]


# ------------------------------------------------------------------ XSA-18/134
def test_xsa_18_134_swap_out_of_range_and_before_setup(xen: Xen, make_domain: MakeDomain) -> None:
    """XSA-18: swap_grant_ref had no bounds check; XSA-134: swap before the
    table was set up dereferenced NULL.  A fresh domain (its guest never
    touched the table) swapping refs past its one frame: GNTST_bad_gntref,
    nothing written, and a bystander's table unchanged."""
    a, bystander = make_domain(), make_domain()
    ref, _ = grant(bystander, a.domid, data=b"bystander")
    before = bytes(xen.mem[: xen.nr_frames * 4096])
    assert swap(a, (512, 8), (8, 512), (0xFFFFFFFF, 0), (8, 1 << 31)) == [abi.GNTST_bad_gntref] * 4
    assert bytes(xen.mem[: xen.nr_frames * 4096]) == before
    assert set_version(a, 2) == (0, 2)  # v2: 256 entries a frame
    assert swap(a, (256, 8)) == [abi.GNTST_bad_gntref]
    assert swap(a, (255, 8)) == [abi.GNTST_okay]
    assert flags_of(xen, bystander.domid, ref) == PERMIT


# ------------------------------------------------------- XSA-26/255/379/387
def test_xsa_26_255_version_switch_with_pinned_refs_is_ebusy(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    """XSA-26 (status pages leaked on a switch), XSA-255 (v2 -> v1 freed status
    pages still mapped): gnttab_set_version refuses (-EBUSY) while any ref past
    the reserved ones is pinned, and the table is untouched."""
    a, b = pair
    assert a.grant_table.set_version(2) == 2
    ref, _ = grant(a, b.domid, data=b"pinned")
    op = map1(b, a.domid, ref)
    assert op.status == abi.GNTST_okay
    g = xen.domain_state(a.domid).gt
    status = list(g.status)
    assert set_version(a, 1) == (errno.EBUSY, 2)
    assert g.version == 2 and g.status == status
    assert read(b, op.host_addr >> 12, 6) == b"pinned"
    assert unmap1(b, op) == abi.GNTST_okay
    a.grant_table.try_end_access(ref, release_ref=True)
    frames = xen.free_frames
    assert a.grant_table.set_version(1) == 1
    assert xen.free_frames == frames + len(status)  # the status frame is freed, once
    for mfn in status:
        assert xen.hv.machine.owner[mfn] < 0


def test_xsa_379_387_no_freed_status_frame_stays_reachable(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """XSA-379/387: after v2 -> v1 a status frame the guest had placed in its
    physmap stayed reachable there once freed.  Now the gfn goes with it."""
    a = make_domain()
    assert set_version(a, 2) == (0, 2)
    gfn = 0x7000
    assert (
        a.hypercalls.add_to_physmap(
            abi.XENMAPSPACE_grant_table, abi.XENMAPIDX_grant_table_status, gfn
        )
        == 0
    )
    (status_mfn,) = xen.domain_state(a.domid).gt.status
    assert set_version(a, 1) == (0, 1)
    assert gfn not in xen.domain_state(a.domid).p2m
    with pytest.raises(xengrant.HypercallError) as ei:
        a.view([gfn], False)
    assert ei.value.errno == errno.EFAULT
    assert xen.hv.machine.owner[status_mfn] < 0


# --------------------------------------------------------------- XSA-218/228
def _concurrently(n: int, fn: Any) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released together; their results."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_xsa_218_concurrent_unmaps_of_one_handle(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """XSA-218: two unmaps of one handle racing could both drop the pin and
    free the handle twice.  Now exactly one succeeds, the others get
    GNTST_bad_handle, and the handle is on the free list once."""
    a, b = pair
    ref, gfn = grant(a, b.domid)
    for _ in range(20):
        op = map1(b, a.domid, ref, HOST | RO)
        host_addr, handle = op.host_addr, op.handle
        statuses = _concurrently(
            6, lambda _i, h=host_addr, k=handle: unmap(b, [(h, k)])[0]
        )
        assert sorted(statuses) == [abi.GNTST_bad_handle] * 5 + [abi.GNTST_okay]
        assert pins(xen, a.domid) == {}
        assert flags_of(xen, a.domid, ref) == PERMIT
        mt = xen.domain_state(b.domid).maptrack
        assert list(mt._free).count(handle) == 1
        b.put_pages([host_addr >> 12])
    assert refcount(xen, a, gfn) == 1


def test_xsa_228_a_storm_of_maps_and_unmaps_keeps_the_free_list_whole(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """XSA-228: races on the maptrack free list (and its steal path) lost or
    duplicated handles.  Threads mapping and unmapping the same grants, some
    of them stale handles on purpose, leave every handle free exactly once."""
    a, b = make_domain(), make_domain()
    refs = [grant(a, b.domid)[0] for _ in range(8)]

    def storm(i: int) -> int:
        rng = random.Random(i)
        done = 0
        for _ in range(150):
            ref = rng.choice(refs)
            op = map1(b, a.domid, ref, HOST | RO)
            assert op.status == abi.GNTST_okay
            assert unmap1(b, op) == abi.GNTST_okay
            # a stale second unmap of the same handle must not double-free it
            st = unmap(b, [(op.host_addr, op.handle)])[0]
            assert st in (abi.GNTST_bad_handle, abi.GNTST_general_error, abi.GNTST_okay)
            if st == abi.GNTST_okay:  # reused by another thread meanwhile:
                done += 1  # that thread's mapping was unmapped by us
            b.put_pages([op.host_addr >> 12])
        return done

    _concurrently(4, storm)
    mt = xen.domain_state(b.domid).maptrack
    free = list(mt._free)
    assert len(free) == len(set(free)) == len(mt.entries)
    assert mt.in_use == 0 and all(e is None for e in mt.entries)
    assert pins(xen, a.domid) == {}
    assert all(flags_of(xen, a.domid, r) == PERMIT for r in refs)


# ------------------------------------------------------------------- XSA-224
def test_xsa_224_host_and_device_map_unmapped_in_halves(xen: Xen, make_domain: MakeDomain) -> None:
    """XSA-224: a host+device map unmapped in two halves dropped the page's
    references twice; dev_bus_addr 0 still dropped them.  Each half drops its
    own pin and reference; an op naming neither half changes nothing."""
    a, b = make_domain(), make_domain(pv=True)
    ref, gfn = grant(a, b.domid, data=b"halves")
    base = refcount(xen, a, gfn)
    op = map1(b, a.domid, ref, HOST | DEV)
    assert op.status == abi.GNTST_okay
    assert pins(xen, a.domid) == {ref: 0x00010001}
    assert refcount(xen, a, gfn) == base + 2
    # neither half named: nothing happens
    assert unmap(b, [(0, op.handle, 0)]) == [abi.GNTST_okay]
    assert refcount(xen, a, gfn) == base + 2
    # the host half
    assert unmap(b, [(op.host_addr, op.handle, 0)]) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {ref: 0x00010000}
    assert refcount(xen, a, gfn) == base + 1
    assert flags_of(xen, a.domid, ref) == PERMIT | INUSE  # the device pin still writes
    # the host half again: already gone, the handle lives on for the device half
    assert unmap(b, [(op.host_addr, op.handle, 0)]) == [abi.GNTST_okay]
    assert refcount(xen, a, gfn) == base + 1
    # the device half
    assert unmap(b, [(0, op.handle, op.dev_bus_addr)]) == [abi.GNTST_okay]
    assert pins(xen, a.domid) == {} and refcount(xen, a, gfn) == base
    assert flags_of(xen, a.domid, ref) == PERMIT
    assert unmap(b, [(0, op.handle, op.dev_bus_addr)]) == [abi.GNTST_bad_handle]
    assert refcount(xen, a, gfn) == base


# ------------------------------------------------------------- XSA-226/411
def test_xsa_226_transitive_chains_stop_at_one_level(xen: Xen, make_domain: MakeDomain) -> None:
    """XSA-226: transitive grants recursed without bound and miscounted pins.
    A transitive grant of a transitive grant is GNTST_general_error, a
    self-referential one too, and nothing stays pinned either way."""
    ch = Chain(make_domain)
    ch.transitive()
    assert ch.c_reads(0, 16) == abi.GNTST_okay
    ch.idle(xen)
    # D grants C a transitive entry naming B's transitive entry: two levels
    d = make_domain()
    d.grant_table.set_version(2)
    b_for_d = ch.b.grant_table.get()
    ch.b.grant_table.grant_access_transitive(b_for_d, d.domid, ch.a.domid, ch.aref)
    dref = d.grant_table.get()
    d.grant_table.grant_access_transitive(dref, ch.c.domid, ch.b.domid, b_for_d)
    st = copy(ch.c, ((dref, d.domid, 0), (ch.mine.gfns[0], SELF, 0), 8, SRC))
    assert st == [abi.GNTST_general_error]
    ch.idle(xen)
    assert not xen.domain_state(d.domid).gt.active
    # self-referential
    selfref = ch.b.grant_table.get()
    ch.b.grant_table.grant_access_transitive(selfref, ch.c.domid, ch.b.domid, selfref)
    st = copy(ch.c, ((selfref, ch.b.domid, 0), (ch.mine.gfns[0], SELF, 0), 8, SRC))
    assert st == [abi.GNTST_general_error]
    ch.idle(xen)


def test_xsa_411_transitive_copies_in_both_directions_at_once(
    xen: Xen, make_domain: MakeDomain
) -> None:
    """XSA-411: copies through transitive grants of two domains naming each
    other took the two tables' locks in opposite orders (a deadlock).  Both
    directions at once complete, and leave nothing pinned."""
    a, b = make_domain(), make_domain()
    for d in (a, b):
        d.grant_table.set_version(2)
    pa, pb = a.alloc_pages(1), b.alloc_pages(1)
    pa.mem[:4], pb.mem[:4] = b"AAAA", b"BBBB"
    a_to_b = a.grant_table.get()
    a.grant_table.grant_access(a_to_b, b.domid, pa.gfns[0])
    b_to_a = b.grant_table.get()
    b.grant_table.grant_access(b_to_a, a.domid, pb.gfns[0])
    # each re-grants the other's page to itself... to the other transitively
    ta = a.grant_table.get()
    a.grant_table.grant_access_transitive(ta, b.domid, b.domid, b_to_a)
    tb = b.grant_table.get()
    b.grant_table.grant_access_transitive(tb, a.domid, a.domid, a_to_b)
    sa, sb = a.alloc_pages(1), b.alloc_pages(1)

    def run(i: int) -> list[int]:
        out: list[int] = []
        for _ in range(100):
            if i == 0:  # a copies through b's transitive entry (its own page)
                out += copy(a, ((tb, b.domid, 0), (sa.gfns[0], SELF, 0), 4, SRC))
            else:
                out += copy(b, ((ta, a.domid, 0), (sb.gfns[0], SELF, 0), 4, SRC))
        return out

    res = _concurrently(2, run)
    assert res == [[abi.GNTST_okay] * 100] * 2
    assert bytes(sa.mem[:4]) == b"AAAA" and bytes(sb.mem[:4]) == b"BBBB"
    assert not xen.domain_state(a.domid).gt.active
    assert not xen.domain_state(b.domid).gt.active


# ------------------------------------------------------------- XSA-230/236
def test_xsa_230_236_copy_while_also_mapped(xen: Xen, make_domain: MakeDomain) -> None:
    """XSA-230: a copy's unpin cleared GTF_writing while a device mapping still
    needed it; XSA-236: the copy dropped the page's references before its
    pins.  After copies into and out of a grant mapped writable (host and
    device), the entry keeps reading|writing and the page its references."""
    a, b = make_domain(), make_domain(pv=True)
    ref, gfn = grant(a, b.domid, data=b"mapped")
    op = map1(b, a.domid, ref, DEV)
    assert op.status == abi.GNTST_okay
    refs = refcount(xen, a, gfn)
    (mine,) = ram(b)
    write(b, mine, b"copied")
    assert copy(b, ((mine, SELF, 0), (ref, a.domid, 0), 6, DST)) == [abi.GNTST_okay]
    assert copy(b, ((ref, a.domid, 0), (mine, SELF, 8), 6, SRC)) == [abi.GNTST_okay]
    assert flags_of(xen, a.domid, ref) == PERMIT | INUSE
    assert pins(xen, a.domid) == {ref: 0x00010000}
    assert refcount(xen, a, gfn) == refs
    assert read(b, mine, 14) == b"copied\0\0copied"
    assert unmap(b, [(0, op.handle, op.dev_bus_addr)]) == [abi.GNTST_okay]
    assert flags_of(xen, a.domid, ref) == PERMIT and pins(xen, a.domid) == {}
    assert refcount(xen, a, gfn) == refs - 1


# ------------------------------------------------------------------- XSA-316
def test_xsa_316_map_error_path_status(xen: Xen, make_domain: MakeDomain) -> None:
    """XSA-316: a failed map's error path stored a positive status (+1).  XTF's
    test maps ref 8 of dom 0 that was never granted: GNTST_general_error (-1),
    handle and dev_bus_addr as passed in."""
    xen.create_domain(0)
    b = make_domain()
    ops = (abi.gnttab_map_grant_ref * 1)()
    ops[0].host_addr, ops[0].flags, ops[0].ref, ops[0].dom = (
        b.get_pages(1)[0] << 12, HOST, 8, 0,
    )
    ops[0].handle, ops[0].dev_bus_addr = 0xAAAA, 0xBBBB
    assert b.grant_table_op(abi.GNTTABOP_map_grant_ref, ops) == 0
    assert ops[0].status == abi.GNTST_general_error == -1
    assert (ops[0].handle, ops[0].dev_bus_addr) == (0xAAAA, 0xBBBB)
    assert xen.domain_state(b.domid).maptrack.in_use == 0


# ------------------------------------------------------------------- XSA-380
def test_xsa_380_release_of_32768_mappings_is_bounded_and_preemptible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """XSA-380: gnttab_release_mappings walked every handle in one go (and
    searched linearly).  Destroying a domain mapping 32760 grants -- a full
    64-frame table -- walks 256 handles per step with the hypercall lock free
    between steps: another domain's hypercall runs mid-release."""
    with xengrant.EmbeddedXen(memory=256 << 20) as xen:
        _xsa_380(xen, monkeypatch)


def _xsa_380(xen: Xen, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = xen.create_domain(), xen.create_domain(), xen.create_domain()
    table = a.grant_table
    n = 64 * 512 - 8
    share = table.share_pages(b.domid, n, writable=False)
    mapping = b.gnttab.map_domain_grant_refs(a.domid, share.refs, writable=False)
    assert xen.domain_state(b.domid).maptrack.in_use == n
    steps: list[int] = []
    walked: list[int] = []
    real = xen.hv.relinquish_resources

    def spy(d: Any, budget: int | None = None) -> bool:
        before = d.maptrack.in_use
        done: bool = real(d, budget)
        walked.append(before - d.maptrack.in_use)
        return done

    monkeypatch.setattr(xen.hv, "relinquish_resources", spy)
    seen: list[int] = []

    def bystander_between_steps() -> None:
        steps.append(len(walked))
        if len(steps) == 3:  # mid-release: c's hypercall runs while b is half released
            t = threading.Thread(
                target=lambda: seen.append(xen.domain_state(b.domid).maptrack.in_use)
                or seen.append(c.grant_table.query_size()[0])
            )
            t.start()
            t.join()

    monkeypatch.setattr(xen, "_preempt", bystander_between_steps)
    xen.destroy_domain(b.domid)
    assert max(walked) <= 256  # bounded: a page of handles a step
    # 128 pages of maptrack handles, then one step of the memory
    assert len(walked) == 32768 // 256 + 1
    # the bystander ran after three steps of at most 256 handles each
    assert n - 3 * 256 <= seen[0] <= n - 2 * 256 and seen[1] == 1
    assert not xen.domain_state(a.domid).gt.active
    mapping.released = True  # its domain is gone; nothing left to unmap
    share.unshare()
    xen.check_leaks()


# ------------------------------------------------------------------- XSA-382
def test_xsa_382_get_status_frames_capacity(xen: Xen, make_domain: MakeDomain) -> None:
    """XSA-382: get_status_frames checked nr_frames against 8x the status
    frames there are.  Asking one more than exist is GNTST_general_error and
    writes nothing."""
    a = make_domain(pv=True)
    (page,) = ram(a)
    write(a, page, b"\xee" * 64)

    def status_frames(nr: int) -> int:
        op = abi.gnttab_get_status_frames(nr_frames=nr, dom=SELF, frame_list=page << 12)
        assert a.grant_table_op(abi.GNTTABOP_get_status_frames, op) == 0
        return int(op.status)

    assert status_frames(1) == abi.GNTST_general_error  # v1: none
    assert set_version(a, 2) == (0, 2)
    assert status_frames(2) == abi.GNTST_general_error
    assert read(a, page, 8) == b"\xee" * 8
    assert status_frames(1) == abi.GNTST_okay
    assert read(a, page, 16)[8:] == b"\xee" * 8
    # 9 grant frames of v2 need 2 status frames (2048 status words a frame)
    setup = abi.gnttab_setup_table(dom=SELF, nr_frames=9, frame_list=page << 12)
    assert a.grant_table_op(abi.GNTTABOP_setup_table, setup) == 0
    assert setup.status == abi.GNTST_okay
    assert status_frames(2) == abi.GNTST_okay
    assert status_frames(3) == abi.GNTST_general_error


# ------------------------------------------------------------------- XSA-396
def test_xsa_396_end_access_racing_a_map(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """XSA-396: Linux freed a ref (and its page) after a failed end of access,
    while the peer still mapped it.  try_end_access(release_ref=True) racing a
    map: exactly one of them wins, and a ref freed is never mapped."""
    a, b = pair
    table = a.grant_table
    page = a.alloc_pages(1)
    for round_ in range(60):
        ref = table.get()
        table.grant_access(ref, b.domid, page.gfns[0])

        def end(_i: int, ref: int = ref) -> str:
            try:
                table.try_end_access(ref, release_ref=True)
            except Busy:
                return "busy"
            return "ended"

        def mapper(_i: int, ref: int = ref) -> Any:
            try:
                return b.gnttab.map_grant_ref(a.domid, ref)
            except GrantError as e:
                assert e.status == abi.GNTST_general_error
                return None

        ended, m = _concurrently(2, lambda i: end(i) if i == 0 else mapper(i))
        assert (ended == "ended") != (m is not None), round_
        if m is not None:
            assert flags_of(xen, a.domid, ref) & abi.GTF_reading
            m.unmap()
            table.try_end_access(ref, release_ref=True)
        assert pins(xen, a.domid) == {}
    page.free()
    xen.check_leaks()


# ------------------------------------------------------------- the 129th pin
@pytest.mark.parametrize("flags", [DEV | RO, DEV, HOST | RO, HOST])
def test_the_129th_pin_of_a_kind(xen: Xen, make_domain: MakeDomain, flags: int) -> None:
    """Four 8-bit counters per active entry: the 129th pin of one kind is
    refused (GNTPIN_incr2oflow_mask), the counter never wraps into the next,
    and the other kinds still pin."""
    a, b = make_domain(), make_domain(pv=True)
    ref, _ = grant(a, b.domid)
    ops = map_grants(b, [(a.domid, ref, flags)] * 129)
    assert [op.status for op in ops[:128]] == [abi.GNTST_okay] * 128
    assert ops[128].status == abi.GNTST_general_error
    pin = pins(xen, a.domid)[ref]
    assert pin in (0x80, 0x8000, 0x800000, 0x80000000)
    for other in (DEV | RO, DEV, HOST | RO, HOST):
        if other != flags:
            more = map1(b, a.domid, ref, other)
            assert more.status == abi.GNTST_okay
            assert unmap(b, [(more.host_addr, more.handle, more.dev_bus_addr)]) == [0]
    specs = [(op.host_addr, op.handle, op.dev_bus_addr) for op in ops[:128]]
    assert unmap(b, specs) == [abi.GNTST_okay] * 128
    assert pins(xen, a.domid) == {}


# ---------------------------------------------- a guest rewriting its entry
@pytest.fixture
def rewrite(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the granter rewrite its entry between Xen's read and its cmpxchg
    (``_set_status_v1``): ``rewrite(fn, times)`` runs ``fn()`` just before the
    next ``times`` cmpxchgs."""
    monkeypatch.setattr(gnttab_map, "FASTPATH", False)
    real = entry_mod.cmpxchg32
    plan: list[Any] = []

    def cmpxchg32(mem: Any, off: int, old: int, new: int) -> int:
        if plan and plan[0][1] > 0:
            plan[0][1] -= 1
            plan[0][0]()
        return int(real(mem, off, old, new))

    monkeypatch.setattr(entry_mod, "cmpxchg32", cmpxchg32)

    def arm(fn: Any, times: int = 1) -> None:
        plan[:] = [[fn, times]]

    return arm


def test_entry_rewritten_before_the_cmpxchg(
    xen: Xen, make_domain: MakeDomain, rewrite: Any
) -> None:
    """The cmpxchg fails and Xen re-reads: it pins what the entry says *at the
    cmpxchg* -- the new frame, or nothing when the entry now names another
    domain or is read-only; a guest rewriting at every try gets "unstable"."""
    a, b, c = make_domain(), make_domain(), make_domain()
    table = a.grant_table
    old, new = a.alloc_pages(1), a.alloc_pages(1)
    old.mem[:3], new.mem[:3] = b"old", b"new"
    ref = table.get()
    table.grant_access(ref, b.domid, old.gfns[0])
    g = xen.domain_state(a.domid).gt
    off = g.entry_offset(ref)

    def to_new_frame() -> None:  # the guest re-grants another page: frame, then flags
        struct.pack_into("<I", xen.mem, off + 4, new.gfns[0])
        struct.pack_into("<H", xen.mem, off, PERMIT | 0x20)  # a flag bit changes too

    rewrite(to_new_frame)
    op = map1(b, a.domid, ref)
    assert op.status == abi.GNTST_okay
    assert read(b, op.host_addr >> 12, 3) == b"new"
    assert unmap1(b, op) == abi.GNTST_okay
    struct.pack_into("<H", xen.mem, off, PERMIT)

    def to_bystander() -> None:
        struct.pack_into("<H", xen.mem, off + 2, c.domid)

    rewrite(to_bystander)
    assert map1(b, a.domid, ref).status == abi.GNTST_general_error
    assert pins(xen, a.domid) == {} and not flags_of(xen, a.domid, ref) & INUSE
    struct.pack_into("<H", xen.mem, off + 2, b.domid)

    def to_readonly() -> None:
        struct.pack_into("<H", xen.mem, off, PERMIT | abi.GTF_readonly)

    rewrite(to_readonly)
    assert map1(b, a.domid, ref).status == abi.GNTST_general_error
    assert "r/o" in xen.debug_log[-1][3]
    struct.pack_into("<H", xen.mem, off, PERMIT)

    flip = iter(range(1, 10_000))

    def every_time() -> None:  # a flag bit toggled before each of the 5 tries
        struct.pack_into("<H", xen.mem, off, PERMIT | (0x20 if next(flip) % 2 else 0))

    rewrite(every_time, 5)
    assert map1(b, a.domid, ref).status == abi.GNTST_general_error
    assert "unstable" in xen.debug_log[-1][3]
    assert pins(xen, a.domid) == {} and not flags_of(xen, a.domid, ref) & INUSE


# ------------------------------------------------------------------- the soak
def test_randomized_soak_against_the_model_ends_without_leaks() -> None:
    """Threads, each with its own seeded RNG and a model of what it holds,
    share, map, copy, unmap and unshare against one hypervisor and one common
    granter (whose grants they all pin at once); every answer is the model's,
    and at the end nothing is left (xen.check_leaks())."""
    with xengrant.EmbeddedXen(memory=64 << 20) as xen:
        common = xen.create_domain()
        pool = common.grant_table.share_pages(0x7FF0, 1)  # placeholder domid, regranted below
        pool.unshare()
        threads = 4
        doms = [(xen.create_domain(), xen.create_domain()) for _ in range(threads)]
        # the common granter grants one read-only page to every backend
        cpage = common.alloc_pages(1)
        cpage.mem[:6] = b"common"
        crefs = {}
        for _front, back in doms:
            r = common.grant_table.get()
            common.grant_table.grant_access(r, back.domid, cpage.gfns[0], writable=False)
            crefs[back.domid] = r
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            front, back = doms[i]
            rng = random.Random(1000 + i)
            shares: list[xengrant.Share] = []
            maps: list[tuple[xengrant.Mapping, xengrant.Share | None]] = []
            try:
                for step in range(120):
                    what = rng.randrange(6)
                    if what == 0 or not shares:
                        s = front.grant_table.share_pages(back.domid, rng.randrange(1, 4))
                        s.mem[:4] = step.to_bytes(4, "little")
                        shares.append(s)
                    elif what == 1:
                        s = rng.choice(shares)
                        m = back.gnttab.map_domain_grant_refs(front.domid, s.refs)
                        assert bytes(m.mem[:4]) == bytes(s.mem[:4])  # model: same frames
                        maps.append((m, s))
                    elif what == 2:
                        m = back.gnttab.map_grant_ref(common.domid, crefs[back.domid], False)
                        assert bytes(m.mem[:6]) == b"common"
                        maps.append((m, None))
                    elif what == 3 and maps:
                        m, _s = maps.pop(rng.randrange(len(maps)))
                        m.unmap()
                    elif what == 4:
                        s = rng.choice(shares)
                        mapped = any(ms is s for _m, ms in maps)
                        try:
                            s.try_unshare()
                        except Busy:
                            assert mapped  # model: busy exactly while mapped
                            continue
                        assert not mapped
                        shares.remove(s)
                    else:
                        s = rng.choice(shares)
                        dst = bytearray(4)
                        seg = xengrant.CopySegment(
                            xengrant.GrantRef(front.domid, s.refs[0], 0), dst, 4
                        )
                        assert back.gnttab.grant_copy([seg]) == [abi.GNTST_okay]
                        assert dst == bytes(s.mem[:4])
                for m, _s in maps:
                    m.unmap()
                for s in shares:
                    s.unshare(timeout=10)
                back.gnttab.close()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert errors == []
        for r in crefs.values():
            common.grant_table.try_end_access(r, release_ref=True)
        cpage.free()
        xen.check_leaks()
