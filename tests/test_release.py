"""Releasing without blocking or leaking (issue #18's mission pieces).

- A Share's context-manager exit never blocks: a page the peer still maps has
  its end of access deferred, as Linux ``gnttab_end_foreign_access`` does, and
  the block's exception surfaces.
- The reaper retries deferred ends every second (Linux ``deferred_timer`` /
  ``gnttab_handle_deferred``), is cancellable and leaves no thread behind.
- Free callbacks (Linux ``gnttab_request_free_callback`` /
  ``gnttab_cancel_free_callback``), ``with_grant(s)_async``.
- ``xen.check_leaks()`` names every leaked ref, page, mapping and pin.
- A dropped ``Pages`` gives its frames back (and warns).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

import xengrant
from grant_helpers import Dom, Xen, grant, map1, unmap1
from xengrant import abi
from xengrant.errors import Busy
from xengrant.guest import deferred as deferred_mod


class Boom(Exception):
    pass


@pytest.fixture
def fast_reaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper ticks every 10 ms instead of every second (tests wait on
    events, never on the clock)."""
    monkeypatch.setattr(deferred_mod, "REAP_INTERVAL", 0.01)


def _reaped(table: xengrant.GrantTable, want_free: int) -> threading.Event:
    """An event set once ``want_free`` refs are free again (a free callback)."""
    ev = threading.Event()
    table.request_free_callback(ev.set, want_free)
    return ev


def test_share_exit_defers_a_busy_page_and_the_block_exception_surfaces(
    xen: Xen, pair: tuple[Dom, Dom], fast_reaper: None
) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    with pytest.raises(Boom), table.share_pages(back.domid, 2) as share:
        m = back.gnttab.map_grant_ref(front.domid, share.refs[1])
        raise Boom
    # exit returned at once: page 0 ended, page 1 deferred while mapped
    assert share.released and table.deferred == 1
    assert any("end of access deferred" in line for line in xen.leaks())
    done = _reaped(table, free)
    m.unmap()
    assert done.wait(30)  # the reaper, not a call on the table, freed it
    assert table.deferred == 0
    assert table.num_free_grants() == free
    assert xen.free_frames == frames
    xen.check_leaks()


def test_async_share_exit_does_not_block_the_loop(
    xen: Xen, pair: tuple[Dom, Dom], fast_reaper: None
) -> None:
    front, back = pair
    table = front.grant_table
    free = table.num_free_grants()

    async def main() -> xengrant.Mapping:
        async with table.share_pages(back.domid, 1) as share:
            m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
        return m

    m = asyncio.run(main())
    assert table.deferred == 1
    done = _reaped(table, free)
    m.unmap()
    assert done.wait(30)
    xen.check_leaks()


