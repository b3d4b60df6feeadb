"""Maptrack: the mapper's record of each grant it mapped, found by handle.

Mirrors grant_table.c's ``struct grant_mapping`` and ``get_maptrack_handle``:
handles start at 0, the table grows one page of ``MAPTRACK_PER_PAGE`` handles
at a time up to ``max_maptrack_frames`` pages (default 1024, Xen's
``opt_max_maptrack_frames``), and freed handles are reused first-in first-out
(Xen keeps per-vCPU FIFO free lists), which keeps a stale handle from naming
a new mapping for as long as possible.

Xen 4.17's free list (``_get_maptrack_handle``: "Always keep one entry in the
free list to make it easier to add free entries to the tail") never hands out
its last entry: it stays as the tail sentinel.  A new page gives its first
handle to the caller and puts the rest at the head of the list
(``get_maptrack_handle``), and once no page may be added the vCPU can only
steal from other vCPUs' lists.  The emulated domain has one vCPU, so at most
``max_maptrack_frames * 256 - 1`` handles are in use at once, as on Xen.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

#: ``sizeof(struct grant_mapping)`` is 16 bytes: 256 handles per 4 KiB page.
MAPTRACK_PER_PAGE = 4096 // 16  # mutation: equivalent — 4097 // 16 is 256 too
#: Xen's default ``max_maptrack_frames`` (xen/common/grant_table.c).
DEFAULT_MAX_MAPTRACK_FRAMES = 1024


if TYPE_CHECKING:

    class Mapping:
        """One maptrack entry (``struct grant_mapping``) plus where it is mapped.

        A C struct (``xengrant._cext.GrantMapping``) so that the C map/unmap
        runs fill it in place; this is its interface for type checkers.

        Args and attributes:
            flags: GNTMAP_* still in force (0 once fully unmapped).
            domid: the granting domain.
            ref: the grant reference in the granter's table.
            mfn: the frame mapped.
            host_gfn: the mapper's gfn holding a host mapping, or -1.
        """

        flags: int
        domid: int
        ref: int
        mfn: int
        host_gfn: int

        def __init__(self, flags: int, domid: int, ref: int, mfn: int, host_gfn: int) -> None: ...

else:
    from .._cext import GrantMapping as Mapping


class Maptrack:
    """A domain's maptrack table.

    Args:
        max_frames: pages of maptrack the domain may use.
    """

    def __init__(self, max_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES) -> None:
        self.limit = max_frames * MAPTRACK_PER_PAGE  # maptrack_limit once fully grown
        self.entries: list[Mapping | None] = []
        self._free: deque[int] = deque()

    @property
    def frames(self) -> int:
        """Pages of maptrack allocated so far."""
        return len(self.entries) // MAPTRACK_PER_PAGE

    @property
    def in_use(self) -> int:
        """Handles currently naming a mapping."""
        return len(self.entries) - len(self._free)

    def get(self, entry: Mapping) -> int:
        """Allocate a handle for ``entry``.

        Returns:
            The handle, or -1 when the table is at its limit and only the
            free list's sentinel is left (the caller answers ``GNTST_no_space``).
        """
        free = self._free
        if len(free) > 1:  # _get_maptrack_handle keeps the tail sentinel
            handle = free.popleft()
        else:
            # get_maptrack_handle: a new page, its first entry for the caller,
            # the others at the head of the free list (before the sentinel).
            start = len(self.entries)
            if start >= self.limit:
                return -1  # steal_maptrack_handle: no other vCPU to steal from
            # mutation: equivalent — `+`: limit and start are whole pages, so the
            # minimum is a page either way
            grow = min(MAPTRACK_PER_PAGE, self.limit - start)
            self.entries.extend([None] * grow)
            free.extendleft(reversed(range(start + 1, start + grow)))
            handle = start
        self.entries[handle] = entry
        return handle

    def lookup(self, handle: int) -> Mapping | None:
        """The live entry for ``handle``, or None (bad or stale handle)."""
        if 0 <= handle < len(self.entries):
            return self.entries[handle]
        return None

    def put(self, handle: int) -> None:
        """Free a handle (``put_maptrack_handle``)."""
        self.entries[handle] = None
        self._free.append(handle)

    def live(self) -> list[tuple[int, Mapping]]:
        """Every handle in use, lowest first."""
        return [(h, m) for h, m in enumerate(self.entries) if m is not None]
