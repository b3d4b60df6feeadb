"""The bulk paths (whole runs of frames, refs and gfns at once) do what the per-item rules do.

Big buffers (a 64 MiB page directory is 16384 pages) go through bulk paths:
``populate_physmap`` and ``decrease_reservation`` over runs of frames, the
byte-map frame and gfn allocators, and the guest's C runs over v1 entries
(``grant_run``, ``end_run``, ``put_run``).  Each test here checks one of them
against an independent per-item model, or checks the edge where a bulk path
hands over to the per-item one (a busy entry, a duplicate, a gfn in use).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xengrant
from xengrant import abi
from xengrant.emu.domain import P2M_RAM_RW
from xengrant.emu.hypervisor import Hypervisor
from xengrant.emu.machine import NO_OWNER, Machine
from xengrant.guest.memory import GfnAllocator

PAGE = 4096
NR_FRAMES = 256


def _hv() -> tuple[Hypervisor, int]:
    mem = memoryview(bytearray(NR_FRAMES * PAGE))
    hv = Hypervisor(mem, NR_FRAMES)
    return hv, hv.create_domain(max_pages=120)


def _populate_model(
    hv: Hypervisor, domid: int, gfns: list[int], free: list[int]
) -> list[int]:
    """populate_physmap (xen/common/memory.c) one extent at a time, lowest free frame first."""
    d = hv.domains[domid]
    done = []
    for gfn in gfns:
        if d.tot_pages >= d.max_pages or not free or gfn < 0 or gfn in d.p2m:
            break
        mfn = free.pop(0)
        d.p2m[gfn] = (mfn, P2M_RAM_RW)
        d.tot_pages += 1
        done.append(gfn)
    return done


gfn_lists = st.lists(st.integers(-2, 40), max_size=40)


@settings(max_examples=150, deadline=None)
@given(first=gfn_lists, second=gfn_lists, drop=gfn_lists)
def test_populate_and_decrease_match_the_per_extent_rules(
    first: list[int], second: list[int], drop: list[int]
) -> None:
    hv, d = _hv()
    ref, rd = _hv()
    for gfns in (first, second):
        free = [m for m in range(1, NR_FRAMES) if ref.machine.owner[m] == NO_OWNER]
        want = _populate_model(ref, rd, gfns, free)
        for mfn in (m for g, (m, _) in ref.domains[rd].p2m.items() if g in want):
            ref.machine.owner[mfn] = rd
        assert hv.populate_physmap(d, gfns) == want
    assert {g: m for g, (m, _) in hv.domains[d].p2m.items()} == {
        g: m for g, (m, _) in ref.domains[rd].p2m.items()
    }
    dom = hv.domains[d]
    # decrease_reservation: stops at the first gfn that is not (any more) RAM
    expect = 0
    gone: set[int] = set()
    for gfn in drop:
        if gfn not in dom.p2m or gfn in gone:
            break
        gone.add(gfn)
        expect += 1
    before_free = hv.machine.free_frames
    mfns = [dom.p2m[g][0] for g in gone]
    assert hv.decrease_reservation(d, drop) == expect
    assert not gone & dom.p2m.keys()
    assert dom.tot_pages == len(dom.p2m)
    assert hv.machine.free_frames == before_free + len(gone)
    assert all(hv.machine.owner[m] == NO_OWNER and hv.machine.refcount[m] == 0 for m in mfns)


def test_machine_allocates_lowest_first_and_scrubs_runs() -> None:
    mem = memoryview(bytearray(64 * PAGE))
    m = Machine(mem, 64)
    a = m.alloc(7, 20)
    assert a == list(range(1, 21))
    mem[2 * PAGE : 12 * PAGE] = b"\xaa" * (10 * PAGE)
    assert m.disown_many([2, 3, 4, 9, 10, 11]) == 6
    assert bytes(mem[2 * PAGE : 12 * PAGE]).count(0) == 6 * PAGE  # freed frames scrubbed
    assert bytes(mem[5 * PAGE : 9 * PAGE]) == b"\xaa" * (4 * PAGE)  # the others untouched
    assert m.alloc(8, 4) == [2, 3, 4, 9]  # lowest first, across runs
    assert m.alloc(8, 1) == [10]
    assert m.free_frames == 63 - 20 + 6 - 5
    m.get(5)  # a mapper's reference: the owner's disown must not free it
    assert m.disown_many(list(range(5, 9))) == 3
    assert m.owner[5] == NO_OWNER and m.refcount[5] == 1
    assert m.put(5) is True and m.refcount[5] == 0


def test_gfn_allocator_reuses_the_lowest_run() -> None:
    g = GfnAllocator(0x100)
    a = g.alloc(8)
    assert a == list(range(0x100, 0x108))
    g.free([0x101, 0x102, 0x104, 0x105, 0x106])
    assert g.alloc(3) == [0x104, 0x105, 0x106]  # the first run long enough
    assert g.alloc(3) == [0x108, 0x109, 0x10A]  # none left that long: fresh gfns
    assert g.alloc(1) == [0x101]
    assert g.alloc(0) == []


@pytest.fixture
def share_and_map(
    pair: tuple[xengrant.Domain, xengrant.Domain],
) -> Callable[[int, list[int]], tuple[xengrant.Share, list[xengrant.Mapping]]]:
    granter, mapper = pair

    def make(n: int, mapped: list[int]) -> tuple[xengrant.Share, list[xengrant.Mapping]]:
        share = granter.gntshr.share_pages(mapper.domid, n)
        maps = [mapper.gnttab.map_grant_ref(granter.domid, share.refs[i]) for i in mapped]
        return share, maps

    return make


def test_gntshr_unshare_defers_only_the_busy_refs(
    xen: xengrant.EmbeddedXen,
    pair: tuple[xengrant.Domain, xengrant.Domain],
    share_and_map: Callable[[int, list[int]], tuple[xengrant.Share, list[xengrant.Mapping]]],
) -> None:
    granter, _ = pair
    gt = granter.grant_table
    free_refs, free_frames = gt.num_free_grants(), xen.free_frames
    share, maps = share_and_map(64, [10, 40, 63])
    busy = [share.refs[i] for i in (10, 40, 63)]
    granter.gntshr.unshare(share)
    assert gt.deferred == 3  # the end_run stopped at each busy ref; the rest ended
    assert gt.num_free_grants() == free_refs - 3
    assert [gt.entry(r).flags & abi.GTF_type_mask for r in busy] == [abi.GTF_permit_access] * 3
    for m in maps:
        m.unmap()
    assert gt.reap_deferred() == 0
    assert gt.num_free_grants() == free_refs
    assert xen.free_frames == free_frames  # the pages went once the last ref ended


def test_unshare_ends_the_idle_prefix_then_raises_busy(
    pair: tuple[xengrant.Domain, xengrant.Domain],
    share_and_map: Callable[[int, list[int]], tuple[xengrant.Share, list[xengrant.Mapping]]],
) -> None:
    granter, _ = pair
    share, maps = share_and_map(32, [20])
    with pytest.raises(xengrant.Busy) as e:
        share.try_unshare()
    assert e.value.refs == share.refs and len(share.refs) == 12  # refs 0..19 ended and freed
    maps[0].unmap()
    share.unshare()
    assert share.refs == [] and granter.grant_table.deferred == 0


def test_put_n_is_all_or_nothing(pair: tuple[xengrant.Domain, xengrant.Domain]) -> None:
    granter, mapper = pair
    gt = granter.grant_table
    refs = gt.get_n(4)
    before = gt.num_free_grants()
    with pytest.raises(ValueError, match="double put"):
        gt.put_n([refs[0], refs[1], refs[0]])
    gt.grant_access(refs[2], mapper.domid, 0x123)
    with pytest.raises(ValueError, match="still granted"):
        gt.put_n(refs)
    assert gt.num_free_grants() == before  # nothing went back
    gt.try_end_access(refs[2])
    gt.put_n(refs)
    assert gt.num_free_grants() == before + 4
    assert sorted(gt.get_n(4)) == sorted(refs)  # each once on the free list


def test_share_pages_undoes_a_failed_grant(
    xen: xengrant.EmbeddedXen,
    pair: tuple[xengrant.Domain, xengrant.Domain],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    granter, mapper = pair
    gt = granter.grant_table
    free_refs, free_frames = gt.num_free_grants(), xen.free_frames

    def half(frames: object, refs: list[int], gfns: list[int], *args: object) -> int:
        # the C run gives up half way, and the Python path then finds the
        # next entry already granted (what a corrupted free list would do)
        from xengrant._cext import grant_run

        done = int(grant_run(frames, refs[:5], gfns[:5], *args))
        gt._write_entry(refs[5], mapper.domid, 0x42, True)
        return done

    monkeypatch.setattr("xengrant.guest.sharing.grant_run", half)
    with pytest.raises(ValueError, match="already granted"):
        gt.share_pages(mapper.domid, 16)
    monkeypatch.undo()
    assert xen.free_frames == free_frames
    # the ref someone else granted stays allocated (freeing it would hand out
    # a live grant); every other ref is back and no other entry is granted
    (stolen,) = [e.ref for e in gt.entries()]
    assert gt.num_free_grants() == free_refs - 1
    gt.try_end_access(stolen, release_ref=True)
    assert gt.num_free_grants() == free_refs


def test_translate_of_many_gfns_faults_on_the_first_culprit(
    xen: xengrant.EmbeddedXen, pair: tuple[xengrant.Domain, xengrant.Domain]
) -> None:
    granter, mapper = pair
    share = granter.grant_table.share_pages(mapper.domid, 4)
    m = mapper.grant_table.map_grants([(granter.domid, r) for r in share.refs], writable=False)
    gfns = list(m.resource)
    hv = xen.hv
    mfns = hv.translate(mapper.domid, gfns, False)
    assert mfns == hv.translate(granter.domid, share.resource.gfns, True)
    with pytest.raises(xengrant.HypercallError) as e:
        hv.translate(mapper.domid, gfns, True)  # read-only grant mappings
    assert e.value.errno == 14 and f"gfn {gfns[0]:#x} is a read-only" in str(e.value)
    hole = gfns[-1] + 1000
    with pytest.raises(xengrant.HypercallError) as e:
        hv.translate(mapper.domid, [*gfns, hole], False)
    assert e.value.errno == 14 and f"gfn {hole:#x} not mapped" in str(e.value)
    m.unmap()
    share.unshare()


@pytest.mark.parametrize(
    "pick",
    [
        lambda fs: fs[:12],  # one run, nobody else holds them: the bulk path
        lambda fs: fs[2:6] + fs[9:17],  # two runs
        lambda fs: fs[::2],  # no runs longer than one
        lambda fs: fs[:3],  # below the bulk threshold
        lambda fs: fs[18:20] + fs[:10],  # a run with a frame someone else holds (19)
    ],
)
def test_disown_many_matches_disown_one_at_a_time(pick: Callable[[list[int]], list[int]]) -> None:
    """Machine.disown_many frees whole runs at once; owners, refcounts, the free count
    and what alloc hands out next are those of disown frame by frame."""
    worlds = []
    for bulk in (True, False):
        m = Machine(memoryview(bytearray(64 * PAGE)), 64)
        frames = m.alloc(1, 20)
        drop = pick(frames)
        m.get(frames[19])  # a frame someone else holds too stays
        if len(drop) < 8:
            drop = [*drop, frames[19]]
        if bulk:
            m.disown_many(drop)
        else:
            for mfn in drop:
                m.disown(mfn)
        worlds.append((list(m.owner), list(m.refcount), m.free_frames, m.alloc(2, 3)))
    assert worlds[0] == worlds[1]
    assert len(worlds[0][1]) == 64


def test_bulk_populate_stops_at_a_gfn_in_use_early_in_the_list(
    make_domain: Callable[..., xengrant.Domain],
) -> None:
    """populate_physmap's bulk check hands a list with a gfn in use to the per-gfn
    loop: the extents before it are done, even a single one."""
    dom = make_domain()
    (taken,) = dom.hypercalls.populate_physmap([0x50001])
    gfns = [0x50000, taken, *range(0x50002, 0x5000A)]
    assert dom.hypercalls.populate_physmap(gfns) == [0x50000]
    assert dom.hypercalls.populate_physmap([0x50000, *gfns[2:]]) == []  # first one in use
    assert dom.hypercalls.populate_physmap(gfns[2:]) == gfns[2:]


def test_bulk_decrease_with_a_table_frame_among_ram(
    xen: xengrant.EmbeddedXen, make_domain: Callable[..., xengrant.Domain]
) -> None:
    """decrease_reservation of RAM and a grant-table gfn: the RAM is freed, the
    table frame only leaves the physmap (guest_remove_page), still the table's."""
    from xengrant.guest.memory import GNTTAB_GFN_BASE

    dom = make_domain()
    gt = dom.grant_table  # frame 0 at GNTTAB_GFN_BASE
    ram = dom.hypercalls.populate_physmap(list(range(0x51000, 0x51009)))
    st = xen.domain_state(dom.domid)
    table_mfn = st.gt.shared[0]
    free, pages = xen.free_frames, st.tot_pages
    assert dom.hypercalls.decrease_reservation([*ram, GNTTAB_GFN_BASE]) == 10
    assert xen.free_frames == free + 9
    assert st.tot_pages == pages - 9
    assert GNTTAB_GFN_BASE not in st.p2m
    assert xen.hv.machine.owner[table_mfn] == dom.domid
    assert xen.hv.machine.refcount[table_mfn] >= 1
    del gt


