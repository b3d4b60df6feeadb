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
import errno
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._cext import cmpxchg16, fetch_and16, load16, load32, mb, store16, store32, wmb
from ..abi import grant_table as gt
from ..abi.memory import XENMAPIDX_grant_table_status, XENMAPSPACE_grant_table
from ..errors import Busy, GrantError, GrantTableFull, HypercallError
from ..hypercall import check_rc
from .deferred import REAP_INTERVAL, DeferredRelease
from .domain import Domain
from .free_list import FreeCallback, FreeList
from .grant_map import GrantMaps, map_failure, map_ops_at_holes
from .memory import GNTTAB_GFN_BASE, GNTTAB_STATUS_GFN_BASE
from .share import retry_while_busy, retry_while_busy_async
from .sharing import Sharing
from .table_base import _INUSE, _RESERVED, _USED, GrantTableBase, decode_flags
from .transfer import Transfer

_QUERY = struct.Struct("<H2xIIh2x")
_SETUP = struct.Struct("<H2xIh6xQ")
_STATUS_FRAMES = struct.Struct("<IHhQ")
_VERSION = struct.Struct("<I")


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


class GrantTable(FreeList, DeferredRelease, Sharing, GrantMaps, Transfer, GrantTableBase):
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


__all__ = [
    "REAP_INTERVAL",
    "FreeCallback",
    "GrantEntry",
    "GrantTable",
    "HypercallError",
    "decode_flags",
    "map_failure",
    "map_ops_at_holes",
]
