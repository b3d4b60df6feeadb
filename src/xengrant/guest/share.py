"""Share and Mapping: the two resources a guest holds, released like files.

A :class:`Share` is pages granted to another domain (mirage's
``Gntshr.share``); a :class:`Mapping` is foreign grants mapped into this
domain (libxengnttab's mapped area).  Both are context managers, expose
their memory as ``mem`` (a memoryview numpy can wrap without a copy), and warn
with ``ResourceWarning`` when garbage-collected unreleased, as an unclosed
file does.  After release ``mem`` is released too: using it raises
``ValueError``, so a stale view can never reach a frame given back.

The owner (emulated grant table, or gntalloc/gntdev on real Xen) does the
work through the small :class:`ShareOwner`/:class:`MappingOwner` protocols.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Busy

#: end_access / unshare retry: first wait, and cap (Linux retries its
#: deferred list once a second; mirage's end_access sleeps 10 s).
RETRY_FIRST = 0.001
RETRY_MAX = 1.0


class ShareOwner(Protocol):
    def _try_unshare(self, share: Share, release_refs: bool) -> None: ...

    def _abandon_share(self, share: Share) -> None: ...


class MappingOwner(Protocol):
    def _unmap(self, mapping: Mapping) -> None: ...


class PageView(Protocol):
    """The memory a backend hands a :class:`Share` or :class:`Mapping`: a buffer
    (``memoryview(view)`` gives the bytes) that ``close()`` unmaps, refusing with
    ``BufferError`` while views of it are alive -- an emulated frame view
    (:class:`~xengrant.hypercall.FrameView`), Linux's ``mmap`` of gntalloc or
    gntdev, a ``mmap.mmap``."""

    def close(self) -> None: ...

    if TYPE_CHECKING:  # the buffer protocol (PEP 688), for type checkers only

        def __buffer__(self, flags: int, /) -> memoryview: ...


def _backoff(delay: float) -> float:
    return min(delay * 2, RETRY_MAX)


def _busy_delays(
    attempt: Callable[[], None], timeout: float | None, clock: Callable[[], float]
) -> Iterator[float]:
    """Call ``attempt`` until it stops raising :class:`Busy`; yield each wait between
    (1 ms, doubling up to 1 s) for the caller to sleep, blocking or not.

    Raises:
        Busy: the last attempt's, once ``timeout`` seconds of ``clock`` have passed.
    """
    deadline = None if timeout is None else clock() + timeout
    delay = RETRY_FIRST
    while True:
        try:
            attempt()
            return
        except Busy:
            if deadline is not None and clock() >= deadline:
                raise
        yield delay
        delay = _backoff(delay)


def retry_while_busy(attempt: Callable[[], None], timeout: float | None) -> None:
    """Call ``attempt`` until it stops raising :class:`Busy`, backing off 1 ms..1 s.

    Raises:
        Busy: the last attempt's, once ``timeout`` seconds have passed.
    """
    for delay in _busy_delays(attempt, timeout, time.monotonic):
        time.sleep(delay)


async def retry_while_busy_async(attempt: Callable[[], None], timeout: float | None) -> None:
    """asyncio twin of :func:`retry_while_busy` (sleeps without blocking the loop)."""
    for delay in _busy_delays(attempt, timeout, asyncio.get_running_loop().time):
        await asyncio.sleep(delay)


class HoldsView:
    """Something whose memory is ``mem``, a memoryview of the frame view ``_view``."""

    mem: memoryview
    _view: PageView | None

    def _release_memory(self) -> None:
        """Release ``mem`` and close the view (unmapping it).

        Raises:
            BufferError: other views (slices, numpy arrays) are alive; ``mem``
                stays usable and nothing is closed.
        """
        self.mem.release()
        view = self._view
        if view is None:  # given up already (the pages went to a share)
            return
        try:
            view.close()
        except BufferError:
            self.mem = memoryview(view)
            raise


class Share(HoldsView):
    """Pages shared with one domain by grant reference.

    Attributes:
        domid: the domain the pages are granted to.
        refs: the grant references still shared, one per page, in page order.
        writable: whether the peer may write.
        mem: memoryview of all the pages (contiguous).
        nr_pages: pages in the share.
    """

    def __init__(
        self,
        owner: ShareOwner,
        domid: int,
        refs: Sequence[int],
        writable: bool,
        view: PageView,
        resource: object = None,
    ) -> None:
        self._owner = owner
        self.domid = domid
        self.refs = list(refs)
        self.nr_pages = len(self.refs)
        self.writable = writable
        self._view = view
        self.mem = memoryview(view)
        #: the backend's own data (the pages, the gntalloc index): only the
        #: backend that made the share reads it, knowing its type
        self.resource: Any = resource
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else f"refs={self.refs}"
        return f"<Share to d{self.domid} {self.nr_pages} page(s) {state}>"

    def try_unshare(self, release_refs: bool = True) -> None:
        """End access to every page, in order; stop at the first busy one.

        Args:
            release_refs: also return each ended ref to the free list.

        Raises:
            Busy: a page is still mapped by the peer; ``refs`` keeps the refs
                not yet ended (call again later).
            BufferError: all access ended but views of ``mem`` are alive, so
                the pages cannot be freed yet (call again after releasing them).
        """
        if not self.released:
            self._owner._try_unshare(self, release_refs)

    def unshare(self, release_refs: bool = True, timeout: float | None = None) -> None:
        """Like :meth:`try_unshare`, retrying until the peer lets go.

        Args:
            release_refs: also return each ref to the free list.
            timeout: give up after this many seconds (None: wait forever).

        Raises:
            Busy: ``timeout`` expired with refs still in use.
        """
        retry_while_busy(lambda: self.try_unshare(release_refs), timeout)

    async def unshare_async(self, release_refs: bool = True, timeout: float | None = None) -> None:
        """asyncio twin of :meth:`unshare`."""
        await retry_while_busy_async(lambda: self.try_unshare(release_refs), timeout)

    def end_or_defer(self) -> bool:
        """Stop sharing without waiting (Linux ``gnttab_end_foreign_access``).

        Access ends now for every page the peer no longer maps; for a page it
        still maps the end of access is deferred, retried by the table's
        reaper (every second, as Linux's ``deferred_timer``) and the pages
        are freed once the last one ends and no view of them is left.

        Returns:
            True if everything was released now, False if some of it was deferred.
        """
        if self.released:
            return True
        try:
            self.try_unshare()
            return True
        except (Busy, BufferError):
            # busy: the peer still maps a page; BufferError: access ended but a
            # view (a numpy array) still holds the memory.  Never block: defer.
            self._owner._abandon_share(self)
            return False

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc: object) -> None:
        # Never blocks: a page still mapped by the peer is deferred, and an
        # exception raised in the block propagates unchanged.
        self.end_or_defer()

    async def __aenter__(self) -> Share:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.end_or_defer()

    def __del__(self) -> None:
        if getattr(self, "released", True):
            return
        warnings.warn(
            f"unreleased {self!r}: call unshare() (ending access now or deferring it)",
            ResourceWarning,
            stacklevel=2,
            source=self,
        )
        try:
            self._owner._abandon_share(self)
        except Exception:  # pragma: no cover - never raise from __del__
            pass


class Mapping(HoldsView):
    """Foreign grants mapped into this domain as one contiguous buffer.

    Attributes:
        domids: the granting domain of each page.
        refs: the grant reference of each page.
        writable: False for a read-only mapping (``mem`` refuses writes).
        mem: memoryview of the pages.
        handles: the maptrack handle of each page (emulated) or None.
    """

    def __init__(
        self,
        owner: MappingOwner,
        domids: Sequence[int],
        refs: Sequence[int],
        writable: bool,
        view: PageView,
        handles: Sequence[int] | None = None,
        resource: object = None,
    ) -> None:
        self._owner = owner
        self.domids = list(domids)
        self.refs = list(refs)
        self.writable = writable
        self.handles = list(handles) if handles is not None else None
        self._view = view
        self.mem = memoryview(view)
        #: the backend's own data (the gfns, the gntdev index), for that backend
        self.resource: Any = resource
        self.released = False

    def __repr__(self) -> str:
        state = "unmapped" if self.released else f"{len(self.refs)} page(s)"
        return f"<Mapping {'rw' if self.writable else 'ro'} refs={self.refs} {state}>"

    def __len__(self) -> int:
        return 0 if self.released else len(self.mem)

    def unmap(self) -> None:
        """Unmap every page.

        Raises:
            BufferError: views of ``mem`` (slices, numpy arrays) are alive;
                nothing is unmapped.
            GrantError: the hypervisor refused an unmap (not expected).
        """
        if not self.released:
            self._owner._unmap(self)

    close = unmap

    def _retry_unmap(self) -> bool:
        try:
            self.unmap()
        except BufferError:
            return False
        return True

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.unmap()
        except BufferError:
            if exc_type is None:
                raise  # nothing else went wrong: say why nothing was unmapped
            # The block's exception must surface, not this one: unmap once
            # the last view goes (retried with the deferred ends of access).
            orphan = getattr(self._owner, "_orphan", None)
            if orphan is not None:
                orphan(self._retry_unmap)

    async def __aenter__(self) -> Mapping:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.__exit__(exc_type, exc, tb)

    def __del__(self) -> None:
        if getattr(self, "released", True):
            return
        warnings.warn(
            f"unreleased {self!r}: call unmap()", ResourceWarning, stacklevel=2, source=self
        )
        try:
            self.unmap()
        except BufferError:
            # A view (numpy array) outlives us: unmap once it is gone.
            orphan = getattr(self._owner, "_orphan", None)
            if orphan is not None:
                orphan(self._retry_unmap)
        except Exception:  # pragma: no cover - never raise from __del__
            pass
