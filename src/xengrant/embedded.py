"""The embedded hypervisor: the emulator running in this process.

Machine memory is a memfd (``memfd_create``), mapped once; foreign and guest
views are slices of that mapping when their frames are contiguous and a fresh
``mmap`` of the memfd's frames (``MAP_FIXED`` over a reserved range) when not,
so mappings are real shared memory: a write through one domain's view is
seen through the other's with no copy.

The sans-IO :class:`~xengrant.emu.Hypervisor` holds the rules; this wrapper
owns the memfd and a lock that serialises hypercalls (Xen's grant-table locks).
Guests update their own entries with atomics, outside the lock, exactly as
real guests race the hypervisor on the shared entry.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _cext
from .abi.grant_table import GNTST_NAMES
from .emu import Hypervisor
from .emu.domain import DomainState
from .emu.faults import Faults
from .emu.grant_table import DEFAULT_MAX_GRANT_FRAMES
from .emu.machine import PAGE_SIZE
from .emu.maptrack import DEFAULT_MAX_MAPTRACK_FRAMES
from .errors import HypercallError
from .evtchn.embedded import EmbeddedEvtchn, EvtchnHub
from .hypercall import FrameView
from .xs_embedded import EmbeddedXenStore, XsHub

if TYPE_CHECKING:
    from .embedded_domain import EmbeddedDomain

#: Xen's debug reasons for failed ops (the hypervisor's gdprintk), at DEBUG
_logger = logging.getLogger("xengrant.emu")

#: Maptrack handles (or p2m entries) a domain's release walks per step: a
#: page of handles (Xen checks for preemption at each page boundary of
#: gnttab_release_mappings).
RELEASE_BUDGET = 256

#: Default machine memory: 1 GiB of frames.  The memfd is sparse, so frames
#: cost memory only once touched (and are given back when scrubbed).
DEFAULT_MEMORY = 1 << 30


class EmbeddedHypercalls:
    """The :class:`~xengrant.hypercall.Hypercalls` of one domain of an :class:`EmbeddedXen`."""

    def __init__(self, xen: EmbeddedXen, domid: int) -> None:
        self.xen = xen
        self.domid = domid
        #: Xen's debug reasons for the ops that failed in the last call
        #: (what ``gdprintk`` prints on the hypervisor console).
        self.last_reasons: list[str] = []
        self._hv = xen.hv
        self._lock = xen.lock

    def grant_table_op(self, cmd: int, uop: memoryview, count: int) -> int:
        with self._lock:
            xen = self.xen
            before = xen.log_count
            rc = self._hv.grant_table_op(self.domid, cmd, uop, count)
            if xen.log_count != before:
                fresh = xen.debug_log[-(xen.log_count - before) :]
                self.last_reasons = [r for d, _op, _st, r in fresh if d == self.domid]
            elif self.last_reasons:
                self.last_reasons = []
            return rc

    def populate_physmap(self, gfns: Sequence[int]) -> list[int]:
        with self._lock:
            return self._hv.populate_physmap(self.domid, gfns)

    def decrease_reservation(self, gfns: Sequence[int]) -> int:
        with self._lock:
            return self._hv.decrease_reservation(self.domid, gfns)

    def add_to_physmap(self, space: int, idx: int, gpfn: int) -> int:
        with self._lock:
            return self._hv.add_to_physmap(self.domid, space, idx, gpfn)

    def map_gfns(self, gfns: Sequence[int], writable: bool) -> FrameView:
        with self._lock:
            mfns = self._hv.translate(self.domid, gfns, writable)
            held = self._hv.hold_guest_frames(self.domid, gfns)  # PV: get_page_from_l1e
        if not held:
            return self.xen.view_frames(mfns, not writable)
        try:
            view = self.xen.view_frames(mfns, not writable)
        except BaseException:
            self.xen._release_guest_frames(held)
            raise
        # _cext.FrameView's on_close: run once when the view is unmapped
        raw: Any = view
        raw.on_close = functools.partial(self.xen._release_guest_frames, held)
        return view


class EmbeddedXen:
    """An emulated Xen hypervisor in this process.

    Args:
        memory: bytes of machine memory (a multiple of 4096).
        max_grant_frames: default grant-table size limit per domain (Xen: 64).
        max_maptrack_frames: default maptrack limit per domain (Xen: 1024).
        max_grant_version: 1 to refuse v2 tables (``gnttab=max-ver:1``).

    Example:
        >>> import xengrant
        >>> xen = xengrant.EmbeddedXen(memory=64 << 20)
        >>> front, back = xen.create_domain(), xen.create_domain()
        >>> share = front.grant_table.share_pages(back.domid, 1)
        >>> with back.gnttab.map_grant_ref(front.domid, share.refs[0]) as m:
        ...     share.mem[:5] = b"hello"
        ...     bytes(m.mem[:5])
        b'hello'
        >>> share.unshare()
        >>> xen.close()
    """

    def __init__(
        self,
        memory: int = DEFAULT_MEMORY,
        *,
        max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
        max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES,
        max_grant_version: int = 2,
    ) -> None:
        if memory <= 0 or memory % PAGE_SIZE:
            raise ValueError(f"memory must be a positive multiple of {PAGE_SIZE}, not {memory}")
        self.nr_frames = memory // PAGE_SIZE
        self.fd = os.memfd_create("xengrant-machine", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, memory)
            self._mmap = mmap.mmap(self.fd, memory, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.mem = memoryview(self._mmap)
        self.lock = threading.RLock()
        self.hv = Hypervisor(
            self.mem,
            self.nr_frames,
            max_grant_frames=max_grant_frames,
            max_maptrack_frames=max_maptrack_frames,
            max_grant_version=max_grant_version,
        )
        #: Fault injection for tests (:class:`xengrant.Faults`):
        #: ``with xen.faults.inject("eagain", op="map_grant_ref", count=2): ...``
        self.faults: Faults = self.hv.faults
        #: The guest handles create_domain returned (for leaks()).
        self._guests: weakref.WeakValueDictionary[int, EmbeddedDomain] = (
            weakref.WeakValueDictionary()
        )
        #: Every domain's event channels (the service's sans-IO core; dom0 privileged).
        self.evtchn_hub = EvtchnHub()
        #: The xenstore every domain's ``domain.xs`` connects to (xenstored's rules).
        self.xs_hub = XsHub()
        self._xs_conns: weakref.WeakSet[EmbeddedXenStore] = weakref.WeakSet()
        self._evtchn_handles: weakref.WeakSet[EmbeddedEvtchn] = weakref.WeakSet()
        self.debug_log: list[tuple[int, str, int, str]] = []
        self.log_count = 0
        self.hv.log = self._log
        self._closed = False

    def _log(self, domid: int, op: str, status: int, reason: str) -> None:
        # Xen's gdprintk(XENLOG_INFO/WARNING, ...) in grant_table.c: a debug build's reasons
        _logger.debug("d%d %s: %s (%d): %s", domid, op, GNTST_NAMES.get(status, status),
                      status, reason)
        log = self.debug_log
        log.append((domid, op, status, reason))
        self.log_count += 1
        if len(log) > 1000:
            del log[:500]

    # ---------------------------------------------------------- domains
    def create_domain(
        self,
        domid: int | None = None,
        *,
        pv: bool = False,
        max_grant_frames: int | None = None,
        max_maptrack_frames: int | None = None,
        max_pages: int | None = None,
    ) -> EmbeddedDomain:
        """Create a domain and return its guest handle (:class:`xengrant.Domain`,
        with event channels: ``.evtchn``).

        Args:
            domid: the id wanted, or None for the next free one.
            pv: a PV guest rather than HVM/PVH.
            max_grant_frames: its grant-table frame limit.
            max_maptrack_frames: its maptrack page limit.
            max_pages: its memory reservation in frames.

        Raises:
            HypercallError: EEXIST / EINVAL / ENOMEM (see ``Hypervisor.create_domain``).
        """
        from .embedded_domain import EmbeddedDomain

        with self.lock:
            new = self.hv.create_domain(
                domid,
                pv=pv,
                max_grant_frames=max_grant_frames,
                max_maptrack_frames=max_maptrack_frames,
                max_pages=max_pages,
            )
        self.evtchn_hub.add_domain(new)  # evtchn_init
        self.xs_hub.add_domain(new)  # libxl's domain dirs, @introduceDomain
        dom = EmbeddedDomain(self, EmbeddedHypercalls(self, new), pv=pv)
        self._guests[new] = dom
        return dom

    def leaks(self) -> list[str]:
        """Everything not released, one line each (:mod:`xengrant.leaks`).

        The hypervisor's side (RAM populated, entries granted, grants pinned,
        maptrack handles, zombie domains) for every domain, and the guest's
        side (refs handed out, deferred ends, pages and holes) of each
        :class:`~xengrant.Domain` this hypervisor created that is still alive
        (not destroyed).
        """
        from .leaks import guest_leaks, hypervisor_leaks

        with self.lock:
            out = hypervisor_leaks(self.hv)
        for domid, dom in sorted(self._guests.items()):
            st = self.hv.lookup(domid)
            if st is not None and not st.is_dying:  # a destroyed guest holds nothing
                out.extend(guest_leaks(dom))
        return out

    def check_leaks(self) -> None:
        """Assert that everything was released (for tests).

        Raises:
            LeakError: (an AssertionError) listing every leaked ref, page,
                mapping and pin.
        """
        from .leaks import LeakError

        found = self.leaks()
        if found:
            raise LeakError(found)

    def destroy_domain(self, domid: int) -> None:
        """Destroy a domain: its mappings go, pages others map stay until unmapped.

        Raises:
            HypercallError: ESRCH if there is no such live domain.
        """
        with self.lock:
            d = self.hv.kill_domain(domid)
        self.evtchn_hub.destroy_domain(domid)  # evtchn_destroy, from domain_kill
        self.xs_hub.destroy_domain(domid)  # its home goes, @releaseDomain
        # domain_relinquish_resources is preemptible (XSA-380): a page of 256
        # maptrack handles (or p2m entries) at a time, the lock free in
        # between, so other domains' hypercalls are not held up by a big release.
        while True:
            with self.lock:
                if self.hv.relinquish_resources(d, RELEASE_BUDGET):
                    return
            self._preempt()

    def evtchn_open(self, domid: int) -> EmbeddedEvtchn:
        """A new event-channel handle acting for ``domid`` (``xenevtchn_open``).

        Each handle has its own ports and queue, as each open of
        ``/dev/xen/evtchn`` has; :meth:`close` closes those still open.
        """
        handle = self.evtchn_hub.open(domid)
        self._evtchn_handles.add(handle)
        return handle

    def xs_open(self, domid: int) -> EmbeddedXenStore:
        """A new xenstore connection acting as ``domid`` (``xs_open``); :meth:`close`
        closes those still open.
        """
        conn = self.xs_hub.open(domid)
        self._xs_conns.add(conn)
        return conn

    def _preempt(self) -> None:
        """Between two steps of a domain's release (``hypercall_preempt_check``):
        the hypercall lock is free here."""

    def domain_state(self, domid: int) -> DomainState:
        """The hypervisor's record of a domain (for inspection and tests).

        Raises:
            HypercallError: ESRCH if there is none.
        """
        d = self.hv.lookup(domid)
        if d is None:
            raise HypercallError("domain_state", 3, f"no domain {domid}")
        return d

    def _release_guest_frames(self, mfns: list[int]) -> None:
        """A PV guest's view closed: its page references go (``put_page_from_l1e``)."""
        if self._closed:
            return
        with self.lock:
            self.hv.release_guest_frames(mfns)

    @property
    def free_frames(self) -> int:
        """Machine frames not in use."""
        return self.hv.machine.free_frames

    # ------------------------------------------------------------ memory
    def view_frames(self, mfns: Sequence[int], readonly: bool) -> FrameView:
        """A FrameView of machine frames: a slice when contiguous, else an mmap."""
        n = len(mfns)
        if n == 0:
            raise ValueError("no frames to view")
        first = mfns[0]
        view: FrameView
        if n == 1 or (mfns[-1] - first == n - 1 and list(mfns) == list(range(first, first + n))):
            view = _cext.borrow(self._mmap, first * PAGE_SIZE, n * PAGE_SIZE, readonly)
        else:
            view = _cext.vmap(self.fd, list(mfns), readonly)
        return view

    def close(self) -> None:
        """Release machine memory.  Views still alive keep the mapping open."""
        if self._closed:
            return
        self._closed = True
        for handle in list(self._evtchn_handles):
            handle.close()
        for conn in list(self._xs_conns):
            conn.close()
        self.mem.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a FrameView still borrows it: freed with the last one
        os.close(self.fd)

    def __enter__(self) -> EmbeddedXen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
