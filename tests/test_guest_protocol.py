"""Xen's 2004 grant-table protocol, the libxengnttab/libxengntshr surface, buffers,
asyncio twins and ResourceWarning.

- **2004 header** (xen-2004-grant-table-h.txt): an entry is ``(u16 flags, u16
  domid, u32 frame)`` little-endian in a frame shared with Xen; it is
  introduced by writing domid, frame, a write barrier, then flags; removed by a
  cmpxchg of the flags to 0 that fails while ``GTF_reading``/``GTF_writing``
  is set; made read-only by a cmpxchg checking ``!GTF_writing``, writable by
  a bit operation.  The tests read the entries' bytes from the guest's own
  view of its table frames and from the hypervisor's side.
- **libxengnttab**: ``map_grant_refs`` from several domains into one
  contiguous buffer, all or nothing; ``map_domain_grant_refs``;
  ``grant_copy`` both directions.  **libxengntshr**: ``share_pages`` /
  ``unshare``, which never blocks (a still-mapped page is freed when the peer
  unmaps, as gntalloc defers the end of access).
- **Buffers**: ``mem`` is a memoryview numpy wraps with no copy; unmapping
  refuses while such views are alive; read-only maps refuse writes; a
  released object's ``mem`` raises ``ValueError``.
- **asyncio twins** run under ``asyncio.run`` in plain tests; waits are
  sequenced with events hooked where the code waits or meets ``Busy``.
- **ResourceWarning** for a Share or Mapping dropped unreleased, and nothing
  leaks afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import inspect
import struct
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import xengrant
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
from xengrant import CopySegment, GrantRef, abi
from xengrant.emu.domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW
from xengrant.errors import BatchError, Busy, GrantError, GrantTableFull
from xengrant.guest import free_list as free_list_mod
from xengrant.guest import gnttab as gnttab_mod
from xengrant.guest.memory import GNTTAB_GFN_BASE
from xengrant.portable import EmulatedGntshr, EmulatedGnttab, Gntshr, Gnttab

PAGE = 4096
PER = abi.GRANT_PER_PAGE_V1
RESERVED = abi.GNTTAB_NR_RESERVED_ENTRIES
PERMIT = abi.GTF_permit_access
RO = abi.GTF_readonly
READING = abi.GTF_reading
WRITING = abi.GTF_writing
INUSE = READING | WRITING
ENTRY = struct.Struct("<HHI")  # grant_entry_t of 2004 (and v1 today)
HANG = 30.0


def guest_entry_bytes(dom: Dom, ref: int) -> bytes:
    """The 8 bytes of v1 entry ``ref``, read through the guest's view of its table frame."""
    view = dom.view([GNTTAB_GFN_BASE + ref // PER], False)
    mv = memoryview(view)
    out = bytes(mv[(ref % PER) * 8 : (ref % PER) * 8 + 8])
    mv.release()
    view.close()
    return out


def xen_entry_bytes(xen: Xen, domid: int, ref: int) -> bytes:
    """The same entry as the hypervisor reads it from machine memory."""
    off = xen.domain_state(domid).gt.entry_offset(ref)
    return bytes(xen.mem[off : off + 8])


def grant_maps(xen: Xen, domid: int) -> list[int]:
    """The mapper's gfns holding a foreign grant mapping."""
    p2m = xen.domain_state(domid).p2m
    return [g for g, (_mfn, t) in p2m.items() if t in (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO)]


# =================================================================== 2004 header
def test_header_constants_and_layout() -> None:
    assert (abi.GTF_invalid, abi.GTF_permit_access, abi.GTF_accept_transfer) == (0, 1, 2)
    assert abi.GTF_type_mask == 3
    assert abi.GTF_readonly == 1 << 2
    # the 2004 header defined both as 1<<_GTF_inuse (undefined); today: bits 3, 4
    assert (abi.GTF_reading, abi.GTF_writing) == (1 << 3, 1 << 4)
    e = abi.grant_entry_v1
    assert (e.flags.offset, e.domid.offset, e.frame.offset) == (0, 2, 4)
    assert ctypes.sizeof(e) == 8


@pytest.mark.parametrize("writable", [True, False])
def test_entry_bytes_after_grant_access(xen: Xen, pair: tuple[Dom, Dom], writable: bool) -> None:
    front, back = pair
    table = front.grant_table
    page = front.alloc_pages(1)
    ref = table.get()
    assert guest_entry_bytes(front, ref) == bytes(8)
    table.grant_access(ref, back.domid, page.gfns[0], writable)
    want_flags = PERMIT | (0 if writable else RO)
    want = ENTRY.pack(want_flags, back.domid, page.gfns[0])
    assert guest_entry_bytes(front, ref) == want
    assert xen_entry_bytes(xen, front.domid, ref) == want  # the same shared frame
    e = table.entry(ref)
    assert (e.flags, e.domid, e.frame) == ENTRY.unpack(want)
    # Xen marks the entry in use in the same bytes
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
        assert guest_entry_bytes(front, ref) == ENTRY.pack(
            want_flags | READING, back.domid, page.gfns[0]
        )
    table.try_end_access(ref, release_ref=True)
    # removal clears the flags only: domid and frame stay, the entry is invalid
    assert guest_entry_bytes(front, ref) == ENTRY.pack(0, back.domid, page.gfns[0])
    page.free()


def test_entry_in_a_later_table_frame(xen: Xen, make_domain: MakeDomain) -> None:
    front, back = make_domain(max_grant_frames=2), make_domain()
    table = front.grant_table
    held = table.get_n(PER - RESERVED)  # the whole first frame
    ref = table.get()
    assert ref >= PER and table.nr_frames == 2
    table.grant_access(ref, back.domid, 0x1234, writable=False)
    want = ENTRY.pack(PERMIT | RO, back.domid, 0x1234)
    assert guest_entry_bytes(front, ref) == want == xen_entry_bytes(xen, front.domid, ref)
    table.try_end_access(ref, release_ref=True)
    table.put_n(held)


class Recorder:
    """Records the atomic stores and barriers ``GrantTable`` issues on entries."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, int, int]] = []
        for name in ("store16", "store32"):
            real = getattr(gnttab_mod, name)
            monkeypatch.setattr(gnttab_mod, name, self._wrap(name, real))
        real_wmb = gnttab_mod.wmb

        def wmb() -> None:
            self.log.append(("wmb", 0, 0))
            real_wmb()

        monkeypatch.setattr(gnttab_mod, "wmb", wmb)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def store(view: Any, off: int, value: int) -> Any:
            self.log.append((name, off, value))
            return real(view, off, value)

        return store


def test_entry_introduced_in_protocol_order(
    pair: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. write domid; 2. write frame; 3. WMB; 4. write flags incl. valid type
    front, back = pair
    table = front.grant_table
    ref = table.get()
    rec = Recorder(monkeypatch)
    table.grant_access(ref, back.domid, 0x777, writable=True)
    off = (ref % PER) * 8
    assert rec.log == [
        ("store16", off + 2, back.domid),
        ("store32", off + 4, 0x777),
        ("wmb", 0, 0),
        ("store16", off, PERMIT),
    ]
    rec.log.clear()
    # accept-transfer entries: frame written as zero
    tref = table.grant_transfer(back.domid)
    toff = (tref % PER) * 8
    assert rec.log == [
        ("store16", toff + 2, back.domid),
        ("store32", toff + 4, 0),
        ("wmb", 0, 0),
        ("store16", toff, abi.GTF_accept_transfer),
    ]
    # removing an unused accept-transfer entry: clear its flags
    assert table.end_transfer(tref) == 0
    assert flags(front, tref) == 0
    table.try_end_access(ref, release_ref=True)


def test_removal_cmpxchg_fails_while_in_use(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page, ref = granted_page(front, back.domid)
    before = guest_entry_bytes(front, ref)
    for writable, bits in ((True, READING | WRITING), (False, READING)):
        with back.gnttab.map_grant_ref(front.domid, ref, writable=writable):
            assert flags(front, ref) == PERMIT | bits
            with pytest.raises(Busy):
                table.try_end_access(ref)
            assert guest_entry_bytes(front, ref) == ENTRY.pack(
                PERMIT | bits, back.domid, page.gfns[0]
            )
        assert guest_entry_bytes(front, ref) == before  # Xen cleared its bits on unmap
    table.try_end_access(ref, release_ref=True)
    assert flags(front, ref) == 0
    page.free()
    assert active(xen, front.domid) == 0


def test_removal_checks_the_cmpxchg_result(
    pair: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 3: a cmpxchg that lost a race is re-examined, not assumed done."""
    front, back = pair
    table = front.grant_table
    ref = table.get()
    table.grant_access(ref, back.domid, 0x100)
    view, off = table._locate(ref)
    real = gnttab_mod.cmpxchg16
    calls: list[tuple[int, int]] = []
    race = {"bits": READING}

    def racing(v: Any, o: int, old: int, new: int) -> int:
        calls.append((old, new))
        if race["bits"]:
            # Xen pins the entry between the guest's read and its cmpxchg
            gnttab_mod.store16(view, off, old | race["bits"])
            race["bits"] = 0
        return int(real(v, o, old, new))

    monkeypatch.setattr(gnttab_mod, "cmpxchg16", racing)
    with pytest.raises(Busy):
        table.try_end_access(ref)
    assert calls == [(PERMIT, 0)]
    assert flags(front, ref) == PERMIT | READING  # the entry survived the race
    gnttab_mod.store16(view, off, PERMIT)  # "Xen" unpins
    # a race with a harmless flag change (GTF_readonly set) is retried
    calls.clear()
    race["bits"] = RO
    table.try_end_access(ref)
    assert calls == [(PERMIT, 0), (PERMIT | RO, 0)]
    assert flags(front, ref) == 0
    table.put(ref)


def test_set_readonly(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page, ref = granted_page(front, back.domid)
    m = back.gnttab.map_grant_ref(front.domid, ref, writable=True)
    with pytest.raises(Busy):
        table.set_readonly(ref)  # CMPXCHG checking !GTF_writing
    assert flags(front, ref) == PERMIT | INUSE
    m.unmap()
    table.set_readonly(ref)
    assert guest_entry_bytes(front, ref) == ENTRY.pack(PERMIT | RO, back.domid, page.gfns[0])
    with pytest.raises(GrantError) as ei:
        back.gnttab.map_grant_ref(front.domid, ref, writable=True)
    assert ei.value.status == abi.GNTST_general_error
    assert in_use(xen, back.domid) == 0 and flags(front, ref) == PERMIT | RO
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False) as ro:
        table.set_readonly(ref)  # already read-only, mapped for reading: fine
        assert flags(front, ref) == PERMIT | RO | READING
        assert ro.mem.readonly
    table.try_end_access(ref, release_ref=True)
    page.free()


def test_set_writable(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    page, ref = granted_page(front, back.domid, writable=False)
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False):
        table.set_writable(ref)  # a bit operation: allowed even while mapped
        assert flags(front, ref) == PERMIT | READING
    with back.gnttab.map_grant_ref(front.domid, ref, writable=True) as m:
        m.mem[:2] = b"rw"
        assert flags(front, ref) == PERMIT | INUSE
    assert bytes(page.mem[:2]) == b"rw"
    table.set_writable(ref)  # idempotent
    assert guest_entry_bytes(front, ref) == ENTRY.pack(PERMIT, back.domid, page.gfns[0])
    table.try_end_access(ref, release_ref=True)
    page.free()
    assert in_use(xen, back.domid) == 0


# ================================================================== libxengnttab
def test_map_grant_refs_from_several_domains(xen: Xen, make_domain: MakeDomain) -> None:
    d1, d2, d3, mapper = (make_domain() for _ in range(4))
    s1 = d1.grant_table.share_pages(mapper.domid, 1)
    s2 = d2.grant_table.share_pages(mapper.domid, 2)
    s3 = d3.grant_table.share_pages(mapper.domid, 1)
    s1.mem[:] = b"\x01" * PAGE
    s2.mem[:PAGE] = b"\x02" * PAGE
    s2.mem[PAGE:] = b"\x22" * PAGE
    s3.mem[:] = b"\x03" * PAGE
    grants = [
        (d2.domid, s2.refs[1]),
        (d1.domid, s1.refs[0]),
        (d3.domid, s3.refs[0]),
        (d2.domid, s2.refs[0]),
    ]
    m = mapper.gnttab.map_grant_refs(grants)
    assert len(m) == len(m.mem) == 4 * PAGE
    assert m.domids == [d for d, _ in grants] and m.refs == [r for _, r in grants]
    assert m.handles is not None and len(set(m.handles)) == 4
    for page, fill in enumerate((0x22, 0x01, 0x03, 0x02)):
        assert bytes(m.mem[page * PAGE : (page + 1) * PAGE]) == bytes([fill]) * PAGE
    # writes through the contiguous buffer land in each granter's page
    m.mem[3 * PAGE + 10 : 3 * PAGE + 13] = b"two"
    m.mem[PAGE - 1 : PAGE + 1] = b"AB"  # across two domains' pages
    assert bytes(s2.mem[10:13]) == b"two"
    assert bytes(s2.mem[2 * PAGE - 1 :]) == b"A" and bytes(s1.mem[:1]) == b"B"
    assert in_use(xen, mapper.domid) == 4
    mapper.gnttab.unmap(m)
    assert m.released and len(m) == 0
    m.unmap()  # again: nothing to do
    assert in_use(xen, mapper.domid) == 0 and grant_maps(xen, mapper.domid) == []
    for s in (s1, s2, s3):
        s.try_unshare()
        assert s.released


def test_map_domain_grant_refs_and_map_grant_ref(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 3)
    for i in range(3):
        share.mem[i * PAGE] = 0x40 + i
    with back.gnttab.map_domain_grant_refs(front.domid, share.refs, writable=False) as m:
        assert m.domids == [front.domid] * 3 and not m.writable
        assert [m.mem[i * PAGE] for i in range(3)] == [0x40, 0x41, 0x42]
        assert all(flags(front, r) == PERMIT | READING for r in share.refs)
    with back.gnttab.map_grant_ref(front.domid, share.refs[2]) as one:
        assert len(one.mem) == PAGE and one.mem[0] == 0x42
    assert in_use(xen, back.domid) == 0
    share.unshare()


def test_map_grant_refs_all_or_nothing(xen: Xen, make_domain: MakeDomain) -> None:
    d1, d2, mapper = make_domain(), make_domain(), make_domain()
    s1 = d1.grant_table.share_pages(mapper.domid, 2)
    s2 = d2.grant_table.share_pages(mapper.domid, 1, writable=False)
    frames = xen.free_frames
    cases: list[tuple[list[tuple[int, int]], list[int]]] = [
        (
            [(d1.domid, s1.refs[0]), (d2.domid, s2.refs[0]), (d1.domid, 5000)],
            [0, 0, abi.GNTST_bad_gntref],
        ),
        (
            [(d1.domid, s1.refs[0]), (999, 8), (d1.domid, s1.refs[1])],
            [0, abi.GNTST_bad_domain, 0],
        ),
        (  # writable map of d2's read-only grant
            [(d2.domid, s2.refs[0]), (d1.domid, s1.refs[1])],
            [abi.GNTST_general_error, 0],
        ),
    ]
    for i, (grants, statuses) in enumerate(cases):
        writable = i == 2
        with pytest.raises(BatchError) as ei:
            mapper.gnttab.map_grant_refs(grants, writable=writable)
        assert ei.value.statuses == statuses
        assert ei.value.failed == [(j, s) for j, s in enumerate(statuses) if s]
        assert ei.value.status == next(s for s in statuses if s)
        # nothing stays mapped, nothing stays pinned
        assert in_use(xen, mapper.domid) == 0
        assert grant_maps(xen, mapper.domid) == []
        assert active(xen, d1.domid) == active(xen, d2.domid) == 0
        assert all(not d1.grant_table.entry(r).in_use for r in s1.refs)
        assert not d2.grant_table.entry(s2.refs[0]).in_use
        assert xen.free_frames == frames
    with pytest.raises(GrantError) as single:
        mapper.gnttab.map_grant_ref(d1.domid, 5000)
    assert not isinstance(single.value, BatchError)
    assert single.value.status == abi.GNTST_bad_gntref
    with pytest.raises(ValueError):
        mapper.gnttab.map_grant_refs([])
    # the failures left the holes reusable: a good batch still maps
    with mapper.gnttab.map_grant_refs([(d1.domid, r) for r in s1.refs]):
        assert in_use(xen, mapper.domid) == 2
    s1.try_unshare()
    s2.try_unshare()


# ================================================================== libxengntshr
def test_gntshr_share_and_unshare(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = front.gntshr.share_pages(back.domid, 2, writable=True)
    assert len(share.refs) == 2 and len(share.mem) == 2 * PAGE
    assert xen.free_frames == frames - 2
    front.gntshr.unshare(share)
    assert share.released and share.refs == []
    assert xen.free_frames == frames and table.num_free_grants() == free
    front.gntshr.unshare(share)  # again: nothing to do
    with pytest.raises(ValueError):
        front.gntshr.share_pages(back.domid, 0)


def test_gntshr_unshare_while_mapped_does_not_block(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = front.gntshr.share_pages(back.domid, 2)
    share.mem[:5] = b"still"
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    front.gntshr.unshare(share)  # returns at once, as gntalloc's release does
    assert share.released and share.refs == []
    with pytest.raises(ValueError):
        share.mem[0]  # the sharer's view is gone
    assert table.deferred == 1  # the mapped page waits for the peer
    assert table.reap_deferred() == 1
    assert xen.free_frames == frames - 2  # both pages kept while one is mapped
    assert table.num_free_grants() == free - 1  # the unmapped ref is free already
    assert bytes(m.mem[:5]) == b"still"  # the peer's page is intact
    m.mem[:5] = b"mine!"
    back.gnttab.unmap(m)
    assert table.reap_deferred() == 0  # Linux's deferred timer, run now
    assert xen.free_frames == frames
    assert table.num_free_grants() == free
    assert active(xen, front.domid) == 0 and in_use(xen, back.domid) == 0


def test_get_waiting_on_deferred_refs_wakes_after_the_unmap(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The only free refs to come are deferred ones: no put() will announce
    # them, so a waiting get() must retry the deferred list (Linux's timer).
    front, back = make_domain(max_grant_frames=1), make_domain()
    table = front.grant_table
    monkeypatch.setattr(free_list_mod, "RETRY_MAX", 0.001)  # the poll period
    frames = xen.free_frames
    share = front.gntshr.share_pages(back.domid, PER - RESERVED)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[-1])
    front.gntshr.unshare(share)
    held = table.get_n(PER - RESERVED - 1)
    assert table.deferred == 1 and table.num_free_grants() == 0
    waiting = wait_hook(table, monkeypatch)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(table.get()), daemon=True)
    t.start()
    assert waiting.acquire(timeout=HANG)
    m.unmap()
    t.join(HANG)
    assert not t.is_alive() and table.deferred == 0
    assert got and got[0] not in held

    # the asyncio twin polls the same way
    table.put(got[0])
    s2 = table.share_pages(back.domid, 1)
    m2 = back.gnttab.map_grant_ref(front.domid, s2.refs[0])
    front.gntshr.unshare(s2)
    assert table.deferred == 1

    async def async_main() -> int:
        getter = await parked(table, table.get_async())
        m2.unmap()
        return await asyncio.wait_for(getter, HANG)

    assert asyncio.run(async_main()) == got[0]
    assert table.deferred == 0
    table.put_n([got[0], *held])
    assert table.num_free_grants() == PER - RESERVED
    assert xen.free_frames == frames and in_use(xen, back.domid) == 0


def test_gntshr_unshare_refuses_with_live_views(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    frames = xen.free_frames
    share = front.gntshr.share_pages(back.domid, 1)
    arr = np.frombuffer(share.mem, dtype=np.uint8)
    with pytest.raises(BufferError):
        front.gntshr.unshare(share)
    assert not share.released and flags(front, share.refs[0]) == PERMIT
    arr[0] = 9
    assert share.mem[0] == 9  # still usable
    del arr
    front.gntshr.unshare(share)
    assert xen.free_frames == frames


def test_portable_surface_matches_the_protocols() -> None:
    from xengrant.linux import LinuxGntshr, LinuxGnttab

    impls = ((Gntshr, EmulatedGntshr), (Gnttab, EmulatedGnttab))
    impls += ((Gntshr, LinuxGntshr), (Gnttab, LinuxGnttab))
    for proto, impl in impls:
        names = [n for n in vars(proto) if not n.startswith("_")]
        assert names
        for name in names:
            want = list(inspect.signature(getattr(proto, name)).parameters.values())
            got = list(inspect.signature(getattr(impl, name)).parameters.values())
            # the same positional parameters, with the same defaults; the
            # real-Xen layer may add keyword-only extras (notify_offset ...)
            assert [(p.name, p.default) for p in got[: len(want)]] == [
                (p.name, p.default) for p in want
            ], (impl.__name__, name)
            assert all(p.kind is p.KEYWORD_ONLY for p in got[len(want) :]), name


# ==================================================================== grant_copy
def test_grant_copy_both_directions(xen: Xen, make_domain: MakeDomain) -> None:
    d1, d2, copier = make_domain(), make_domain(), make_domain()
    s1 = d1.grant_table.share_pages(copier.domid, 1)
    s2 = d2.grant_table.share_pages(copier.domid, 1)
    s1.mem[200:205] = b"from1"
    frames = xen.free_frames
    out = bytearray(5)
    mv_out = memoryview(bytearray(8))
    segs = [
        CopySegment(source=b"hello", dest=GrantRef(d1.domid, s1.refs[0], offset=100), len=5),
        CopySegment(source=GrantRef(d1.domid, s1.refs[0], 200), dest=out, len=5),
        CopySegment(source=GrantRef(d1.domid, s1.refs[0], 100), dest=mv_out, len=5),
        CopySegment(
            source=GrantRef(d1.domid, s1.refs[0], 200), dest=GrantRef(d2.domid, s2.refs[0]), len=5
        ),
        CopySegment(source=memoryview(b"xyz"), dest=GrantRef(d2.domid, s2.refs[0], 4093), len=3),
    ]
    assert copier.gnttab.grant_copy(segs) == [abi.GNTST_okay] * 5
    assert all(s.status == abi.GNTST_okay for s in segs)
    assert bytes(s1.mem[100:105]) == b"hello"
    assert out == b"from1"
    assert bytes(mv_out) == b"hello\x00\x00\x00"
    assert bytes(s2.mem[:5]) == b"from1" and bytes(s2.mem[4093:]) == b"xyz"
    # no mapping was made, no pin is left
    assert in_use(xen, copier.domid) == 0
    assert active(xen, d1.domid) == active(xen, d2.domid) == 0
    assert xen.free_frames == frames - 1  # the bounce page for local sides
    copier.gnttab.close()
    assert xen.free_frames == frames
    s1.unshare()
    s2.unshare()


def test_grant_copy_failures(xen: Xen, make_domain: MakeDomain) -> None:
    front, other, copier = make_domain(), make_domain(), make_domain()
    rw = front.grant_table.share_pages(copier.domid, 1)
    ro = front.grant_table.share_pages(copier.domid, 1, writable=False)
    elsewhere = front.grant_table.share_pages(other.domid, 1)
    ro.mem[:3] = b"RO!"
    dest = bytearray(b"....")
    segs = [
        CopySegment(b"x", GrantRef(front.domid, ro.refs[0]), 1),  # write to a r/o grant
        CopySegment(GrantRef(front.domid, ro.refs[0]), dest, 3),  # reading it is fine
        CopySegment(b"xy", GrantRef(front.domid, rw.refs[0], 4095), 2),  # crosses the page
        CopySegment(GrantRef(front.domid, 5000), dest, 1),  # past the table
        CopySegment(GrantRef(999, 8), dest, 1),  # no such domain
        CopySegment(GrantRef(front.domid, elsewhere.refs[0]), dest, 1),  # not granted to us
        CopySegment(GrantRef(front.domid, rw.refs[0], 5), dest, 0),  # zero length: validated
    ]
    statuses = copier.gnttab.grant_copy(segs)
    assert statuses == [
        abi.GNTST_general_error,
        abi.GNTST_okay,
        abi.GNTST_bad_copy_arg,
        abi.GNTST_bad_gntref,
        abi.GNTST_bad_domain,
        abi.GNTST_general_error,
        abi.GNTST_okay,
    ]
    assert [s.status for s in segs] == statuses
    assert bytes(ro.mem[:1]) == b"R"  # the failed write changed nothing
    assert dest == b"RO!."  # only the good copy reached the buffer
    assert bytes(rw.mem[4095:]) == b"\x00"
    with pytest.raises(ValueError, match="GrantRef"):
        copier.gnttab.grant_copy([CopySegment(b"x", bytearray(1), 1)])
    for bad_len in (PAGE + 1, -1):
        with pytest.raises(ValueError, match="within a page"):
            copier.gnttab.grant_copy([CopySegment(b"x", GrantRef(front.domid, 8), bad_len)])
    assert active(xen, front.domid) == 0
    copier.gnttab.close()
    for s in (rw, ro, elsewhere):
        s.unshare()


def test_raw_copy_batch(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    # Linux gnttab_batch_copy: a ctypes batch of struct gnttab_copy, statuses back
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    share.mem[:4] = b"raw!"
    page = back.alloc_pages(1)
    ops = (abi.gnttab_copy * 2)()
    for op, ref in zip(ops, (share.refs[0], 5000)):
        op.source.u.ref, op.source.domid, op.source.offset = ref, front.domid, 0
        op.dest.u.gmfn, op.dest.domid, op.dest.offset = page.gfns[0], abi.DOMID_SELF, 8
        op.len, op.flags = 4, abi.GNTCOPY_source_gref
    assert back.grant_table.copy(ops) == [abi.GNTST_okay, abi.GNTST_bad_gntref]
    assert bytes(page.mem[8:12]) == b"raw!"
    ops[0].dest.domid = back.domid  # a frame side must say DOMID_SELF
    assert back.grant_table.copy(ops, 1) == [abi.GNTST_permission_denied]
    page.free()
    share.unshare()
    assert active(xen, front.domid) == 0


# ======================================================================= buffers
def test_numpy_is_zero_copy_both_ways(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 2)
    m = back.gnttab.map_domain_grant_refs(front.domid, share.refs)
    arr = np.frombuffer(m.mem, dtype=np.uint32)
    assert arr.flags.writeable and arr.size == 2 * PAGE // 4
    arr[:4] = [1, 2, 3, 0xDEADBEEF]
    arr[PAGE // 4] = 0x01020304
    assert bytes(share.mem[:16]) == struct.pack("<4I", 1, 2, 3, 0xDEADBEEF)
    assert bytes(share.mem[PAGE : PAGE + 4]) == b"\x04\x03\x02\x01"
    mine = np.frombuffer(share.mem, dtype=np.uint8)
    mine[-1] = 0xEE
    assert arr[-1] >> 24 == 0xEE  # the mapper's array sees the sharer's write
    del arr, mine
    m.unmap()
    share.unshare()


def test_unmap_refuses_while_a_numpy_array_is_alive(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    arr = np.frombuffer(m.mem, dtype=np.uint8)
    with pytest.raises(BufferError):
        m.unmap()
    # nothing was unmapped: the mapping and its memory still work
    assert not m.released and in_use(xen, back.domid) == 1
    m.mem[0] = 1
    assert arr[0] == 1 and share.mem[0] == 1
    arr[1] = 2
    assert share.mem[1] == 2
    # an array over a slice of mem holds the frames just the same
    sliced = np.frombuffer(m.mem[10:20], dtype=np.uint8)
    del arr
    with pytest.raises(BufferError):
        m.unmap()
    assert in_use(xen, back.domid) == 1
    m.mem[10] = 3
    assert sliced[0] == 3
    del sliced
    m.unmap()
    assert m.released and in_use(xen, back.domid) == 0
    share.unshare()


def test_share_unshare_with_a_live_view(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.share_pages(back.domid, 1)
    arr = np.frombuffer(share.mem, dtype=np.uint8)
    with pytest.raises(BufferError):
        share.try_unshare()
    # access has ended, but the page stays while Python can still reach it
    assert share.refs == [] and not share.released
    assert table.num_free_grants() == free
    assert xen.free_frames == frames - 1
    arr[0] = 5
    del arr
    share.try_unshare()
    assert share.released and xen.free_frames == frames


def test_readonly_mapping_refuses_writes(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    share.mem[:2] = b"ro"
    with back.gnttab.map_grant_ref(front.domid, share.refs[0], writable=False) as m:
        assert m.mem.readonly and not m.writable
        with pytest.raises(TypeError):
            m.mem[0] = 1
        with pytest.raises(TypeError):
            m.mem[:2] = b"no"
        arr = np.frombuffer(m.mem, dtype=np.uint8)
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1
        assert bytes(arr[:2]) == b"ro"
        del arr
    assert bytes(share.mem[:2]) == b"ro"
    share.unshare()


def test_released_memory_raises_value_error(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    m.unmap()
    share.unshare()
    for mem in (m.mem, share.mem):
        with pytest.raises(ValueError):
            mem[0]
        with pytest.raises(ValueError):
            bytes(mem)
        with pytest.raises(ValueError):
            np.frombuffer(mem, dtype=np.uint8)


# ================================================================ asyncio twins
class WaiterList(list):  # type: ignore[type-arg]
    """Stands in for ``GrantTable._async_waiters``: signals when a task waits."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self.event = event

    def append(self, item: Any) -> None:
        super().append(item)
        self.event.set()


def watch_waiters(table: xengrant.GrantTable, keep: list[Any] | None = None) -> asyncio.Event:
    """A new async waiter list for ``table`` (``keep`` queued in it first): the
    event is set when a task parks in it."""
    waiting = asyncio.Event()
    table._async_waiters = WaiterList(waiting)  # type: ignore[assignment]
    table._async_waiters.extend(keep or [])
    return waiting


async def parked(
    table: xengrant.GrantTable, coro: Any, keep: list[Any] | None = None
) -> asyncio.Task[Any]:
    """``coro`` as a task, returned once it is parked waiting for refs."""
    waiting = watch_waiters(table, keep)
    task = asyncio.create_task(coro)
    await waiting.wait()
    return task


def full_one_frame_table(make_domain: MakeDomain) -> tuple[xengrant.GrantTable, list[int]]:
    """A table that never grows past one frame, and every ref of it, handed out."""
    table = make_domain(max_grant_frames=1).grant_table
    return table, table.get_n(PER - RESERVED)


def test_get_async_woken_by_put_from_another_task(make_domain: MakeDomain) -> None:
    table, held = full_one_frame_table(make_domain)

    async def main() -> int:
        getter = await parked(table, table.get_async())  # on a full table
        assert not getter.done()
        table.put(held[3])
        return await getter

    assert asyncio.run(main()) == held[3]
    assert table.num_free_grants() == 0


def test_get_n_async_woken_by_put_n(make_domain: MakeDomain) -> None:
    table, held = full_one_frame_table(make_domain)

    async def main() -> list[int]:
        getter = await parked(table, table.get_n_async(3))
        table.put(held[0])  # not enough: the getter parks again
        await watch_waiters(table).wait()
        assert not getter.done() and table.num_free_grants() == 1
        table.put_n(held[1:3])
        return await getter

    assert sorted(asyncio.run(main())) == sorted(held[:3])
    with pytest.raises(GrantTableFull):
        asyncio.run(table.get_n_async(PER))  # more than the table can ever hold


def test_get_async_woken_by_put_from_a_thread(make_domain: MakeDomain) -> None:
    table, held = full_one_frame_table(make_domain)

    async def main() -> int:
        getter = await parked(table, table.get_async())
        t = threading.Thread(target=table.put, args=(held[9],))
        t.start()
        ref = await getter
        t.join(HANG)
        return ref

    assert asyncio.run(main()) == held[9]


def test_cancelled_async_waiter_does_not_break_put(make_domain: MakeDomain) -> None:
    # A get_async cancelled on a loop that is then closed must not make a
    # later put() raise, nor keep the waiters queued behind it asleep.
    table, held = full_one_frame_table(make_domain)

    async def give_up() -> None:
        getter = await parked(table, table.get_async())
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter

    asyncio.run(give_up())  # its loop is closed now

    async def wait_on_a_new_loop() -> int:
        stale = list(table._async_waiters)  # the cancelled waiter stays queued
        getter = await parked(table, table.get_async(), keep=stale)
        table.put(held[0])  # must not raise "Event loop is closed"
        return await asyncio.wait_for(getter, HANG)

    assert asyncio.run(wait_on_a_new_loop()) == held[0]
    table.put(held[1])
    assert table.num_free_grants() == 1


def test_end_access_async(xen: Xen, pair: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch) -> None:
    front, back = pair
    table = front.grant_table
    free = table.num_free_grants()
    page, ref = granted_page(front, back.domid)
    m = back.gnttab.map_grant_ref(front.domid, ref)

    async def main() -> list[bool]:
        busy = asyncio.Event()
        seen = busy_spy(monkeypatch, table, "try_end_access", busy)
        with pytest.raises(Busy):
            await table.end_access_async(ref, timeout=0)

        async def unmapper() -> None:
            await busy.wait()
            m.unmap()

        await asyncio.gather(
            table.end_access_async(ref, release_ref=True, timeout=HANG), unmapper()
        )
        return seen

    seen = asyncio.run(main())
    assert seen[0] is False and seen[-1] is True  # Busy first, ended at last
    assert flags(front, ref) == 0 and table.num_free_grants() == free
    page.free()
    assert in_use(xen, back.domid) == 0


def test_unshare_async(xen: Xen, pair: tuple[Dom, Dom], monkeypatch: pytest.MonkeyPatch) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.share_pages(back.domid, 2)
    r2 = share.refs[1]
    m = back.gnttab.map_grant_ref(front.domid, r2)

    async def main() -> None:
        busy = asyncio.Event()
        busy_spy(monkeypatch, table, "_try_unshare", busy)
        with pytest.raises(Busy):
            await share.unshare_async(timeout=0)
        assert share.refs == [r2]  # the first page's ref ended

        async def unmapper() -> None:
            await busy.wait()
            m.unmap()

        await asyncio.gather(share.unshare_async(timeout=HANG), unmapper())

    asyncio.run(main())
    assert share.released
    assert xen.free_frames == frames and table.num_free_grants() == free


def test_async_with_share_and_refs(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()

    async def main() -> None:
        async with table.with_ref_async() as ref:
            assert table.num_free_grants() == free - 1
            table.grant_access(ref, back.domid, 0x100)
            await table.end_access_async(ref)
        assert table.num_free_grants() == free
        async with table.with_refs_async(3) as refs:
            assert len(set(refs)) == 3 and table.num_free_grants() == free - 3
        assert table.num_free_grants() == free
        with pytest.raises(RuntimeError):
            async with table.with_refs_async(2):
                raise RuntimeError("block failed")
        assert table.num_free_grants() == free
        async with table.share_pages(back.domid, 2) as share:
            share.mem[:1] = b"a"
        assert share.released

    asyncio.run(main())
    assert xen.free_frames == frames and table.num_free_grants() == free


# ============================================================== ResourceWarning
def test_dropped_share_warns_and_is_freed(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.share_pages(back.domid, 2)
    refs = list(share.refs)
    with pytest.warns(ResourceWarning, match="unreleased <Share"):
        del share
        gc.collect()
    assert all(flags(front, r) == 0 for r in refs)
    assert table.deferred == 0
    assert xen.free_frames == frames and table.num_free_grants() == free


def test_dropped_mapped_share_is_deferred(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.share_pages(back.domid, 3)
    share.mem[PAGE : PAGE + 4] = b"kept"
    m = back.gnttab.map_grant_ref(front.domid, share.refs[1])
    with pytest.warns(ResourceWarning):
        del share
        gc.collect()
    # the mapped page's access could not end: deferred, all pages kept
    assert table.deferred == 1 and table.reap_deferred() == 1
    assert xen.free_frames == frames - 3
    assert bytes(m.mem[:4]) == b"kept"
    m.unmap()
    assert table.reap_deferred() == 0
    assert xen.free_frames == frames and table.num_free_grants() == free
    assert active(xen, front.domid) == 0


def test_dropped_mapping_warns_and_is_unmapped(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 2)
    m = back.gnttab.map_domain_grant_refs(front.domid, share.refs)
    assert in_use(xen, back.domid) == 2
    with pytest.warns(ResourceWarning, match="unreleased <Mapping"):
        del m
        gc.collect()
    assert in_use(xen, back.domid) == 0 and grant_maps(xen, back.domid) == []
    assert all(flags(front, r) == PERMIT for r in share.refs)
    share.try_unshare()  # not busy any more
    assert share.released


def test_dropped_share_with_a_live_array_frees_pages_later(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    table = front.grant_table
    frames, free = xen.free_frames, table.num_free_grants()
    share = table.share_pages(back.domid, 1)
    arr = np.frombuffer(share.mem, dtype=np.uint8)
    with pytest.warns(ResourceWarning):
        del share
        gc.collect()
    arr[0] = 1  # still valid memory: the page cannot be given back yet
    assert table.num_free_grants() == free  # access ended, ref freed
    del arr
    gc.collect()
    table.reap_deferred()
    assert xen.free_frames == frames


def test_dropped_mapping_with_a_live_array_unmaps_later(xen: Xen, pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    share = front.grant_table.share_pages(back.domid, 1)
    m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
    arr = np.frombuffer(m.mem, dtype=np.uint8)
    with pytest.warns(ResourceWarning):
        del m
        gc.collect()
    arr[0] = 1
    assert share.mem[0] == 1
    del arr
    gc.collect()
    back.grant_table.reap_deferred()
    front.gntshr.unshare(share)  # never blocks, whatever the mapping's fate
    assert in_use(xen, back.domid) == 0


def test_released_objects_do_not_warn(pair: tuple[Dom, Dom]) -> None:
    front, back = pair
    gc.collect()  # earlier tests' garbage is not ours to judge
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        share = front.grant_table.share_pages(back.domid, 1)
        m = back.gnttab.map_grant_ref(front.domid, share.refs[0])
        m.unmap()
        share.unshare()
        del share, m
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
