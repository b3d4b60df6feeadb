"""A guest's physical address space: RAM pages, holes for foreign mappings.

Layout of a translated (HVM/PVH) guest, in guest frame numbers:

- ``RAM_GFN_BASE`` upward: RAM the guest populates (``XENMEM_populate_physmap``).
- ``GNTTAB_GFN_BASE + idx``: grant-table frame ``idx``, placed with
  ``XENMEM_add_to_physmap(XENMAPSPACE_grant_table)``, as Linux's
  ``gnttab_setup_auto_xlat_frames`` does; status frames at
  ``GNTTAB_STATUS_GFN_BASE + idx``.
- ``HOLE_GFN_BASE`` upward: unpopulated frames that host foreign grant
  mappings (Linux's ``xen_alloc_unpopulated_pages``, Zephyr's
  ``gnttab_get_pages``).

A PV guest gets its RAM at gfn == mfn from the hypervisor; holes still come
from ``HOLE_GFN_BASE``, far above any machine frame.
"""

from __future__ import annotations

import threading

from .._runs import runs

RAM_GFN_BASE = 0x100
GNTTAB_GFN_BASE = 0xF0000
GNTTAB_STATUS_GFN_BASE = 0xE0000
HOLE_GFN_BASE = 0x1000000


class GfnAllocator:
    """Hands out guest frame numbers from ``base`` upward, lowest first.

    Freed gfns are reused: a request takes the lowest run of that many
    consecutive free gfns, or fresh ones above everything handed out so far.
    The free gfns are a byte map (1 = free), so a request is one C-speed
    search and freeing costs one slice per run.  Thread-safe: threads that
    share a domain (a service connection's readers free the holes of posted
    unmaps while others map) take and give back under one lock.

    Args:
        base: the first gfn.
    """

    def __init__(self, base: int) -> None:
        self._base = base
        self._next = base
        self._map = bytearray()  # gfn - base -> 1 if free, for gfns below _next
        self._nfree = 0
        self._lock = threading.Lock()

    def alloc(self, count: int) -> list[int]:
        """``count`` consecutive gfns."""
        if count <= 0:
            return []
        with self._lock:
            if self._nfree >= count:
                fmap = self._map
                if count == 1:  # the common single page
                    i = fmap.find(1)
                    fmap[i] = 0
                    self._nfree -= 1
                    return [self._base + i]
                i = fmap.find(b"\x01" * count)
                if i >= 0:
                    fmap[i : i + count] = bytes(count)
                    self._nfree -= count
                    start = self._base + i
                    return list(range(start, start + count))
            start = self._next
            self._next += count
            self._map.extend(bytes(count))
        return list(range(start, start + count))

    def in_use(self) -> list[int]:
        """The gfns handed out and not given back, lowest first."""
        with self._lock:
            fmap, base = self._map, self._base
            return [base + i for i in range(len(fmap)) if not fmap[i]]

    def free(self, gfns: list[int]) -> None:
        """Give gfns back."""
        fmap, base = self._map, self._base
        with self._lock:
            if len(gfns) == 1:
                fmap[gfns[0] - base] = 1
                self._nfree += 1
                return
            for start, n in runs(gfns):
                fmap[start - base : start - base + n] = b"\x01" * n
            self._nfree += len(gfns)
