"""A grant table's free list of refs (Linux ``gnttab_alloc_grant_references`` /
``gnttab_free_grant_references``, mirage ``get``/``put``, Zephyr
``gnttab_get_ref``/``gnttab_put_ref``) and the callbacks waiting for free refs
(Linux ``gnttab_request_free_callback``).

Refs 0..7 are reserved (``GNTTAB_NR_RESERVED_ENTRIES``) and never handed out or
accepted back; the list is LIFO, and a full table grows a frame at a time
(Linux ``gnttab_expand``) up to ``max_nr_frames``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from .._cext import mark, put_run
from ..abi import grant_table as gt
from ..errors import GrantTableFull, GrantTableTimeout
from .share import RETRY_MAX
from .table_base import _RESERVED, _USED, GrantTableBase

_logger = logging.getLogger("xengrant.guest")


class FreeList(GrantTableBase):
    """The free list of a :class:`~xengrant.guest.gnttab.GrantTable`."""

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


class FreeCallback:
    """A pending :meth:`GrantTable.request_free_callback` (Linux ``struct
    gnttab_free_callback``).

    Attributes:
        fn: the callback.
        count: refs it waits for.
        done: True once it ran.
    """

    def __init__(self, table: FreeList, fn: Callable[[], None], count: int) -> None:
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


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
