"""Machine memory: 4 KiB frames of one shared buffer, their owners and refcounts.

Sans-IO: the buffer is handed in (the embedded hypervisor backs it with a
memfd); nothing here opens, maps or locks anything.

Xen keeps a ``struct page_info`` per machine frame with an owner and a
reference count (``count_info``); a frame returns to the heap, scrubbed, when
its last reference goes (``free_domheap_pages``).  Here the owner drops its
reference when it frees the page or dies, and every foreign grant mapping
holds one more (``get_page`` in ``map_grant_ref``), so a page granted by a
dying domain stays valid for its mappers until they unmap.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from ..abi.grant_table import XEN_PAGE_SIZE

PAGE_SIZE = XEN_PAGE_SIZE
PAGE_SHIFT = 12
#: Owner of a free frame.
NO_OWNER = -1

_ZERO_PAGE = bytes(PAGE_SIZE)


class OutOfMemory(Exception):
    """No free machine frame is left (Xen: ``alloc_domheap_page`` fails)."""


class Machine:
    """Frame allocator over a writable buffer of ``nr_frames`` frames.

    Args:
        memory: a writable buffer of at least ``nr_frames * 4096`` bytes.
        nr_frames: how many frames the machine has.
        reserved: frames ``0 .. reserved-1`` are never handed out (frame 0
            is kept away so that a zero frame number is never valid).

    Frames come out lowest-first (a min-heap), so consecutive allocations are
    usually contiguous, which lets views of them be plain slices.
    """

    def __init__(self, memory: memoryview, nr_frames: int, reserved: int = 1) -> None:
        if len(memory) < nr_frames * PAGE_SIZE:
            raise ValueError(f"memory holds {len(memory)} bytes, {nr_frames} frames need more")
        self.memory = memory
        self.nr_frames = nr_frames
        self.owner = [NO_OWNER] * nr_frames
        self.refcount = [0] * nr_frames
        self._free = list(range(reserved, nr_frames))  # already a valid heap
        self.reserved = reserved

    @property
    def free_frames(self) -> int:
        """Number of frames on the free heap."""
        return len(self._free)

    def alloc(self, owner: int, count: int = 1) -> list[int]:
        """Take ``count`` zeroed frames for ``owner`` (refcount 1 each).

        Raises:
            OutOfMemory: fewer than ``count`` frames are free (none is taken).
        """
        if count > len(self._free):
            raise OutOfMemory(f"{count} frame(s) wanted, {len(self._free)} free")
        pop = heapq.heappop
        frames = [pop(self._free) for _ in range(count)]
        owners, refs = self.owner, self.refcount
        for mfn in frames:
            owners[mfn] = owner
            refs[mfn] = 1
        return frames

    def get(self, mfn: int) -> None:
        """Take one more reference on an allocated frame (Xen's ``get_page``)."""
        self.refcount[mfn] += 1

    def put(self, mfn: int) -> bool:
        """Drop one reference; scrub and free the frame when none is left.

        Returns:
            True if the frame was freed.
        """
        refs = self.refcount
        refs[mfn] -= 1
        if refs[mfn] > 0:
            return False
        if refs[mfn] < 0:  # pragma: no cover - an accounting bug, never input
            raise AssertionError(f"frame {mfn:#x} refcount underflow")
        off = mfn * PAGE_SIZE
        self.memory[off : off + PAGE_SIZE] = _ZERO_PAGE  # scrub, as Xen does on free
        self.owner[mfn] = NO_OWNER
        heapq.heappush(self._free, mfn)
        return True

    def disown(self, mfn: int) -> bool:
        """The owner lets go of a frame: drop its reference and its ownership.

        Returns:
            True if the frame was freed (no other reference held it).
        """
        self.owner[mfn] = NO_OWNER
        return self.put(mfn)

    def transfer(self, mfn: int, new_owner: int) -> None:
        """Give an allocated frame to another domain (``steal_page`` + ``assign_pages``)."""
        self.owner[mfn] = new_owner

    def zero(self, frames: Iterable[int]) -> None:
        """Zero whole frames in place (``clear_page``)."""
        mem = self.memory
        for mfn in frames:
            off = mfn * PAGE_SIZE
            mem[off : off + PAGE_SIZE] = _ZERO_PAGE

    def offset(self, mfn: int) -> int:
        """Byte offset of a frame in the machine buffer."""
        return mfn * PAGE_SIZE