def test_populate_refused_by_the_machine_backing_takes_nothing(
    xen: xengrant.EmbeddedXen,
    make_domain: Callable[..., xengrant.Domain],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine whose backing refuses frames (a service's file limit) raises
    OutOfMemory from alloc: populate_physmap populates nothing and says so."""
    from xengrant.emu.machine import OutOfMemory

    dom = make_domain()
    st = xen.domain_state(dom.domid)
    pages, free = st.tot_pages, xen.free_frames

    def refuse(owner: int, count: int = 1) -> list[int]:
        raise OutOfMemory("backing refused")

    monkeypatch.setattr(xen.hv.machine, "alloc", refuse)
    for n in (1, 16):
        assert dom.hypercalls.populate_physmap(list(range(0x52000, 0x52000 + n))) == []
    with pytest.raises(MemoryError):
        dom.alloc_pages(2)
    assert st.tot_pages == pages and xen.free_frames == free


def test_disown_many_keeps_a_held_frame_inside_one_run() -> None:
    """One run of 12 frames, the sixth held by a mapper too: it stays allocated (refcount
    1 left), the other eleven are freed -- as disown does frame by frame."""
    m = Machine(memoryview(bytearray(64 * PAGE)), 64)
    frames = m.alloc(1, 12)
    m.get(frames[5])
    free = m.free_frames
    assert m.disown_many(frames) == 11
    assert m.refcount[frames[5]] == 1 and m.free_frames == free + 11
    assert [m.refcount[f] for f in frames if f != frames[5]] == [0] * 11