def test_mapping_exit_with_a_live_view_lets_the_block_exception_surface(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    with pytest.raises(Boom), back.gnttab.map_grant_ref(front.domid, share.refs[0]) as m:
        arr = np.frombuffer(m.mem, dtype=np.uint8)
        raise Boom
    assert not m.released  # the array still uses it: unmapped once it goes
    del arr
    assert front.grant_table.reap_deferred() == 0 or back.grant_table.reap_deferred() == 0
    back.grant_table.reap_deferred()
    assert m.released
    share.unshare()
    xen.check_leaks()


def test_mapping_exit_without_exception_still_refuses_with_a_live_view(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    arr = np.frombuffer(m.mem, dtype=np.uint8)
    with pytest.raises(BufferError), m:
        pass
    del arr
    m.unmap()
    share.unshare()
    xen.check_leaks()


# ------------------------------------------------------------------ reaper
def test_reaper_is_cancellable_and_leaves_no_thread(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    ref, gfn = grant(front, back.domid)
    op = map1(back, front.domid, ref)
    assert not table.end_access_deferred(ref)
    timer = table._reaper
    assert table.reaper_pending and timer is not None and timer.is_alive()
    table.stop_reaper()
    assert not table.reaper_pending and not timer.is_alive()
    assert unmap1(back, op) == abi.GNTST_okay
    back.put_pages([op.host_addr >> 12])
    assert table.deferred == 1  # stopped: nothing retries on its own
    assert table.reap_deferred() == 0
    front.hypercalls.decrease_reservation([gfn])
    xen.check_leaks()


def test_reaper_stops_ticking_when_nothing_is_pending(
    xen: Xen, pair: tuple[Dom, Dom], fast_reaper: None
) -> None:
    front, back = pair
    table = front.grant_table
    ref, gfn = grant(front, back.domid)
    op = map1(back, front.domid, ref)
    free = table.num_free_grants()
    table.end_access_deferred(ref)
    done = _reaped(table, free + 1)
    assert unmap1(back, op) == abi.GNTST_okay
    back.put_pages([op.host_addr >> 12])
    assert done.wait(30)
    for t in threading.enumerate():  # the last tick's thread ends right after
        if t.name == f"xengrant-reaper-d{front.domid}" and t is not threading.current_thread():
            t.join(30)
    assert not table.reaper_pending
    front.hypercalls.decrease_reservation([gfn])
    xen.check_leaks()


# ---------------------------------------------------------- free callbacks
def test_free_callback_runs_once_when_enough_refs_are_free(make_domain: object) -> None:
    with xengrant.EmbeddedXen(memory=16 << 20, max_grant_frames=1) as xen:
        a = xen.create_domain()
        table = a.grant_table
        refs = table.get_n(table.num_free_grants())
        calls: list[int] = []
        cb = table.request_free_callback(lambda: calls.append(table.num_free_grants()), 2)
        table.put(refs.pop())
        assert calls == [] and not cb.done
        table.put_n([refs.pop(), refs.pop()])
        assert calls == [3] and cb.done
        table.put(refs.pop())
        assert calls == [3]  # one-shot
        assert not cb.cancel()  # already ran
        # already satisfied: runs at once
        now: list[bool] = []
        table.request_free_callback(lambda: now.append(True), 1)
        assert now == [True]
        # cancelled: never runs
        held = table.get_n(table.num_free_grants())
        late: list[bool] = []
        cb2 = table.request_free_callback(lambda: late.append(True), 1)
        assert cb2.cancel()
        table.put_n(held)
        assert late == []
        table.put_n(refs)
        xen.check_leaks()


def test_free_callback_may_take_refs_and_its_exception_is_contained(
    xen: Xen, pair: tuple[Dom, Dom], caplog: pytest.LogCaptureFixture
) -> None:
    a, _b = pair
    table = a.grant_table
    taken: list[int] = []

    def grab() -> None:
        taken.extend(table.get_n_nonblock(2))

    table.request_free_callback(grab, 2)
    assert len(taken) == 2
    table.request_free_callback(lambda: 1 / 0, 1)  # logged, not raised
    assert "free callback" in caplog.text
    table.put_n(taken)
    xen.check_leaks()


# -------------------------------------------------------- with_grant(s)_async
def test_with_grants_async(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    pages = front.alloc_pages(2)
    refs = table.get_n(2)
    pages.mem[:3] = b"abc"

    async def main() -> bytes:
        async with table.with_grants_async(back.domid, False, refs, pages.gfns):
            with back.gnttab.map_domain_grant_refs(front.domid, refs, writable=False) as m:
                got = bytes(m.mem[:3])
        async with table.with_grant_async(back.domid, True, refs[0], pages.gfns[0]):
            assert table.entry(refs[0]).type == abi.GTF_permit_access
        return got

    assert asyncio.run(main()) == b"abc"
    assert [table.entry(r).flags for r in refs] == [0, 0]
    table.put_n(refs)
    pages.free()
    xen.check_leaks()


def test_with_grant_async_timeout_defers_instead_of_leaking(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    front, back = pair
    table = front.grant_table
    pages = front.alloc_pages(1)
    ref = table.get()
    box: list[xengrant.Mapping] = []

    async def main() -> None:
        async with table.with_grant_async(back.domid, True, ref, pages.gfns[0], timeout=0.01):
            box.append(back.gnttab.map_grant_ref(front.domid, ref))

    with pytest.raises(Busy):
        asyncio.run(main())
    assert table.deferred == 1
    table.stop_reaper()
    box[0].unmap()
    assert table.reap_deferred() == 0
    assert table.entry(ref).flags == 0
    table.put(ref)
    pages.free()
    xen.check_leaks()


def test_with_grant_timeout_defers_instead_of_leaking(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    """The blocking with_grant takes timeout= too: Busy (a TimeoutError) when the
    peer still maps the page, and the end of access is deferred, not leaked."""
    front, back = pair
    table = front.grant_table
    pages = front.alloc_pages(2)
    refs = table.get_n(2)
    box: list[xengrant.Mapping] = []
    with pytest.raises(Busy) as e, table.with_grants(back.domid, True, refs, pages.gfns,
                                                     timeout=0.01):
        box.append(back.gnttab.map_grant_ref(front.domid, refs[0]))
    assert isinstance(e.value, TimeoutError)
    assert table.deferred == 1  # the busy one; the one after it, not mapped, ended at once
    assert table.entry(refs[1]).flags == 0
    table.stop_reaper()
    box[0].unmap()
    assert table.reap_deferred() == 0
    assert [table.entry(r).flags for r in refs] == [0, 0]
    table.put_n(refs)
    pages.free()
    xen.check_leaks()


# --------------------------------------------------------------- leak check
def test_check_leaks_names_every_leak(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    xen.check_leaks()
    share = front.grant_table.share_pages(back.domid, 1)
    spare = front.grant_table.get()
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    pages = back.alloc_pages(1)
    with pytest.raises(xengrant.LeakError) as ei:
        xen.check_leaks()
    text = "\n".join(ei.value.leaks)
    r = share.refs[0]
    assert f"d{front.domid} ref {r}: still granted to d{back.domid}" in text
    assert f"d{front.domid} ref {r}: pinned for d{back.domid}" in text
    assert f"d{back.domid} handle 0: maps d{front.domid} ref {r}" in text
    assert f"d{front.domid} ref {spare}: handed out and never put back" in text
    assert f"d{back.domid}: 1 page(s) allocated and not freed" in text
    assert f"d{back.domid}: 1 hole(s) for foreign mappings not put back" in text
    assert "RAM page(s) still populated" in text
    assert back.leaks() and front.leaks()
    m.unmap()
    share.unshare()
    front.grant_table.put(spare)
    pages.free()
    xen.check_leaks()
    assert front.leaks() == back.leaks() == []


# ------------------------------------------------------------ dropped Pages
def test_a_dropped_pages_gives_its_frames_back(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, _back = pair
    frames = xen.free_frames
    pages = front.alloc_pages(3)
    pages.mem[:2] = b"hi"
    with pytest.warns(ResourceWarning, match="unfreed Pages"):
        del pages
        gc.collect()
    assert xen.free_frames == frames
    xen.check_leaks()


def test_a_dropped_pages_with_a_live_array_goes_with_the_array(
    xen: Xen, pair: tuple[Dom, Dom]
) -> None:
    front, _back = pair
    frames = xen.free_frames
    pages = front.alloc_pages(1)
    arr = np.frombuffer(pages.mem, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del pages
        gc.collect()
    assert xen.free_frames == frames - 1
    arr[0] = 1  # still valid memory
    del arr
    front.grant_table.reap_deferred()
    assert xen.free_frames == frames
    xen.check_leaks()


@pytest.fixture(autouse=True)
def _no_reaper_left(xen: Xen) -> Iterator[None]:
    yield
    for d in list(xen._guests.values()):
        if d._grant_table is not None:
            d._grant_table.stop_reaper()
