"""A guest's grant table: free refs, entries written in place, shares, maps.

One class covers the guest-side grant-table APIs of Linux
(drivers/xen/grant-table.c), mirage (``Xen_os.Xen.Export``/``Import``) and
Zephyr (drivers/xen/gnttab.c); the README maps each of their functions to a
method here.

Rules and their sources:

- Refs 0..7 are reserved (``GNTTAB_NR_RESERVED_ENTRIES``; 0 console, 1
  xenstore) and never handed out or accepted back.
- The table starts at one frame and grows a frame at a time, up to the
  ``max_nr_frames`` ``GNTTABOP_query_size`` reports (Linux ``gnttab_expand``);
  past that the free list is exhausted: :class:`GrantTableFull`, or a wait.
- Introducing an entry (xen/include/public/grant_table.h, 2004): write domid,
  write frame, write barrier, write flags with the type.
- Removing an unused ``GTF_permit_access`` entry: read flags, check neither
  ``GTF_reading`` nor ``GTF_writing``, cmpxchg flags to 0 -- it fails while
  Xen has the entry pinned, so access never ends under a live mapping
  (v2: clear flags, full barrier, check the status word, as Linux
  ``gnttab_end_foreign_access_ref_v2``).
- Writable -> read-only: cmpxchg setting ``GTF_readonly`` while checking
  ``!GTF_writing``; read-only -> writable: an atomic bit operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .._cext import (
    cmpxchg16,
    end_run,
    fetch_and16,
    grant_run,
    load16,
    load32,
    mark,
    mb,
    put_run,
    store16,
    store32,
    wmb,
)
from ..abi import grant_table as gt
from ..abi.memory import XENMAPIDX_grant_table_status, XENMAPSPACE_grant_table
from ..errors import (
    BatchError,
    Busy,
    GrantError,
    GrantTableFull,
    GrantTableTimeout,
    HypercallError,
)
from ..hypercall import WritableBuffer, check_rc
from .domain import Domain, Pages
from .eagain import retry_eagain_gop
from .memory import GNTTAB_GFN_BASE, GNTTAB_STATUS_GFN_BASE
from .ops import (
    MAP_OP,
    VECTOR,
    map_results,
    pack_map_ops,
    pack_unmap_ops,
    unmap_statuses,
)
from .share import RETRY_MAX, Mapping, Share, retry_while_busy, retry_while_busy_async

#: Linux's pr_debug lines of gnttab_add_deferred / gnttab_handle_deferred
_logger = logging.getLogger("xengrant.guest")

_INUSE = gt.GTF_reading | gt.GTF_writing
#: Seconds between the reaper's retries of deferred releases (Linux's
#: ``deferred_timer``: ``jiffies + HZ``, one second).
REAP_INTERVAL = 1.0
_QUERY = struct.Struct("<H2xIIh2x")
_SETUP = struct.Struct("<H2xIh6xQ")
_STATUS_FRAMES = struct.Struct("<IHhQ")
_VERSION = struct.Struct("<I")
_TRANSFER = struct.Struct("<QH2xIh6x")

def map_failure(
    domids: Sequence[int], refs: Sequence[int], statuses: list[int], reasons: str
) -> GrantError | BatchError:
    """What a map of ``refs`` that failed raises (gntdev's all-or-nothing batch).

    Args:
        domids, refs: the grants asked for.
        statuses: each op's GNTST code.
        reasons: Xen's debug reasons for the failed ops, joined.

    Returns:
        A :class:`GrantError` for one grant (with its domid, ref and reason),
        a :class:`BatchError` with every status for several.
    """
    if len(refs) == 1:
        why = f"d{domids[0]} ref {refs[0]}" + (f": {reasons}" if reasons else "")
        return GrantError("map_grant_ref", statuses[0], why)
    return BatchError("map_grant_refs", statuses, reasons)


def map_ops_at_holes(
    domain: Domain, domids: Sequence[int], refs: Sequence[int], writable: bool
) -> tuple[list[int], bytearray]:
    """Fresh holes for ``refs`` and the ``gnttab_map_grant_ref`` ops mapping them there.

    The first half of gntdev's ``gntdev_map_grant_pages``: the pages that will
    host the foreign frames (Zephyr's ``gnttab_get_pages``), then one op each.

    Returns:
        ``(gfns, ops)``: the holes, and the ops packed for GNTTABOP_map_grant_ref.

    Raises:
        ValueError: no grants, or a domid or ref that does not fit the op (the
            holes are given back).
    """
    if not refs:
        raise ValueError("map_grants: no grants to map")
    gfns = domain.get_pages(len(refs))
    flags = gt.GNTMAP_host_map | (0 if writable else gt.GNTMAP_readonly)
    try:
        return gfns, pack_map_ops(gfns, flags, refs, domids)
    except Exception:
        domain.put_pages(gfns)
        raise


# free-list states of a ref
_FREE, _USED, _RESERVED = 0, 1, 2


@dataclass(frozen=True)
class GrantEntry:
    """A decoded shared entry (what Xen's 'g' debug key prints per ref).

    Attributes:
        ref: the grant reference.
        flags: ``GTF_*`` flags (v2: header flags OR'ed with the status word).
        domid: the domain granted.
        frame: the frame (gfn for translated guests).
        page_off: sub-page start (v2 sub-page grants), else 0.
        length: sub-page length, else 4096.
    """

    ref: int
    flags: int
    domid: int
    frame: int
    page_off: int = 0
    length: int = 4096

    @property
    def type(self) -> int:
        """``flags & GTF_type_mask``."""
        return self.flags & gt.GTF_type_mask

    @property
    def in_use(self) -> bool:
        """True while Xen has it mapped (GTF_reading or GTF_writing)."""
        return bool(self.flags & _INUSE)


def decode_flags(flags: int) -> str:
    """Readable GTF flags, e.g. ``permit_access|readonly|reading``."""
    kind = {
        gt.GTF_invalid: "invalid",
        gt.GTF_permit_access: "permit_access",
        gt.GTF_accept_transfer: "accept_transfer",
        gt.GTF_transitive: "transitive",
    }[flags & gt.GTF_type_mask]
    names = [kind]
    if (flags & gt.GTF_type_mask) == gt.GTF_accept_transfer:
        bits = [(gt.GTF_transfer_committed, "committed"), (gt.GTF_transfer_completed, "completed")]
    else:
        bits = [
            (gt.GTF_readonly, "readonly"),
            (gt.GTF_reading, "reading"),
            (gt.GTF_writing, "writing"),
            (gt.GTF_PWT, "PWT"),
            (gt.GTF_PCD, "PCD"),
            (gt.GTF_PAT, "PAT"),
            (gt.GTF_sub_page, "sub_page"),
        ]
    names += [n for bit, n in bits if flags & bit]
    return "|".join(names)


class GrantTable:
    """The grant table of one guest, from the inside.

    Args:
        domain: the guest owning the table.
    """

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.domid = domain.domid
        self._hc = domain.hypercalls
        self._lock = threading.Condition(threading.RLock())
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        #: threads blocked in get_n's wait (under ``_lock``): _wake skips notify_all at 0
        self._sync_waiters = 0
        self._frames: list[Any] = []  # FrameView per shared frame
        self._status_frames: list[Any] = []
        self._state = bytearray()
        self._free: list[int] = []
        self._deferred: list[tuple[int, bool, Any]] = []
        #: Releases that wait for the last view of some memory to go (a Share or
        #: Mapping dropped while a numpy array still used it): each returns True
        #: once done; retried with the deferred ends of access.
        self._orphans: list[Callable[[], bool]] = []
        #: refs granted with :meth:`grant_access` on a hypervisor whose pages
        #: live in files (a service): ref -> gfn, told when access ends
        self._kept: dict[int, int] = {}
        #: Linux's deferred_timer: retries deferred releases every
        #: REAP_INTERVAL seconds while any is pending (a one-shot Timer thread
        #: re-armed by each tick; none runs while nothing is pending).
        self._reaper: threading.Timer | None = None
        self._reaper_stopped = False
        #: gnttab_request_free_callback's list: one-shot callbacks waiting for
        #: enough free refs.
        self._free_callbacks: list[FreeCallback] = []
        self.version = 1
        nr, self.max_nr_frames = self.query_size()
        self._map_frames(max(nr, 1))

    # ------------------------------------------------------------ table
    def query_size(self, domid: int = gt.DOMID_SELF) -> tuple[int, int]:
        """``GNTTABOP_query_size``.

        Returns:
            ``(nr_frames, max_nr_frames)``.

        Raises:
            GrantError: the op's status was not okay (bad domain, permission).
        """
        buf = bytearray(_QUERY.size)
        # mutation: equivalent — the last three zeros are outputs (nr, max, status)
        _QUERY.pack_into(buf, 0, domid, 0, 0, 0)
        check_rc("query_size", self._hc.grant_table_op(gt.GNTTABOP_query_size, memoryview(buf), 1))
        _dom, nr, mx, st = _QUERY.unpack_from(buf)
        if st != gt.GNTST_okay:
            raise GrantError("query_size", st, f"dom {domid}")
        return nr, mx

    @property
    def nr_frames(self) -> int:
        """Frames of the table mapped so far."""
        return len(self._frames)

    @property
    def per_frame(self) -> int:
        """Entries per frame for the version in force."""
        return gt.GRANT_PER_PAGE_V1 if self.version == 1 else gt.GRANT_PER_PAGE_V2

    @property
    def nr_entries(self) -> int:
        """Entries in the mapped frames."""
        return len(self._frames) * self.per_frame

    def _map_frames(self, upto: int) -> bool:
        """Grow to ``upto`` frames (``gnttab_expand``); False at the limit."""
        if upto > self.max_nr_frames:
            return False
        start = len(self._frames)
        if self.domain.pv:
            # A PV guest cannot add_to_physmap (-EOPNOTSUPP): Linux's
            # gnttab_map issues GNTTABOP_setup_table and maps the machine
            # frames it lists (arch_gnttab_map_shared).
            try:
                mfns = self._pv_frame_list(gt.GNTTABOP_setup_table, upto)
            except (GrantError, HypercallError, MemoryError):
                return False
            for mfn in mfns[start:upto]:
                self._frames.append(self._hc.map_gfns([mfn], True))
        else:
            for idx in range(start, upto):
                gfn = GNTTAB_GFN_BASE + idx
                rc = self._hc.add_to_physmap(XENMAPSPACE_grant_table, idx, gfn)
                if rc < 0:
                    return False
                self._frames.append(self._hc.map_gfns([gfn], True))
        if self.version == 2:
            self._map_status_frames()
        per = self.per_frame
        old = len(self._state)
        self._state.extend(bytes(upto * per - old))
        for ref in range(old, min(gt.GNTTAB_NR_RESERVED_ENTRIES, upto * per)):
            self._state[ref] = _RESERVED
        # lowest refs first out of the LIFO free list
        self._free.extend(range(upto * per - 1, max(old, gt.GNTTAB_NR_RESERVED_ENTRIES) - 1, -1))
        return True

    def _pv_frame_list(self, cmd: int, nr_frames: int) -> list[int]:
        """A PV guest's first ``nr_frames`` table frames (mfns).

        ``GNTTABOP_setup_table`` (growing the table) or, for v2 status frames,
        ``GNTTABOP_get_status_frames``; the list is written to a RAM page
        borrowed for the call (Linux gnttab_map / gnttab_map_status_v2).

        Raises:
            GrantError: the op's status (past max_grant_frames ...).
            HypercallError: the hypercall failed.
            MemoryError: no page for the list.
        """
        page = self.domain.alloc_pages(1)
        try:
            buf = bytearray(_SETUP.size)
            addr = page.gfns[0] << 12
            if cmd == gt.GNTTABOP_setup_table:
                op, layout = "setup_table", _SETUP
                # mutation: equivalent — the 0 is the op's status, an output
                layout.pack_into(buf, 0, gt.DOMID_SELF, nr_frames, 0, addr)
            else:
                op, layout = "get_status_frames", _STATUS_FRAMES
                # mutation: equivalent — the 0 is the op's status, an output
                layout.pack_into(buf, 0, nr_frames, gt.DOMID_SELF, 0, addr)
            check_rc(op, self._hc.grant_table_op(cmd, memoryview(buf), 1))
            status = int(layout.unpack_from(buf)[2])
            if status != gt.GNTST_okay:
                raise GrantError(op, status, f"{nr_frames} frame(s)")
            return list(struct.unpack_from(f"<{nr_frames}Q", page.mem))
        finally:
            page.free()

    def _map_status_frames(self) -> None:
        need = (self.nr_frames * gt.GRANT_PER_PAGE_V2 + gt.GRANT_STATUS_PER_PAGE - 1) // (
            gt.GRANT_STATUS_PER_PAGE
        )
        if self.domain.pv:
            mfns = self._pv_frame_list(gt.GNTTABOP_get_status_frames, need)
            for mfn in mfns[len(self._status_frames) :]:
                self._status_frames.append(self._hc.map_gfns([mfn], True))
            return
        for idx in range(len(self._status_frames), need):
            gfn = GNTTAB_STATUS_GFN_BASE + idx
            check_rc(
                "add_to_physmap",
                self._hc.add_to_physmap(
                    XENMAPSPACE_grant_table, idx | XENMAPIDX_grant_table_status, gfn
                ),
            )
            self._status_frames.append(self._hc.map_gfns([gfn], True))

    def _locate(self, ref: int) -> tuple[Any, int]:
        per = self.per_frame
        if not 0 <= ref < len(self._frames) * per:
            raise ValueError(f"grant ref {ref} is outside the table ({self.nr_entries} entries)")
        return self._frames[ref // per], (ref % per) * (8 if self.version == 1 else 16)

    def _status_word(self, ref: int) -> tuple[Any, int]:
        spp = gt.GRANT_STATUS_PER_PAGE
        return self._status_frames[ref // spp], (ref % spp) * 2

    # -------------------------------------------------------- free list
    def num_free_grants(self) -> int:
        """Refs a ``get_nonblock`` could hand out now, growth included."""
        with self._lock:
            grow = (self.max_nr_frames - len(self._frames)) * self.per_frame
            return len(self._free) + grow

    def get_nonblock(self) -> int | None:
        """One free ref, or None if the table is full (mirage ``get_nonblock``)."""
        with self._lock:
            self._reap_deferred()
            if not self._free and not self._map_frames(len(self._frames) + 1):
                return None
            ref = self._free.pop()
            self._state[ref] = _USED
            return ref

    def get_n_nonblock(self, count: int) -> list[int]:
        """``count`` free refs, or ``[]`` if not that many (all or nothing)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        with self._lock:
            self._reap_deferred()
            free = self._free
            if len(free) < count:
                per = self.per_frame
                want = len(self._frames) + -(-(count - len(free)) // per)
                if want > self.max_nr_frames or not self._map_frames(want):
                    return []
            refs = free[: -count - 1 : -1] if count else []  # LIFO: the last freed first
            del free[len(free) - count :]
            mark(self._state, refs, _USED)
            return refs

    def get(self, timeout: float | None = None) -> int:
        """One free ref, waiting while the table is full until a ``put``.

        Raises:
            GrantTableTimeout: ``timeout`` expired (a :class:`GrantTableFull`
                and a :class:`TimeoutError`).
        """
        return self.get_n(1, timeout)[0]

    def get_n(self, count: int, timeout: float | None = None) -> list[int]:
        """``count`` free refs, waiting for enough to be put back.

        Raises:
            GrantTableTimeout: ``timeout`` expired (a :class:`GrantTableFull`
                and a :class:`TimeoutError`).
            GrantTableFull: ``count`` exceeds what the table can ever hold.
        """
        self._check_possible(count)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                refs = self.get_n_nonblock(count)
                if refs or count == 0:
                    return refs
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise GrantTableTimeout("get_n", count, len(self._free))
                if self.deferred:
                    # Deferred ends free refs only when retried, and no put()
                    # announces the peer's unmap: poll, as Linux's timer does.
                    remaining = RETRY_MAX if remaining is None else min(remaining, RETRY_MAX)
                self._sync_waiters += 1
                try:
                    self._lock.wait(remaining)
                finally:
                    self._sync_waiters -= 1

    def _check_possible(self, count: int) -> None:
        cap = self.max_nr_frames * self.per_frame - gt.GNTTAB_NR_RESERVED_ENTRIES
        if count > cap:
            raise GrantTableFull("get_n", count, cap)

    async def get_async(self, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`get`."""
        return (await self.get_n_async(1, timeout))[0]

    async def get_n_async(self, count: int, timeout: float | None = None) -> list[int]:
        """asyncio twin of :meth:`get_n`: waits without blocking the loop.

        Raises:
            GrantTableTimeout: ``timeout`` expired.
            GrantTableFull: ``count`` exceeds what the table can ever hold.
        """
        self._check_possible(count)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                refs = self.get_n_nonblock(count)
                if refs or count == 0:
                    return refs
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise GrantTableTimeout("get_n_async", count, len(self._free))
                fut: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, fut))
                poll = RETRY_MAX if self.deferred else None  # as in get_n
                if remaining is not None:
                    poll = remaining if poll is None else min(poll, remaining)
            try:
                await asyncio.wait([fut], timeout=poll)
            finally:
                fut.cancel()  # a later _wake skips it

    def put(self, ref: int) -> None:
        """Return a ref to the free list (mirage ``put``) and wake waiters.

        Raises:
            ValueError: a reserved ref, one not handed out, or one still
                granted (end access first, or a peer could map a stale page).
        """
        self.put_n([ref])

    def put_n(self, refs: Sequence[int]) -> None:
        """Return several refs at once (Linux ``gnttab_free_grant_references``).

        All or nothing: if any ref may not go back, none does.

        Raises:
            ValueError: as :meth:`put`, naming the first such ref.
        """
        refs = list(refs)
        with self._lock:
            state = self._state
            # checks every ref, then marks them all free (a ref listed twice
            # is a double put): C, one pass, nothing changed on failure
            bad = put_run(self._frames, state, refs, 8 if self.version == 1 else 16)
            if bad >= 0:
                ref = refs[bad]
                if not 0 <= ref < len(state) or state[ref] == _RESERVED:
                    raise ValueError(f"put: grant ref {ref} is reserved or outside the table")
                if state[ref] != _USED or ref in refs[:bad]:
                    raise ValueError(f"put: grant ref {ref} is already free (double put)")
                raise ValueError(
                    f"put: grant ref {ref} is still granted; end access before freeing it"
                )
            self._free.extend(refs)
            self._wake()
            self._run_free_callbacks()

    def _wake(self) -> None:
        """Wake every waiter (called with ``_lock`` held); nothing to do if nobody waits."""
        if self._sync_waiters:
            self._lock.notify_all()
        if not self._async_waiters:
            return
        waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            if fut.done():  # its task was cancelled: nobody waits on it
                continue
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # its loop is closed: nobody waits on it either
                pass

    @contextlib.contextmanager
    def with_ref(self, timeout: float | None = None) -> Iterator[int]:
        """A ref for the block, put back after it (mirage ``with_ref``).

        Raises:
            GrantTableTimeout: no ref came within ``timeout``.
        """
        ref = self.get(timeout)
        try:
            yield ref
        finally:
            self.put(ref)

    @contextlib.contextmanager
    def with_refs(self, count: int, timeout: float | None = None) -> Iterator[list[int]]:
        """``count`` refs for the block (mirage ``with_refs``).

        Raises:
            GrantTableTimeout: they did not come within ``timeout``.
        """
        refs = self.get_n(count, timeout)
        try:
            yield refs
        finally:
            self.put_n(refs)

    @contextlib.asynccontextmanager
    async def with_ref_async(self, timeout: float | None = None) -> AsyncIterator[int]:
        """asyncio twin of :meth:`with_ref`."""
        ref = await self.get_async(timeout)
        try:
            yield ref
        finally:
            self.put(ref)

    @contextlib.asynccontextmanager
    async def with_refs_async(
        self, count: int, timeout: float | None = None
    ) -> AsyncIterator[list[int]]:
        """asyncio twin of :meth:`with_refs`."""
        refs = await self.get_n_async(count, timeout)
        try:
            yield refs
        finally:
            self.put_n(refs)

    # ----------------------------------------------------------- entries
    def _entry_flags(self, ref: int) -> int:
        view, off = self._locate(ref)
        return int(load16(view, off))

    def entry(self, ref: int) -> GrantEntry:
        """Decode entry ``ref`` as it is in the shared frame now."""
        view, off = self._locate(ref)
        flags = load16(view, off)
        domid = load16(view, off + 2)
        if self.version == 1:
            return GrantEntry(ref, flags, domid, load32(view, off + 4))
        sview, soff = self._status_word(ref)
        mv = memoryview(view)
        frame = int.from_bytes(mv[off + 8 : off + 16], "little")
        po, ln = 0, 4096
        if flags & gt.GTF_sub_page:
            po, ln = load16(view, off + 4), load16(view, off + 6)
        mv.release()
        return GrantEntry(ref, flags | load16(sview, soff), domid, frame, po, ln)

    def grant_access(self, ref: int, domid: int, gfn: int, writable: bool = True) -> None:
        """Grant ``domid`` access to frame ``gfn`` through ``ref`` (mirage ``grant_access``).

        Writes domid, frame, a write barrier, then the flags, so Xen never
        sees a valid type with stale contents (grant_table.h, 2004).

        Raises:
            ValueError: ``ref`` is reserved, not allocated, or already granted.
        """
        self._check_grantable(ref)
        prepare = getattr(self._hc, "prepare_grant", None)
        if prepare is not None:
            # a domain process of the service: the page gets a file of its own
            # first, so that the grantee reaches this page and no other
            try:
                prepare([gfn], domid)
            except HypercallError as e:
                if e.errno != errno.EINVAL:  # not our RAM: Xen refuses the grant itself
                    raise
            else:
                self._kept[ref] = gfn
        self._write_entry(ref, domid, gfn, writable)

    def _write_entry(
        self, ref: int, domid: int, gfn: int, writable: bool, check: bool = False
    ) -> None:
        """:meth:`grant_access` after its checks: domid, frame, barrier, flags.

        Raises:
            ValueError: ``check`` and the entry is already granted.
        """
        view, off = self._locate(ref)
        if check and load16(view, off) & gt.GTF_type_mask:
            raise ValueError(f"grant ref {ref} is already granted (end access first)")
        flags = gt.GTF_permit_access | (0 if writable else gt.GTF_readonly)
        self._introduce_entry(view, off, domid, gfn, flags)

    def _introduce_entry(self, view: Any, off: int, domid: int, frame: int, flags: int) -> None:
        """Introduce an entry as grant_table.h says: domid, frame, write barrier, flags."""
        store16(view, off + 2, domid)
        if self.version == 1:
            store32(view, off + 4, frame)
        else:
            mv = memoryview(view)
            struct.pack_into("<Q", mv, off + 8, frame)
            mv.release()
        wmb()
        store16(view, off, flags)

    def grant_access_subpage(
        self, ref: int, domid: int, gfn: int, page_off: int, length: int, writable: bool = True
    ) -> None:
        """A v2 sub-page grant: ``domid`` may copy bytes [page_off, page_off+length).

        Raises:
            ValueError: v1 table, bad range, or ref not grantable.
        """
        if self.version != 2:
            raise ValueError("sub-page grants need a v2 grant table (set_version(2))")
        if not (page_off >= 0 and length > 0 and page_off + length <= 4096):
            raise ValueError(f"sub-page range [{page_off}, {page_off + length}) is not in a page")
        self._check_grantable(ref)
        view, off = self._locate(ref)
        mv = memoryview(view)
        struct.pack_into("<HHHQ", mv, off + 2, domid, page_off, length, gfn)
        mv.release()
        wmb()
        flags = gt.GTF_permit_access | gt.GTF_sub_page | (0 if writable else gt.GTF_readonly)
        store16(view, off, flags)

    def grant_access_transitive(
        self, ref: int, domid: int, trans_domid: int, trans_gref: int, writable: bool = True
    ) -> None:
        """A v2 transitive grant: ``domid`` may copy (never map) through ``ref``
        whatever ``trans_domid`` granted this domain as ``trans_gref``.

        Writes domid, then trans_domid and gref, a write barrier, then
        ``GTF_transitive`` (grant_table.h's ``grant_entry_v2.transitive``; Xen
        4.17 ``acquire_grant_for_copy`` follows it one level deep), with
        ``GTF_readonly`` unless ``writable`` (Linux
        ``gnttab_grant_foreign_access_trans_ref``'s flags): Xen's
        ``_set_status_v2`` then refuses a copy into it.

        Raises:
            ValueError: v1 table, or ref not grantable.
        """
        if self.version != 2:
            raise ValueError("transitive grants need a v2 grant table (set_version(2))")
        self._check_grantable(ref)
        view, off = self._locate(ref)
        mv = memoryview(view)
        struct.pack_into("<HHHI", mv, off + 2, domid, trans_domid, 0, trans_gref)
        mv.release()
        wmb()
        # mutation: equivalent — 0->1: bit 0 is already set in GTF_transitive (3)
        store16(view, off, gt.GTF_transitive | (0 if writable else gt.GTF_readonly))

    def _check_grantable(self, ref: int) -> None:
        if not 0 <= ref < len(self._state) or self._state[ref] == _RESERVED:
            raise ValueError(f"grant ref {ref} is reserved or outside the table")
        if self._state[ref] != _USED:
            raise ValueError(f"grant ref {ref} was not allocated (get() it first)")
        if self._entry_flags(ref) & gt.GTF_type_mask:
            raise ValueError(f"grant ref {ref} is already granted (end access first)")

    def grant_foreign_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        """Allocate a ref and grant ``gfn`` to ``domid`` (Zephyr/Linux ``grant_access``).

        Returns:
            The grant reference.

        Raises:
            GrantTableFull: no free ref and the table cannot grow.
        """
        ref = self.get_nonblock()
        if ref is None:
            raise GrantTableFull("grant_foreign_access", 1, 0)
        self.grant_access(ref, domid, gfn, not readonly)
        return ref

    def try_end_access(self, ref: int, release_ref: bool = False) -> None:
        """End access to ``ref`` unless the peer has it mapped (mirage ``try_end_access``).

        Args:
            ref: a granted ref.
            release_ref: also put the ref back on the free list.

        Raises:
            Busy: the peer still maps it (GTF_reading/GTF_writing set).
            ValueError: ``ref`` is not a ref this table handed out.
        """
        # mutation: equivalent — 0->1: ref 0 is reserved, never _USED, refused either way
        if not 0 <= ref < len(self._state) or self._state[ref] != _USED:
            raise ValueError(f"try_end_access: grant ref {ref} was not allocated")
        view, off = self._locate(ref)
        if self.version == 1:
            flags = load16(view, off)
            while True:
                if flags & _INUSE:
                    raise Busy("try_end_access", [ref], decode_flags(flags))
                prev = cmpxchg16(view, off, flags, 0)
                if prev == flags:
                    break
                flags = prev
        else:
            store16(view, off, 0)
            mb()
            sview, soff = self._status_word(ref)
            status = load16(sview, soff)
            if status & _INUSE:
                raise Busy("try_end_access", [ref], decode_flags(status))
        if self._kept:
            gfn = self._kept.pop(ref, None)
            if gfn is not None:
                # the page stays ours: off any file the grantee may still hold
                end_grant = getattr(self._hc, "end_grant", None)
                if end_grant is not None:
                    with contextlib.suppress(HypercallError):
                        end_grant([gfn])
        if release_ref:
            self.put(ref)

    def end_access(self, ref: int, release_ref: bool = False, timeout: float | None = None) -> None:
        """Like :meth:`try_end_access`, retrying until the peer unmaps.

        Raises:
            Busy: ``timeout`` expired.
        """
        retry_while_busy(lambda: self.try_end_access(ref, release_ref), timeout)

    async def end_access_async(
        self, ref: int, release_ref: bool = False, timeout: float | None = None
    ) -> None:
        """asyncio twin of :meth:`end_access`."""
        await retry_while_busy_async(lambda: self.try_end_access(ref, release_ref), timeout)

    def end_access_deferred(self, ref: int, resource: object = None) -> bool:
        """End access now, or later if busy (Linux ``gnttab_end_foreign_access``).

        The ref (and ``resource``, released with ``.free()`` or ``.close()``
        if it has one) is freed once the peer lets go; later calls on this
        table retry deferred entries, as Linux's timer does.

        Returns:
            True if access ended now.
        """
        try:
            self.try_end_access(ref, release_ref=True)
        except Busy:
            with self._lock:
                self._deferred.append((ref, True, resource))
                self._arm_reaper()
            # Linux gnttab_add_deferred: pr_debug("deferring g.e. %#x (pfn %#lx)")
            _logger.debug("d%d: deferring the end of access to ref %d (still in use)",
                          self.domain.domid, ref)
            return False
        _free_resource(resource)
        return True

    def _reap_deferred(self) -> None:
        if self._orphans:
            self._orphans = [retry for retry in self._orphans if not retry()]
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        for ref, release, resource in pending:
            try:
                self.try_end_access(ref, release)
            except Busy:
                self._deferred.append((ref, release, resource))
                continue
            _logger.debug("d%d: deferred end of access to ref %d done", self.domain.domid, ref)
            _free_resource(resource)

    @property
    def deferred(self) -> int:
        """Releases still pending: deferred ends of access and orphaned memory."""
        return len(self._deferred) + len(self._orphans)

    def reap_deferred(self) -> int:
        """Retry deferred ends of access now.

        Returns:
            How many are still pending.
        """
        with self._lock:
            self._reap_deferred()
            return self.deferred

    def _arm_reaper(self) -> None:
        """Start the reaper's timer unless it is pending (called with ``_lock`` held).

        Linux ``gnttab_add_deferred``: ``if (!timer_pending(&deferred_timer))
        { deferred_timer.expires = jiffies + HZ; add_timer(...); }``.
        """
        if self._reaper is not None or self._reaper_stopped:
            return
        timer = threading.Timer(REAP_INTERVAL, self._reap_tick)
        timer.daemon = True
        timer.name = f"xengrant-reaper-d{self.domid}"
        self._reaper = timer
        timer.start()

    def _reap_tick(self) -> None:
        """One tick of the reaper (Linux ``gnttab_handle_deferred``): retry every
        deferred release, re-arm while some are still pending."""
        with self._lock:
            self._reaper = None
            if self._reaper_stopped:
                return
            try:
                self._reap_deferred()
            except Exception:  # e.g. the hypervisor went away: stop ticking
                _logger.exception("d%d: the reaper of deferred releases stops", self.domid)
                self._reaper_stopped = True
                return
            if self.deferred:
                self._arm_reaper()

    def stop_reaper(self) -> None:
        """Cancel the reaper's timer and keep it from being armed again.

        Deferred releases stay pending; :meth:`reap_deferred` still retries
        them.  Waits for a tick already running to finish, so no reaper
        thread is left behind.
        """
        with self._lock:
            self._reaper_stopped = True
            timer, self._reaper = self._reaper, None
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join()

    @property
    def reaper_pending(self) -> bool:
        """True while the reaper's timer is armed."""
        return self._reaper is not None

    def _leaks(self) -> list[str]:
        """This table's part of :func:`xengrant.leaks.guest_leaks`."""
        out: list[str] = []
        name = f"d{self.domid}"
        with self._lock:
            deferred = {ref for ref, _rel, _res in self._deferred}
            used = [ref for ref, st in enumerate(self._state) if st == _USED]
            orphans = len(self._orphans)
        for ref in used:
            e = self.entry(ref)
            if ref in deferred:
                what = f"end of access deferred (d{e.domid} still maps it: {decode_flags(e.flags)})"
            elif e.type:
                what = f"still granted to d{e.domid} ({decode_flags(e.flags)})"
            else:
                what = "handed out and never put back"
            out.append(f"{name} ref {ref}: {what}")
        if orphans:
            out.append(f"{name}: {orphans} release(s) waiting for views of their memory to go")
        return out

    # ------------------------------------------------------- free callbacks
    def request_free_callback(self, fn: Callable[[], None], count: int = 1) -> FreeCallback:
        """Call ``fn()`` once ``count`` refs can be had (Linux ``gnttab_request_free_callback``).

        One-shot: ``fn`` runs once, with the table's lock held (it may take
        refs with :meth:`get_n_nonblock`), as soon as :meth:`num_free_grants`
        reaches ``count`` -- now, if it already has.  An exception ``fn``
        raises is logged, never raised in the caller of ``put``.

        Args:
            fn: the callback.
            count: refs wanted.

        Returns:
            A :class:`FreeCallback`; ``cancel()`` it to drop the request
            (Linux ``gnttab_cancel_free_callback``).
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        cb = FreeCallback(self, fn, count)
        with self._lock:
            self._free_callbacks.append(cb)
            self._run_free_callbacks()
        return cb

    def _run_free_callbacks(self) -> None:
        """Linux ``do_free_callbacks`` (``_lock`` held): run the satisfied ones, once."""
        if not self._free_callbacks:
            return
        free = self.num_free_grants()
        due = [cb for cb in self._free_callbacks if cb.count <= free]
        if not due:
            return
        self._free_callbacks = [cb for cb in self._free_callbacks if cb.count > free]
        for cb in due:
            cb.done = True
            try:
                cb.fn()
            except Exception:
                _logger.exception("free callback %r raised", cb.fn)

    def set_readonly(self, ref: int) -> None:
        """Writable -> read-only: cmpxchg ``GTF_readonly`` in while ``!GTF_writing``.

        Raises:
            Busy: the peer has it mapped writable.
        """
        view, off = self._locate(ref)
        flags = load16(view, off)
        while True:
            if self.version == 1 and flags & gt.GTF_writing:
                raise Busy("set_readonly", [ref], "mapped writable")
            if self.version == 2:
                sview, soff = self._status_word(ref)
                if load16(sview, soff) & gt.GTF_writing:
                    raise Busy("set_readonly", [ref], "mapped writable")
            prev = cmpxchg16(view, off, flags, flags | gt.GTF_readonly)
            if prev == flags:
                return
            flags = prev

    def set_writable(self, ref: int) -> None:
        """Read-only -> writable: an atomic bit clear of ``GTF_readonly``."""
        view, off = self._locate(ref)
        fetch_and16(view, off, 0xFFFF & ~gt.GTF_readonly)

    # ----------------------------------------------------------- sharing
    def share_pages(self, domid: int, count: int, writable: bool = True) -> Share:
        """Allocate ``count`` pages and grant them to ``domid`` (mirage ``share_pages``).

        Returns:
            A :class:`Share`: its ``refs`` and one contiguous ``mem``.

        Raises:
            ValueError: count < 1.
            GrantTableFull: not enough free refs (nothing is allocated).
            MemoryError: no memory for the pages (no ref is kept).
        """
        if count < 1:
            raise ValueError(f"share_pages: count must be >= 1, not {count}")
        pages = self.domain.alloc_pages(count)
        refs = self.get_n_nonblock(count)
        if not refs:
            free = self.num_free_grants()
            pages.free()
            raise GrantTableFull("share_pages", count, free)
        # The refs were just handed out (_USED, inside the table): of
        # _check_grantable only the entry check is left, done by _write_entry
        # (and by grant_run, which introduces v1 entries in C until one fails).
        gfns = pages.gfns
        done = 0
        # mutation: equivalent — the bounds only choose grant_run: _write_entry below
        # writes the same entries (and refuses a domid that does not fit alike)
        fits = 0 <= domid <= 0xFFFF
        if self.version == 1 and fits:
            flags = gt.GTF_permit_access | (0 if writable else gt.GTF_readonly)
            done = grant_run(self._frames, refs, gfns, 0, domid, flags)
        i = done
        try:
            for i in range(done, count):
                self._write_entry(refs[i], domid, gfns[i], writable, check=True)
        except (ValueError, OverflowError, TypeError):
            self._undo_share(refs, i, pages)
            raise
        view = pages._view
        assert view is not None  # fresh pages: their view is theirs until now
        share = Share(self, domid, refs, writable, view, resource=pages)
        pages.mem.release()
        pages.freed = True  # the share owns the pages now
        return share

    def alloc_and_grant(self, domid: int = 0, readonly: bool = False) -> Share:
        """One new page granted to ``domid`` (Zephyr ``gnttab_alloc_and_grant``).

        Zephyr grants to domain 0 with no choice; here ``domid`` defaults to 0.

        Returns:
            A one-page :class:`Share` (``refs[0]``, ``mem``).
        """
        return self.share_pages(domid, 1, writable=not readonly)

    def _undo_share(self, refs: list[int], granted: int, pages: Pages) -> None:
        """A share that failed at ``refs[granted]``: end what was granted, free the rest.

        A ref whose entry someone else granted stays allocated: freeing it
        would hand a live grant out again.
        """
        for ref in refs[:granted]:
            self.try_end_access(ref)  # nobody knows these refs yet: never busy
        idle = [r for r in refs[granted:] if not self._entry_flags(r) & gt.GTF_type_mask]
        self.put_n(refs[:granted] + idle)
        pages.free()

    def _end_run(self, refs: list[int], start: int) -> int:
        """End access to ``refs[start:]`` in C while it succeeds (v1 tables).

        Returns:
            The index of the first ref not ended (``len(refs)`` if all were).
        """
        if self.version != 1 or type(refs) is not list:
            return start
        return int(end_run(self._frames, self._state, refs, start))

    def _try_unshare(self, share: Share, release_refs: bool) -> None:
        ended = self._end_run(share.refs, 0)
        if ended:
            if release_refs:
                self.put_n(share.refs[:ended])
            del share.refs[:ended]
        while share.refs:
            ref = share.refs[0]
            try:
                self.try_end_access(ref, release_ref=release_refs)
            except Busy as e:
                raise Busy("try_unshare", list(share.refs), f"ref {ref}: {e.detail}") from None
            share.refs.pop(0)
        pages: Pages = share.resource
        share._release_memory()
        pages._view = None
        self.domain._free_ram(pages.gfns)
        share.released = True

    def _abandon_share(self, share: Share) -> None:
        """Let go of a share without waiting: end access now or defer it (never leak).

        Used for a share dropped unreleased and by ``gntshr.unshare`` (gntalloc's
        DEALLOC_GREF). The pages are freed once every ref has ended and no view
        of them is left (a numpy array may outlive the Share).
        """
        pages: Pages = share.resource
        share.released = True
        try:
            share.mem.release()
        except BufferError:
            pass  # an export of ``mem`` itself; the view's close() waits for it
        orphan = _OrphanPages(self, pages.gfns, share._view, len(share.refs))
        refs, share.refs = list(share.refs), []
        i = 0
        while i < len(refs):
            ended = self._end_run(refs, i)  # the common case, in C
            if ended > i:
                self.put_n(refs[i:ended])
                orphan.left -= ended - i
            if ended < len(refs):
                ref = refs[ended]  # busy (or bad): end it or defer it, one at a time
                try:
                    self.try_end_access(ref, release_ref=True)
                    orphan.left -= 1
                except Busy:
                    with self._lock:
                        self._deferred.append((ref, True, orphan))
                        self._arm_reaper()
            i = ended + 1
        orphan.finish()

    def _orphan(self, retry: Callable[[], bool]) -> None:
        """Retry ``retry`` with the deferred ends of access until it returns True."""
        with self._lock:
            if retry not in self._orphans:
                self._orphans.append(retry)
                self._arm_reaper()

    @contextlib.contextmanager
    def with_grant(
        self, domid: int, writable: bool, ref: int, gfn: int, timeout: float | None = None
    ) -> Iterator[None]:
        """Grant for the block, then end access, waiting for the peer (mirage ``with_grant``).

        Raises:
            Busy: ``timeout`` passed with the page still mapped by the peer (its
                access is then deferred, never leaked).
        """
        with self.with_grants(domid, writable, [ref], [gfn], timeout):
            yield

    @contextlib.contextmanager
    def with_grants(
        self,
        domid: int,
        writable: bool,
        refs: Sequence[int],
        gfns: Sequence[int],
        timeout: float | None = None,
    ) -> Iterator[None]:
        """:meth:`with_grant` for several pages (mirage ``with_grants``): access ends
        in ``refs`` order, each waiting for the peer to unmap.

        Raises:
            ValueError: not one ref per page.
            Busy: ``timeout`` passed with a page still mapped by the peer (that
                one's access and the rest are then deferred, never leaked).
        """
        done = self._grant_all(domid, writable, refs, gfns)
        try:
            yield
        finally:
            for i, ref in enumerate(done):
                try:
                    self.end_access(ref, timeout=timeout)
                except Busy:
                    self._defer_all(done[i:])
                    raise

    @contextlib.asynccontextmanager
    async def with_grant_async(
        self, domid: int, writable: bool, ref: int, gfn: int, timeout: float | None = None
    ) -> AsyncIterator[None]:
        """asyncio twin of :meth:`with_grant`: the end of access waits without
        blocking the loop (``timeout``: :class:`Busy` after that many seconds)."""
        async with self.with_grants_async(domid, writable, [ref], [gfn], timeout):
            yield

    @contextlib.asynccontextmanager
    async def with_grants_async(
        self,
        domid: int,
        writable: bool,
        refs: Sequence[int],
        gfns: Sequence[int],
        timeout: float | None = None,
    ) -> AsyncIterator[None]:
        """asyncio twin of :meth:`with_grants` (mirage ``with_grants`` under Lwt).

        Raises:
            ValueError: not one ref per page.
            Busy: ``timeout`` expired with a page still mapped by the peer
                (its access is then deferred, never leaked).
        """
        done = self._grant_all(domid, writable, refs, gfns)
        try:
            yield
        finally:
            for i, ref in enumerate(done):
                try:
                    await self.end_access_async(ref, timeout=timeout)
                except Busy:
                    self._defer_all(done[i:])
                    raise

    def _grant_all(
        self, domid: int, writable: bool, refs: Sequence[int], gfns: Sequence[int]
    ) -> list[int]:
        """Grant each page in order (both ``with_grants``): the refs granted.

        A grant that fails ends those made before it (now, or deferred to the
        reaper if the peer mapped one already) and raises.

        Raises:
            ValueError: not one ref per page.
        """
        if len(refs) != len(gfns):
            raise ValueError(f"{len(refs)} refs for {len(gfns)} pages")
        done: list[int] = []
        try:
            for ref, gfn in zip(refs, gfns):
                self.grant_access(ref, domid, gfn, writable)
                done.append(ref)
        except BaseException:
            self._defer_all(done)
            raise
        return done

    def _defer_all(self, refs: Sequence[int]) -> None:
        """:meth:`_defer_end` each of ``refs``."""
        for ref in refs:
            self._defer_end(ref)

    def _defer_end(self, ref: int) -> None:
        """End access to a ref the caller keeps, now or by the reaper later."""
        try:
            self.try_end_access(ref)
        except Busy:
            with self._lock:
                self._deferred.append((ref, False, None))
                self._arm_reaper()

    # ------------------------------------------------------------ mapping
    def map_refs(self, ops: WritableBuffer, count: int | None = None) -> int:
        """Map a batch of prepared ``gnttab_map_grant_ref`` ops (Zephyr ``gnttab_map_refs``).

        Each op's ``status``, ``handle`` and ``dev_bus_addr`` are filled in;
        ``host_addr`` should be ``gfn << 12`` of a gfn from :meth:`Domain.get_pages`.
        An op answered ``GNTST_eagain`` (its frame paged out) is re-issued
        alone, 1 ms, 2 ms, ... up to 255 ms apart, then marked
        ``GNTST_bad_page`` (Linux ``gnttab_map_refs`` / ``gnttab_retry_eagain_gop``).

        Returns:
            The hypercall's return, 0: check each op's status.
        """
        rc = self.domain.grant_table_op(gt.GNTTABOP_map_grant_ref, ops, count)
        self._retry_eagain(gt.GNTTABOP_map_grant_ref, ops, count)
        return rc

    def _retry_eagain(self, cmd: int, ops: Any, count: int | None) -> None:
        """Re-issue each op of ``ops`` that answered ``GNTST_eagain``, alone
        (Linux ``gnttab_batch_map``/``gnttab_batch_copy``)."""
        if isinstance(ops, ctypes.Structure):
            ops = (type(ops) * 1).from_buffer(ops)
        n = len(ops) if count is None else count
        for i in range(n):
            op = ops[i]
            if op.status != gt.GNTST_eagain:
                continue

            def issue(op: Any = op) -> int:
                self.domain.grant_table_op(cmd, op, 1)
                return int(op.status)

            op.status = retry_eagain_gop(issue)

    def unmap_refs(self, ops: WritableBuffer, count: int | None = None) -> int:
        """Unmap a batch of ``gnttab_unmap_grant_ref`` ops (Zephyr ``gnttab_unmap_refs``)."""
        return self.domain.grant_table_op(gt.GNTTABOP_unmap_grant_ref, ops, count)

    def copy(self, ops: ctypes.Array[gt.gnttab_copy], count: int | None = None) -> list[int]:
        """A batch of ``gnttab_copy`` ops (Linux ``gnttab_batch_copy``).

        An op answered ``GNTST_eagain`` is retried as :meth:`map_refs` retries.

        Returns:
            Each op's status.
        """
        self.domain.grant_table_op(gt.GNTTABOP_copy, ops, count)
        self._retry_eagain(gt.GNTTABOP_copy, ops, count)
        n = len(ops) if count is None else count
        # mutation: equivalent — for the ops copy() takes (a ctypes array of
        # gnttab_copy, count within it) this test only chooses the strided read; the
        # per-op reads below give the same statuses.
        if (
            VECTOR
            and isinstance(ops, ctypes.Array)
            and ops._type_ is gt.gnttab_copy
            and 0 <= n <= len(ops)
        ):
            # struct gnttab_copy is 40 bytes, status an int16_t at offset 36:
            # one strided read instead of n ctypes attribute reads.
            with memoryview(ops) as raw, raw.cast("B") as b, b.cast("h") as h:
                return h[18 : 20 * n : 20].tolist()
        return [int(ops[i].status) for i in range(n)]

    def map_grants(
        self, grants: Sequence[tuple[int, int]], writable: bool = True
    ) -> Mapping:
        """Map ``(domid, ref)`` grants contiguously (libxengnttab ``map_grant_refs``).

        All or nothing: if any page fails, the others are unmapped again.

        Raises:
            GrantError: a single grant failed (its GNTST code).
            BatchError: some of several failed (every entry's status).
            ValueError: no grants.
        """
        return self._map([d for d, _ in grants], [r for _, r in grants], writable)

    def map_domain_refs(self, domid: int, refs: Sequence[int], writable: bool = True) -> Mapping:
        """:meth:`map_grants` of several refs of one domain (``map_domain_grant_refs``)."""
        return self._map([domid] * len(refs), list(refs), writable)

    def _map(self, domids: list[int], refs: list[int], writable: bool) -> Mapping:
        """:meth:`map_grants` with the domids and refs apart."""
        domain = self.domain
        gfns, buf = map_ops_at_holes(domain, domids, refs, writable)
        n = len(gfns)
        rc = self._hc.grant_table_op(gt.GNTTABOP_map_grant_ref, memoryview(buf), n)
        if rc < 0:
            domain.put_pages(gfns)
            check_rc("map_grant_ref", rc)
        statuses, handles = map_results(buf, n)
        if gt.GNTST_eagain in statuses:
            statuses, handles = self._retry_eagain_packed(buf, n, statuses)
        if any(statuses):
            self._map_failed(domids, refs, gfns, statuses, handles)
        view = self._hc.map_gfns(gfns, writable)
        return Mapping(
            self,
            domids,
            refs,
            writable,
            view,
            handles,
            resource=gfns,
        )

    def _retry_eagain_packed(
        self, buf: bytearray, n: int, statuses: list[int]
    ) -> tuple[list[int], list[int]]:
        """gntdev's map (Linux ``gnttab_map_refs``): re-issue each packed op that
        answered ``GNTST_eagain``; a retry refused as a whole counts as bad_page.

        Returns:
            The statuses and handles after the retries.
        """
        size = MAP_OP.size
        for i, st in enumerate(statuses):
            if st != gt.GNTST_eagain:
                continue
            one = memoryview(buf)[i * size : (i + 1) * size]

            def issue(one: memoryview = one) -> int:
                if self._hc.grant_table_op(gt.GNTTABOP_map_grant_ref, one, 1) < 0:
                    return gt.GNTST_bad_page
                return int(MAP_OP.unpack_from(one)[4])

            final = retry_eagain_gop(issue)
            struct.pack_into("<h", buf, i * size + 18, final)
        return map_results(buf, n)

    def _map_failed(
        self,
        domids: Sequence[int],
        refs: Sequence[int],
        gfns: list[int],
        statuses: list[int],
        handles: list[int],
    ) -> NoReturn:
        """All or nothing (gntdev_map_grant_pages): unmap the ops that did map,
        give the holes back, raise.

        Raises:
            GrantError: one grant (its GNTST code and Xen's debug reason).
            BatchError: several, some failed (each entry's status).
            HypercallError: the unmap of the ones that did map was refused
                (the holes are kept then: they may still hold pages).
        """
        reasons = "; ".join(getattr(self._hc, "last_reasons", ()))
        ok = [(g, h) for g, h, s in zip(gfns, handles, statuses) if s == gt.GNTST_okay]
        self._unmap_handles([g for g, _ in ok], [h for _, h in ok])
        self.domain.put_pages(gfns)
        raise map_failure(domids, refs, statuses, reasons)

    def _unmap_handles(self, gfns: Sequence[int], handles: Sequence[int]) -> list[int]:
        n = len(handles)
        if not n:
            # mutation: equivalent — only _map_failed gets here with no handle, and it
            # ignores the answer (a Mapping always has handles)
            return []
        buf = pack_unmap_ops(gfns, handles)
        check_rc(
            "unmap_grant_ref",
            self._hc.grant_table_op(gt.GNTTABOP_unmap_grant_ref, memoryview(buf), n),
        )
        return unmap_statuses(buf, n)

    def _unmap(self, mapping: Mapping) -> None:
        mapping._release_memory()
        gfns: list[int] = mapping.resource
        assert mapping.handles is not None
        statuses = self._unmap_handles(gfns, mapping.handles)
        mapping.released = True
        self.domain.put_pages(gfns)
        if any(statuses):
            raise BatchError("unmap_grant_ref", statuses)

    # ----------------------------------------------------------- transfer
    def grant_transfer(self, domid: int, gfn: int = 0) -> int:
        """Offer to accept a page from ``domid`` (Linux ``gnttab_grant_foreign_transfer``).

        Args:
            domid: the domain that may give a page.
            gfn: for a translated guest, where the page will appear.

        Returns:
            The ref to hand to the giver.
        """
        ref = self.get_nonblock()
        if ref is None:
            raise GrantTableFull("grant_transfer", 1, 0)
        view, off = self._locate(ref)
        self._introduce_entry(view, off, domid, gfn, gt.GTF_accept_transfer)
        return ref

    def end_transfer(self, ref: int, release_ref: bool = True) -> int:
        """Close an accept-transfer entry (Linux ``gnttab_end_foreign_transfer_ref``).

        Returns:
            The frame received (PV: machine frame; translated: the gfn), or
            0 if nothing was transferred.
        """
        view, off = self._locate(ref)
        flags = load16(view, off)
        while not flags & gt.GTF_transfer_committed:
            prev = cmpxchg16(view, off, flags, 0)
            if prev == flags:
                if release_ref:
                    self.put(ref)
                return 0
            flags = prev
        # Committed: Xen sets completed right after writing the frame.
        # mutation: equivalent — in process the transfer hypercall sets both bits before
        # the guest runs again; this wait matters against a service in another process.
        while not load16(view, off) & gt.GTF_transfer_completed:
            time.sleep(0)
        if self.version == 1:
            frame = int(load32(view, off + 4))
        else:
            mv = memoryview(view)
            frame = int.from_bytes(mv[off + 8 : off + 16], "little")
            mv.release()
        store16(view, off, 0)
        if release_ref:
            self.put(ref)
        return frame

    def transfer(self, gfn: int, domid: int, ref: int) -> None:
        """Give page ``gfn`` to ``domid`` through its accept-transfer ``ref``.

        Raises:
            GrantError: the op's status (a translated caller gets
                ``GNTST_general_error`` and keeps the page).
        """
        buf = bytearray(_TRANSFER.size)
        # mutation: equivalent — the 0 is the op's status, an output
        _TRANSFER.pack_into(buf, 0, gfn, domid, ref, 0)
        check_rc("transfer", self._hc.grant_table_op(gt.GNTTABOP_transfer, memoryview(buf), 1))
        st = _TRANSFER.unpack_from(buf)[3]
        if st != gt.GNTST_okay:
            raise GrantError("transfer", st, f"page {gfn:#x} to d{domid} ref {ref}")

    # ------------------------------------------------------------ version
    def set_version(self, version: int) -> int:
        """``GNTTABOP_set_version``: switch between v1 and v2 entries.

        All entries past the reserved ones are cleared by Xen; the free list
        is kept (refs handed out stay handed out) but must not be granted
        while switching.

        Returns:
            The version now in force.

        Raises:
            HypercallError: -EINVAL, -ENOSYS, -EBUSY (something is mapped) ...
        """
        buf = bytearray(_VERSION.pack(version))
        with self._lock:
            rc = self._hc.grant_table_op(gt.GNTTABOP_set_version, memoryview(buf), 1)
            check_rc("set_version", rc)
            (now,) = _VERSION.unpack(buf)
            if now != self.version:
                self._rebuild_for_version(now)
            return int(now)

    def _rebuild_for_version(self, version: int) -> None:
        for v in self._status_frames:
            v.close()
        self._status_frames = []
        used = {ref for ref, s in enumerate(self._state) if s == _USED}
        self.version = version
        per = self.per_frame
        total = len(self._frames) * per
        self._state = bytearray(total)
        for ref in range(min(gt.GNTTAB_NR_RESERVED_ENTRIES, total)):
            self._state[ref] = _RESERVED
        for ref in used:
            if ref < total:
                self._state[ref] = _USED
        self._free = [
            r for r in range(total - 1, gt.GNTTAB_NR_RESERVED_ENTRIES - 1, -1) if r not in used
        ]
        if version == 2:
            self._map_status_frames()

    def get_version(self, domid: int = gt.DOMID_SELF) -> int:
        """``GNTTABOP_get_version``."""
        # mutation: equivalent — the 0 is the version, an output
        buf = bytearray(struct.pack("<H2xI", domid, 0))
        rc = self._hc.grant_table_op(gt.GNTTABOP_get_version, memoryview(buf), 1)
        check_rc("get_version", rc)
        return int(struct.unpack_from("<H2xI", buf)[1])

    # ------------------------------------------------------------ inspect
    def entries(self, only_valid: bool = True) -> list[GrantEntry]:
        """Every entry (or every valid one) of the mapped frames."""
        out = []
        for ref in range(self.nr_entries):
            e = self.entry(ref)
            if e.flags or not only_valid:
                out.append(e)
        return out


class FreeCallback:
    """A pending :meth:`GrantTable.request_free_callback` (Linux ``struct
    gnttab_free_callback``).

    Attributes:
        fn: the callback.
        count: refs it waits for.
        done: True once it ran.
    """

    def __init__(self, table: GrantTable, fn: Callable[[], None], count: int) -> None:
        self.table, self.fn, self.count, self.done = table, fn, count, False

    def cancel(self) -> bool:
        """Drop the request (Linux ``gnttab_cancel_free_callback``).

        Returns:
            True if it was still pending (``fn`` will not run), False if it
            already ran.
        """
        with self.table._lock:
            pending = self in self.table._free_callbacks
            self.table._free_callbacks = [cb for cb in self.table._free_callbacks if cb is not self]
            return pending


class _OrphanPages:
    """The pages of a dropped share: freed when all refs ended and no view is left."""

    def __init__(self, table: GrantTable, gfns: list[int], view: Any, refs_left: int) -> None:
        self.table, self.gfns, self.view, self.left = table, gfns, view, refs_left

    def free(self) -> None:
        """One ref ended (called by the deferred end of access)."""
        self.left -= 1
        self.finish()

    def finish(self) -> bool:
        """Free the pages if nothing uses them any more; else retry later."""
        if self.left > 0:
            return False
        try:
            self.view.close()
        except BufferError:
            self.table._orphan(self.finish)
            return False
        self.table.domain._free_ram(self.gfns)
        return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _free_resource(resource: Any) -> None:
    if resource is None:
        return
    for name in ("free", "close"):
        fn = getattr(resource, name, None)
        if fn is not None:
            fn()
            return


__all__ = ["FreeCallback", "GrantEntry", "GrantTable", "HypercallError", "decode_flags"]
