"""mirage-xen's grant API (``Xen_os.Xen.Export``/``Gntshr``) on ``Domain.grant_table``.

One test (or a few) per ``val`` of the seed document (mirage-xen-gntshr-api.txt):
``refs``, ``mapping``, ``share_pages``(``_exn``), ``try_unshare``, ``unshare``,
``get``, ``get_n``, ``put``, ``get_nonblock``, ``get_n_nonblock``,
``num_free_grants``, ``with_ref``, ``with_refs``, ``grant_access``,
``try_end_access``, ``end_access``, ``with_grant``, ``with_grants``.

Where mirage blocks on Lwt, the Python call blocks a thread; tests sequence
threads with events and semaphores hooked where the code waits or meets
``Busy``, never with sleeps.  Every test checks that nothing is left behind:
free grants, machine frames, maptrack handles, active grants.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from grant_helpers import (
    Dom,
    MakeDomain,
    Xen,
    active,
    busy_spy,
    flags,
    granted_page,
    in_use,
    wait_hook,
)
from xengrant import abi
from xengrant.errors import Busy, GrantError, GrantTableFull

PAGE = 4096
RESERVED = abi.GNTTAB_NR_RESERVED_ENTRIES  # refs 0..7
PERMIT = abi.GTF_permit_access
INUSE = abi.GTF_reading | abi.GTF_writing
#: a one-frame table: 512 v1 entries, 8 of them reserved
ONE_FRAME_REFS = abi.GRANT_PER_PAGE_V1 - RESERVED
#: guard against a hang if a waiter is never woken (not a timing assertion)
HANG = 30.0


@pytest.fixture
def small(make_domain: MakeDomain) -> tuple[Dom, Dom]:
    """A granter whose table can never grow past one frame, and a mapper."""
    return make_domain(max_grant_frames=1), make_domain()


def assert_clean(xen: Xen, granter: Dom, mapper: Dom, free_frames: int, free_refs: int) -> None:
    """Nothing left: frames, refs, pins and handles all as before."""
    assert xen.free_frames == free_frames
    assert granter.grant_table.num_free_grants() == free_refs
    assert active(xen, granter.domid) == 0
    assert in_use(xen, mapper.domid) == 0
    assert granter.grant_table.deferred == 0


@pytest.fixture
def hold_table(small: tuple[Dom, Dom]) -> Iterator[list[int]]:
    """Every ref of the one-frame granter, handed out (put back afterwards)."""
    table = small[0].grant_table
    yield table.get_n(ONE_FRAME_REFS)


def run_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # reported by the test
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: dict[str, Any]) -> Any:
    t.join(HANG)
    assert not t.is_alive(), "thread still blocked"
    if "error" in out:
        raise out["error"]
    return out.get("value")


# ------------------------------------------------------------------ share_pages
def test_share_pages_refs_and_one_contiguous_mapping(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.share_pages(back.domid, count=3, writable=True)
    # val refs: one ref per page, none reserved, all distinct
    assert len(share.refs) == 3 == len(set(share.refs)) == share.nr_pages
    assert all(r >= RESERVED for r in share.refs)
    assert share.domid == back.domid and share.writable
    # val mapping: one contiguous buffer of the three pages, zeroed
    assert len(share.mem) == 3 * PAGE and not share.mem.readonly
    assert bytes(share.mem) == bytes(3 * PAGE)
    assert xen.free_frames == frames - 3
    assert table.num_free_grants() == free - 3
    for i, ref in enumerate(share.refs):
        e = table.entry(ref)
        assert (e.flags, e.domid) == (PERMIT, back.domid)
        share.mem[i * PAGE : i * PAGE + 4] = bytes([i + 1]) * 4
    # the peer sees page i of the share behind refs[i]
    with back.gnttab.map_domain_grant_refs(front.domid, share.refs) as m:
        for i in range(3):
            assert bytes(m.mem[i * PAGE : i * PAGE + 4]) == bytes([i + 1]) * 4
        m.mem[PAGE + 100 : PAGE + 103] = b"abc"
        assert bytes(share.mem[PAGE + 100 : PAGE + 103]) == b"abc"
    share.unshare()
    assert share.released and share.refs == []
    assert_clean(xen, front, back, frames, free)


def test_share_pages_readonly(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1, writable=False)
    ref = share.refs[0]
    assert flags(front, ref) == PERMIT | abi.GTF_readonly
    with pytest.raises(GrantError) as ei:
        back.gnttab.map_grant_ref(front.domid, ref, writable=True)
    # _set_status_v1: "Attempt to write-pin a r/o grant entry"
    assert ei.value.status == abi.GNTST_general_error
    share.mem[:2] = b"ro"  # the owner still writes its own page
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False) as m:
        assert bytes(m.mem[:2]) == b"ro"
        assert flags(front, ref) == PERMIT | abi.GTF_readonly | abi.GTF_reading
    share.unshare()
    assert in_use(xen, back.domid) == 0


def test_share_pages_table_full(xen: Xen, small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    assert table.max_nr_frames == 1
    assert table.num_free_grants() == ONE_FRAME_REFS == 504
    frames = xen.free_frames
    with pytest.raises(GrantTableFull) as ei:
        table.share_pages(back.domid, ONE_FRAME_REFS + 1)
    assert (ei.value.wanted, ei.value.free) == (ONE_FRAME_REFS + 1, ONE_FRAME_REFS)
    # nothing kept: no page, no ref
    assert xen.free_frames == frames
    assert table.num_free_grants() == ONE_FRAME_REFS
    # exactly the table's worth fits; then not a single page more
    share = table.share_pages(back.domid, ONE_FRAME_REFS)
    assert table.num_free_grants() == 0
    assert sorted(share.refs) == list(range(RESERVED, abi.GRANT_PER_PAGE_V1))
    with pytest.raises(GrantTableFull):
        table.share_pages(back.domid, 1)
    assert xen.free_frames == frames - ONE_FRAME_REFS
    share.unshare()
    assert_clean(xen, front, back, frames, ONE_FRAME_REFS)


def test_share_pages_full_because_refs_are_held(xen: Xen, small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    held = table.get_n(ONE_FRAME_REFS - 2)
    frames = xen.free_frames
    with pytest.raises(GrantTableFull):
        table.share_pages(back.domid, 3)
    assert xen.free_frames == frames and table.num_free_grants() == 2
    share = table.share_pages(back.domid, 2)
    assert table.num_free_grants() == 0
    share.unshare()
    table.put_n(held)
    assert table.num_free_grants() == ONE_FRAME_REFS


@pytest.mark.parametrize("count", [0, -1])
def test_share_pages_count_below_one_is_value_error(
    xen: Xen, pair: tuple[Dom, Dom], count: int
) -> None:
    # mirage answers `Grant_table_full for count=0 (get_n_nonblock 0 = []);
    # asking for no pages is a caller error here.
    front, back = pair
    frames, free = xen.free_frames, front.grant_table.num_free_grants()
    with pytest.raises(ValueError, match="count must be >= 1"):
        front.grant_table.share_pages(back.domid, count)
    assert xen.free_frames == frames and front.grant_table.num_free_grants() == free


def test_share_pages_exn_is_share_pages_raising(pair: tuple[Dom, Dom]) -> None:
    # share_pages_exn = share_pages that raises: the Python call always raises.
    front, back = pair
    with front.grant_table.share_pages(back.domid, 1) as share:
        assert len(share.refs) == 1
    assert share.released


def test_share_context_manager_unshares(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    frames, free = xen.free_frames, front.grant_table.num_free_grants()
    with front.grant_table.share_pages(back.domid, 2) as share:
        share.mem[:1] = b"x"
    assert share.released
    with pytest.raises(ValueError):
        share.mem[0]  # a released share's memory is gone
    assert_clean(xen, front, back, frames, free)


# ------------------------------------------------------------------ try_unshare
def test_try_unshare_stops_at_the_first_busy_ref(xen: Xen, small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    frames = xen.free_frames
    share = table.share_pages(back.domid, 3)
    r1, r2, r3 = share.refs
    m = back.gnttab.map_grant_ref(front.domid, r2)  # the 2nd of 3 refs
    with pytest.raises(Busy) as ei:
        share.try_unshare(release_refs=True)
    assert ei.value.refs == [r2, r3]
    # ref 1 ended and put back; refs 2 and 3 still granted and kept in t
    assert share.refs == [r2, r3] and not share.released
    assert flags(front, r1) == 0
    assert flags(front, r2) == PERMIT | INUSE
    assert flags(front, r3) == PERMIT
    assert table.num_free_grants() == ONE_FRAME_REFS - 2
    assert xen.free_frames == frames - 3  # pages kept until every ref ended
    share.mem[:2] = b"ok"  # memory still usable
    assert bytes(m.mem[:2]) == bytes(2)  # (m maps page 2, not page 1)
    m.unmap()
    share.try_unshare(release_refs=True)
    assert share.refs == [] and share.released
    assert flags(front, r2) == flags(front, r3) == 0
    assert_clean(xen, front, back, frames, ONE_FRAME_REFS)


def test_try_unshare_keep_refs(xen: Xen, small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    frames = xen.free_frames
    share = table.share_pages(back.domid, 3)
    refs = list(share.refs)
    share.try_unshare(release_refs=False)
    assert share.released and xen.free_frames == frames
    # access ended, but the refs are still ours until put
    assert all(flags(front, r) == 0 for r in refs)
    assert table.num_free_grants() == ONE_FRAME_REFS - 3
    table.grant_access(refs[0], back.domid, 0x100)  # reusable without get
    table.try_end_access(refs[0])
    for r in refs:
        table.put(r)
    assert table.num_free_grants() == ONE_FRAME_REFS


def test_try_unshare_twice_is_a_no_op(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    share.try_unshare()
    share.try_unshare()
    share.unshare()
    assert share.released


# ---------------------------------------------------------------------- unshare
def test_unshare_retries_until_the_peer_unmaps(
    xen: Xen, small: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch
) -> None:
    front, back = small
    table = front.grant_table
    frames = xen.free_frames
    share = table.share_pages(back.domid, 2)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[1])
    busy = threading.Event()
    attempts = busy_spy(monkeypatch, table, "_try_unshare", busy)

    def unmapper() -> None:
        assert busy.wait(HANG)
        m.unmap()

    t, out = run_thread(unmapper)
    share.unshare(release_refs=True, timeout=HANG)  # blocks until the thread unmaps
    joined(t, out)
    assert attempts[0] is False and attempts[-1] is True  # Busy first, done at last
    assert share.released
    assert_clean(xen, front, back, frames, ONE_FRAME_REFS)


def test_unshare_timeout_gives_busy(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    with pytest.raises(Busy):
        share.unshare(timeout=0)
    assert share.refs and not share.released
    m.unmap()
    share.unshare(timeout=0)
    assert share.released


# ---------------------------------------------------------------------- get/put
def test_get_and_put(small: tuple[Dom, Dom]) -> None:
    table = small[0].grant_table
    ref = table.get()
    assert RESERVED <= ref < abi.GRANT_PER_PAGE_V1
    assert table.num_free_grants() == ONE_FRAME_REFS - 1
    table.put(ref)
    assert table.num_free_grants() == ONE_FRAME_REFS
    refs = table.get_n(5)
    assert len(set(refs)) == 5 and ref in refs  # lowest free refs first
    assert table.get_n(0) == []
    table.put_n(refs)
    assert table.num_free_grants() == ONE_FRAME_REFS


def test_get_waits_while_full_and_put_wakes_it(
    small: tuple[Dom, Dom], hold_table: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = small[0].grant_table
    assert table.num_free_grants() == 0
    waiting = wait_hook(table, monkeypatch)
    t, out = run_thread(table.get)
    assert waiting.acquire(timeout=HANG)  # the getter is blocked on a full table
    assert t.is_alive()
    ref = hold_table[100]
    table.put(ref)
    assert joined(t, out) == ref
    assert table.num_free_grants() == 0


def test_get_n_waits_until_enough_are_put(
    small: tuple[Dom, Dom], hold_table: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = small[0].grant_table
    waiting = wait_hook(table, monkeypatch)
    t, out = run_thread(lambda: table.get_n(3))
    assert waiting.acquire(timeout=HANG)
    table.put(hold_table[0])
    # one free ref is not enough: the getter waits again, taking nothing
    assert waiting.acquire(timeout=HANG)
    assert table.num_free_grants() == 1
    table.put_n(hold_table[1:3])
    assert sorted(joined(t, out)) == sorted(hold_table[:3])
    assert table.num_free_grants() == 0


def test_get_timeout_and_impossible_counts(small: tuple[Dom, Dom], hold_table: list[int]) -> None:
    table = small[0].grant_table
    with pytest.raises(GrantTableFull):
        table.get(timeout=0)
    with pytest.raises(GrantTableFull):
        table.get_n(2, timeout=0)
    # more than the table can ever hold: fails at once rather than wait forever
    with pytest.raises(GrantTableFull) as ei:
        table.get_n(ONE_FRAME_REFS + 1)
    assert ei.value.free == ONE_FRAME_REFS
    assert table.num_free_grants() == 0


def test_put_errors(small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    ref = table.get()
    table.put(ref)
    with pytest.raises(ValueError, match="double put"):
        table.put(ref)
    for bad in (0, 1, RESERVED - 1, abi.GRANT_PER_PAGE_V1, -1):
        with pytest.raises(ValueError, match="reserved or outside"):
            table.put(bad)
    ref = table.get()
    table.grant_access(ref, back.domid, 0x100)
    with pytest.raises(ValueError, match="still granted"):
        table.put(ref)
    # put_n checks everything before freeing anything
    other = table.get()
    with pytest.raises(ValueError):
        table.put_n([other, ref])
    assert table.num_free_grants() == ONE_FRAME_REFS - 2
    table.try_end_access(ref)
    table.put_n([other, ref])
    assert table.num_free_grants() == ONE_FRAME_REFS


def test_get_nonblock(small: tuple[Dom, Dom], hold_table: list[int]) -> None:
    table = small[0].grant_table
    assert table.get_nonblock() is None
    table.put(hold_table[7])
    assert table.get_nonblock() == hold_table[7]
    assert table.get_nonblock() is None


def test_get_n_nonblock_all_or_nothing(small: tuple[Dom, Dom]) -> None:
    table = small[0].grant_table
    held = table.get_n(ONE_FRAME_REFS - 2)
    assert table.get_n_nonblock(3) == []
    assert table.num_free_grants() == 2  # no ref taken by the failed call
    got = table.get_n_nonblock(2)
    assert len(got) == 2 and table.num_free_grants() == 0
    assert table.get_n_nonblock(0) == []
    with pytest.raises(ValueError):
        table.get_n_nonblock(-1)
    table.put_n(got + held)
    assert table.num_free_grants() == ONE_FRAME_REFS


def test_num_free_grants_counts_growth(xen: Xen, make_domain: MakeDomain) -> None:
    dom = make_domain(max_grant_frames=2)
    table = dom.grant_table
    per = abi.GRANT_PER_PAGE_V1
    assert table.nr_frames == 1
    assert table.num_free_grants() == 2 * per - RESERVED
    refs = table.get_n(per - RESERVED + 1)  # one past the first frame
    assert table.nr_frames == 2
    assert table.num_free_grants() == per - 1
    assert xen.domain_state(dom.domid).gt.nr_grant_frames == 2
    table.put_n(refs)
    assert table.num_free_grants() == 2 * per - RESERVED


# ---------------------------------------------------------- with_ref/with_refs
def test_with_ref_returns_the_ref(small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    with table.with_ref() as ref:
        assert table.num_free_grants() == ONE_FRAME_REFS - 1
        table.grant_access(ref, back.domid, 0x100)
        table.try_end_access(ref)
    assert table.num_free_grants() == ONE_FRAME_REFS
    with pytest.raises(RuntimeError), table.with_ref():
        raise RuntimeError("the block failed")
    assert table.num_free_grants() == ONE_FRAME_REFS


def test_with_refs_returns_the_refs(small: tuple[Dom, Dom]) -> None:
    table = small[0].grant_table
    with table.with_refs(4) as refs:
        assert len(refs) == 4 and table.num_free_grants() == ONE_FRAME_REFS - 4
    assert table.num_free_grants() == ONE_FRAME_REFS
    with pytest.raises(KeyError), table.with_refs(2):
        raise KeyError("boom")
    assert table.num_free_grants() == ONE_FRAME_REFS


def test_with_ref_refuses_to_free_a_ref_still_granted(small: tuple[Dom, Dom]) -> None:
    # mirage's with_ref puts the ref whatever its entry says; freeing a
    # granted ref would let the next get() hand out a live grant.
    front, back = small
    table = front.grant_table
    with pytest.raises(ValueError, match="still granted"), table.with_ref() as ref:
        table.grant_access(ref, back.domid, 0x100)
    table.try_end_access(ref, release_ref=True)
    assert table.num_free_grants() == ONE_FRAME_REFS


# --------------------------------------------------------- with_grant(s)
def test_with_grant_grants_for_the_block(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page = front.alloc_pages(1)
    page.mem[:3] = b"wg!"
    ref = table.get()
    with table.with_grant(back.domid, False, ref, page.gfns[0]):
        e = table.entry(ref)
        assert (e.flags, e.domid, e.frame) == (PERMIT | abi.GTF_readonly, back.domid, page.gfns[0])
        with back.gnttab.map_grant_ref(front.domid, ref, writable=False) as m:
            assert bytes(m.mem[:3]) == b"wg!"
    assert flags(front, ref) == 0
    table.put(ref)  # with_grant ends access but does not free the ref
    page.free()
    assert in_use(xen, back.domid) == 0 and active(xen, front.domid) == 0


def test_with_grants_waits_for_the_peer_to_unmap(
    xen: Xen, pair: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch
) -> None:
    front, back = pair
    table = front.grant_table
    pages = front.alloc_pages(2)
    refs = table.get_n(2)
    busy = threading.Event()
    busy_spy(monkeypatch, table, "try_end_access", busy)
    with table.with_grants(back.domid, True, refs, pages.gfns):
        m = back.gnttab.map_domain_grant_refs(front.domid, refs)
        m.mem[PAGE : PAGE + 2] = b"hi"

        def unmapper() -> None:
            assert busy.wait(HANG)
            m.unmap()

        t, out = run_thread(unmapper)
    joined(t, out)  # the block's exit waited for the unmap
    assert bytes(pages.mem[PAGE : PAGE + 2]) == b"hi"
    assert all(flags(front, r) == 0 for r in refs)
    table.put_n(refs)
    pages.free()
    assert in_use(xen, back.domid) == 0


def test_with_grants_undoes_a_partial_grant(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    pages = front.alloc_pages(2)
    r1 = table.get()
    r2 = table.get()
    table.grant_access(r2, back.domid, pages.gfns[1])  # already granted
    with (
        pytest.raises(ValueError, match="already granted"),
        table.with_grants(back.domid, True, [r1, r2], pages.gfns),
    ):
        pytest.fail("block must not run")  # pragma: no cover
    assert flags(front, r1) == 0  # the grant made before the failure was ended
    assert flags(front, r2) == PERMIT  # the other one is not ours to end
    with (
        pytest.raises(ValueError, match="2 refs for 1 pages"),
        table.with_grants(back.domid, True, [r1, r2], pages.gfns[:1]),
    ):
        pass  # pragma: no cover
    table.try_end_access(r2)
    table.put_n([r1, r2])
    pages.free()


# ---------------------------------------------------------------- grant_access
def test_grant_access_writes_a_valid_entry(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page, ref = granted_page(front, back.domid)
    e = table.entry(ref)
    assert (e.ref, e.flags, e.domid, e.frame) == (ref, PERMIT, back.domid, page.gfns[0])
    assert not e.in_use
    page.mem[:4] = b"data"
    with back.gnttab.map_grant_ref(front.domid, ref) as m:
        assert bytes(m.mem[:4]) == b"data"
        assert table.entry(ref).in_use
    table.try_end_access(ref, release_ref=True)
    page.free()


def test_grant_access_errors(small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    ref = table.get()
    table.grant_access(ref, back.domid, 0x100)
    with pytest.raises(ValueError, match="already granted"):
        table.grant_access(ref, back.domid, 0x101)
    assert table.entry(ref).frame == 0x100  # the first grant is untouched
    for reserved in range(RESERVED):
        with pytest.raises(ValueError, match="reserved"):
            table.grant_access(reserved, back.domid, 0x100)
        assert flags(front, reserved) == 0
    free_ref = table.get()
    table.put(free_ref)
    with pytest.raises(ValueError, match="not allocated"):
        table.grant_access(free_ref, back.domid, 0x100)
    assert flags(front, free_ref) == 0
    with pytest.raises(ValueError):
        table.grant_access(abi.GRANT_PER_PAGE_V1, back.domid, 0x100)
    table.try_end_access(ref, release_ref=True)
    assert table.num_free_grants() == ONE_FRAME_REFS


# --------------------------------------------------- try_end_access/end_access
def test_try_end_access_busy_while_mapped(xen: Xen, small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    share_page, ref = granted_page(front, back.domid)
    m = back.gnttab.map_grant_ref(front.domid, ref)
    with pytest.raises(Busy) as ei:
        table.try_end_access(ref, release_ref=True)
    assert ei.value.refs == [ref]
    # nothing changed: still granted, still mapped, the ref not released
    assert flags(front, ref) == PERMIT | INUSE
    assert table.num_free_grants() == ONE_FRAME_REFS - 1
    m.mem[:1] = b"z"
    m.unmap()
    assert flags(front, ref) == PERMIT
    table.try_end_access(ref, release_ref=True)
    assert flags(front, ref) == 0
    assert table.num_free_grants() == ONE_FRAME_REFS
    assert bytes(share_page.mem[:1]) == b"z"
    share_page.free()
    assert in_use(xen, back.domid) == 0 and active(xen, front.domid) == 0


def test_release_ref_semantics(small: tuple[Dom, Dom]) -> None:
    front, back = small
    table = front.grant_table
    ref = table.get()
    table.grant_access(ref, back.domid, 0x100)
    table.try_end_access(ref, release_ref=False)
    # ended, still ours: grant it again without get()
    assert table.num_free_grants() == ONE_FRAME_REFS - 1
    table.grant_access(ref, back.domid, 0x101)
    table.try_end_access(ref, release_ref=True)
    assert table.num_free_grants() == ONE_FRAME_REFS
    # released: no longer ours to grant, end or put
    with pytest.raises(ValueError, match="not allocated"):
        table.grant_access(ref, back.domid, 0x100)
    with pytest.raises(ValueError, match="not allocated"):
        table.try_end_access(ref)
    with pytest.raises(ValueError, match="double put"):
        table.put(ref)


def test_end_access_retries_until_unmapped(
    xen: Xen, pair: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch
) -> None:
    front, back = pair
    table = front.grant_table
    free = table.num_free_grants()
    page, ref = granted_page(front, back.domid)
    m = back.gnttab.map_grant_ref(front.domid, ref)
    busy = threading.Event()
    calls = busy_spy(monkeypatch, table, "try_end_access", busy)

    def unmapper() -> None:
        assert busy.wait(HANG)
        m.unmap()

    t, out = run_thread(unmapper)
    table.end_access(ref, release_ref=True, timeout=HANG)
    joined(t, out)
    assert calls[0] is False and calls[-1] is True
    assert flags(front, ref) == 0 and table.num_free_grants() == free
    page.free()
    assert in_use(xen, back.domid) == 0


def test_end_access_timeout(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page, ref = granted_page(front, back.domid)
    with back.gnttab.map_grant_ref(front.domid, ref):
        with pytest.raises(Busy):
            table.end_access(ref, timeout=0)
        assert flags(front, ref) == PERMIT | INUSE
    table.end_access(ref, release_ref=True, timeout=0)
    assert flags(front, ref) == 0
    page.free()
