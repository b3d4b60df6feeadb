"""Deferred releases of a grant table: ends of access that wait for the peer to
unmap (Linux ``gnttab_end_foreign_access`` / ``gnttab_add_deferred``, retried
by ``gnttab_handle_deferred`` on a one-second timer) and the memory of a
share dropped while views of it are still alive.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import Busy
from .domain import Pages
from .share import Share
from .table_base import _USED, GrantTableBase, decode_flags

_logger = logging.getLogger("xengrant.guest")

#: Seconds between the reaper's retries of deferred releases (Linux's
#: ``deferred_timer``: ``jiffies + HZ``, one second).
REAP_INTERVAL = 1.0


class DeferredRelease(GrantTableBase):
    """The deferred releases of a :class:`~xengrant.guest.gnttab.GrantTable`."""

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
            _logger.debug(
                "d%d: deferring the end of access to ref %d (still in use)", self.domain.domid, ref
            )
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


class _OrphanPages:
    """The pages of a dropped share: freed when all refs ended and no view is left."""

    def __init__(self, table: DeferredRelease, gfns: list[int], view: Any, refs_left: int) -> None:
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


def _free_resource(resource: Any) -> None:
    if resource is None:
        return
    for name in ("free", "close"):
        fn = getattr(resource, name, None)
        if fn is not None:
            fn()
            return
