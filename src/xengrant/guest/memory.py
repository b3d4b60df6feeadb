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

import heapq

RAM_GFN_BASE = 0x100
GNTTAB_GFN_BASE = 0xF0000
GNTTAB_STATUS_GFN_BASE = 0xE0000
HOLE_GFN_BASE = 0x1000000


class GfnAllocator:
    """Hands out guest frame numbers from ``base`` upward, lowest first.

    Args:
        base: the first gfn.
    """

    def __init__(self, base: int) -> None:
        self._next = base
        self._free: list[int] = []

    def alloc(self, count: int) -> list[int]:
        """``count`` gfns, contiguous whenever the free list allows."""
        free = self._free
        if count == 1 and free:
            return [heapq.heappop(free)]  # O(log n): single pages are the common case
        if len(free) >= count and count:
            # Use freed gfns only if the lowest `count` of them are contiguous.
            low = heapq.nsmallest(count, free)
            if low[-1] - low[0] == count - 1:
                taken = set(low)  # one pass: list.remove per gfn was quadratic
                free[:] = [g for g in free if g not in taken]
                heapq.heapify(free)
                return low
        start = self._next
        self._next += count
        return list(range(start, start + count))

    def free(self, gfns: list[int]) -> None:
        """Give gfns back."""
        for g in gfns:
            heapq.heappush(self._free, g)
