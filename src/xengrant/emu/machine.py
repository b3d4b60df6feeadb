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

from collections.abc import Callable, Iterable

from .._cext import memset
from .._runs import runs
from ..abi.grant_table import XEN_PAGE_SIZE

PAGE_SIZE = XEN_PAGE_SIZE
PAGE_SHIFT = 12
#: Owner of a free frame.
NO_OWNER = -1
#: From this many frames on, bulk paths work on whole runs (slices) at once.
_BULK = 8  # mutation: equivalent — only chooses a path; both free alike (test_bulk_paths)


class OutOfMemory(Exception):
    """No free machine frame is left (Xen: ``alloc_domheap_page`` fails)."""


class Machine:
    """Frame allocator over a writable buffer of ``nr_frames`` frames.

    Args:
        memory: a writable buffer of at least ``nr_frames * 4096`` bytes.
        nr_frames: how many frames the machine has.
        reserved: frames ``0 .. reserved-1`` are never handed out (frame 0
            is kept away so that a zero frame number is never valid).

    Frames come out lowest-first, so consecutive allocations are usually
    contiguous, which lets views of them be plain slices.  The free frames
    are a byte map (1 = free) searched from the lowest frame that may be
    free, a run at a time, so allocating or freeing many frames costs one
    slice operation per contiguous run rather than Python work per frame.
    """

    def __init__(self, memory: memoryview, nr_frames: int, reserved: int = 1) -> None:
        if len(memory) < nr_frames * PAGE_SIZE:
            raise ValueError(f"memory holds {len(memory)} bytes, {nr_frames} frames need more")
        self.memory = memory
        self.nr_frames = nr_frames
        self.owner = [NO_OWNER] * nr_frames
        self.refcount = [0] * nr_frames
        self._map = bytearray(reserved) + b"\x01" * (nr_frames - reserved)
        self._nfree = nr_frames - reserved
        self._low = reserved  # no free frame below this
        self.reserved = reserved
        #: Called with (owner, frames) after frames are allocated; may raise
        #: (the frames are given back, then :class:`OutOfMemory`).  The
        #: service backs each domain's frames with files of its own there.
        self.on_alloc: Callable[[int, list[int]], None] | None = None
        #: Called with the frames just freed; it scrubs them (before anyone can
        #: have them again) instead of the ``memset`` done without it.
        self.on_release: Callable[[list[int]], None] | None = None
        #: Called with (mfn, new owner) after :meth:`transfer`.
        self.on_transfer: Callable[[int, int], None] | None = None

    @property
    def free_frames(self) -> int:
        """Number of free frames."""
        return self._nfree

    def alloc(self, owner: int, count: int = 1) -> list[int]:
        """Take ``count`` zeroed frames for ``owner`` (refcount 1 each), lowest first.

        Raises:
            OutOfMemory: fewer than ``count`` frames are free (none is taken).
        """
        if count > self._nfree:
            raise OutOfMemory(f"{count} frame(s) wanted, {self._nfree} free")
        fmap, owners, refs = self._map, self.owner, self.refcount
        if count == 1:  # the common single page: no run bookkeeping
            mfn = fmap.find(1, self._low)
            fmap[mfn] = 0
            owners[mfn] = owner
            refs[mfn] = 1
            self._nfree -= 1
            self._low = mfn + 1
            if self.on_alloc is not None:
                self._hooked_alloc(owner, [mfn])
            return [mfn]
        frames: list[int] = []
        pos = self._low
        left = count
        while left:
            start = fmap.find(1, pos)
            end = fmap.find(0, start)
            # mutation: equivalent — `< 1`: frame `start` is free, so find() answers -1
            # or an index above start, never 0
            if end < 0:
                end = self.nr_frames
            end = min(end, start + left)
            n = end - start
            fmap[start:end] = bytes(n)
            owners[start:end] = [owner] * n
            refs[start:end] = [1] * n
            frames.extend(range(start, end))
            left -= n
            pos = end
        self._nfree -= count
        if count:
            self._low = pos
        if self.on_alloc is not None and frames:
            self._hooked_alloc(owner, frames)
        return frames

    def _hooked_alloc(self, owner: int, frames: list[int]) -> None:
        """Run :attr:`on_alloc`; if it fails, give the frames back and raise OutOfMemory."""
        assert self.on_alloc is not None
        try:
            self.on_alloc(owner, frames)
        except Exception as e:
            hook, self.on_release = self.on_release, None  # nothing of theirs to undo
            try:
                self.disown_many(frames)
            finally:
                self.on_release = hook
            raise OutOfMemory(f"{len(frames)} frame(s) for d{owner}: {e}") from e

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
        self._release([mfn])
        return True

    def _release(self, mfns: list[int]) -> None:
        """Scrub and free frames whose last reference went (``free_domheap_pages``)."""
        fmap, owners, mem = self._map, self.owner, self.memory
        scrub = self.on_release is None  # else the hook scrubs (the service punches files)
        for start, n in runs(mfns):
            if scrub:
                memset(mem, start * PAGE_SIZE, n * PAGE_SIZE, 0)  # scrub, as Xen does on free
            owners[start : start + n] = [NO_OWNER] * n
            fmap[start : start + n] = b"\x01" * n
            if start < self._low:
                self._low = start
        self._nfree += len(mfns)
        if self.on_release is not None:
            self.on_release(mfns)

    def disown(self, mfn: int) -> bool:
        """The owner lets go of a frame: drop its reference and its ownership.

        Returns:
            True if the frame was freed (no other reference held it).
        """
        self.owner[mfn] = NO_OWNER
        return self.put(mfn)

    def disown_many(self, mfns: list[int]) -> int:
        """:meth:`disown` for many frames, freeing runs of them at once.

        Returns:
            How many frames were freed.
        """
        refs, owners = self.refcount, self.owner
        # mutation: equivalent — only chooses the path; both free alike (test_bulk_paths)
        spans = runs(mfns) if len(mfns) >= _BULK else []
        # mutation: equivalent — `!=`: callers never list a frame twice (each is one
        # p2m entry's), so every list is distinct
        distinct = len(spans) == 1 or len(set(mfns)) == len(mfns)
        if spans and distinct and all(set(refs[a : a + n]) == {1} for a, n in spans):
            # the common case, nobody else holds them: whole runs at once
            self._release(mfns)
            for a, n in spans:
                refs[a : a + n] = [0] * n
            return len(mfns)
        freed: list[int] = []
        for mfn in mfns:
            owners[mfn] = NO_OWNER
            rc = refs[mfn] - 1
            refs[mfn] = rc
            if rc == 0:
                freed.append(mfn)
            elif rc < 0:  # pragma: no cover - an accounting bug, never input
                raise AssertionError(f"frame {mfn:#x} refcount underflow")
        if freed:
            self._release(freed)
        return len(freed)

    def transfer(self, mfn: int, new_owner: int) -> None:
        """Give an allocated frame to another domain (``steal_page`` + ``assign_pages``)."""
        self.owner[mfn] = new_owner
        if self.on_transfer is not None:
            self.on_transfer(mfn, new_owner)

    def zero(self, frames: Iterable[int]) -> None:
        """Zero whole frames in place (``clear_page``)."""
        mem = self.memory
        for start, n in runs(list(frames)):
            memset(mem, start * PAGE_SIZE, n * PAGE_SIZE, 0)

