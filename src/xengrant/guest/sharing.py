"""Sharing pages: allocate RAM and grant it (mirage ``share_pages``, Zephyr
``gnttab_alloc_and_grant``), unshare, and grants for the length of a block
(mirage ``with_grant``/``with_grants``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence

from .._cext import end_run, grant_run
from ..abi import grant_table as gt
from ..errors import Busy, GrantTableFull
from .domain import Pages
from .share import Share
from .table_base import GrantTableBase


class Sharing(GrantTableBase):
    """Shares of a :class:`~xengrant.guest.gnttab.GrantTable`."""

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
