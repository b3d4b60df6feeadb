"""A guest's view of itself: its id, its memory, its grant table.

:class:`Domain` is what a guest kernel (Linux, mirage, Zephyr) has: hypercalls
to its hypervisor, RAM it can populate and free, holes it can map foreign
grants into, and its grant table (:attr:`Domain.grant_table`).  The portable
userspace-level layer is on :attr:`Domain.gntshr` (share pages, like
libxengntshr) and :attr:`Domain.gnttab` (map and copy grants, like
libxengnttab).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import HypercallError
from ..hypercall import FrameView, Hypercalls, WritableBuffer, as_uop, check_rc
from .memory import HOLE_GFN_BASE, RAM_GFN_BASE, GfnAllocator
from .share import HoldsView

if TYPE_CHECKING:
    from ..portable import EmulatedGntshr, EmulatedGnttab
    from .gnttab import GrantTable


class Pages(HoldsView):
    """RAM pages of a guest, seen as one buffer.

    Attributes:
        gfns: the guest frame numbers, in buffer order.
        mem: a writable memoryview of all of them (``len(gfns) * 4096`` bytes).
    """

    def __init__(self, domain: Domain, gfns: list[int], view: FrameView) -> None:
        self.domain = domain
        self.gfns = gfns
        self._view = view
        self.mem = memoryview(view)
        self.freed = False

    def __len__(self) -> int:
        return len(self.gfns)

    def __enter__(self) -> Pages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def free(self) -> None:
        """Give the pages back to the hypervisor (``XENMEM_decrease_reservation``).

        Raises:
            BufferError: views of the pages are still alive.
        """
        if self.freed:
            return
        self._release_memory()
        self.freed = True
        self.domain._free_ram(self.gfns)

    def _retry_free(self) -> bool:
        try:
            self.free()
        except BufferError:
            return False
        return True

    def __del__(self) -> None:
        if getattr(self, "freed", True):
            return
        warnings.warn(
            f"unfreed Pages of d{self.domain.domid} ({len(self.gfns)} pages): "
            "giving them back (call free())",
            ResourceWarning,
            stacklevel=2,
            source=self,
        )
        # Like a dropped Share: give the frames back now, or once the last
        # view of them (a numpy array) goes, retried with deferred releases.
        try:
            if not self._retry_free():
                self.domain.grant_table._orphan(self._retry_free)
        except Exception:  # pragma: no cover - never raise from __del__
            pass


class Domain:
    """A guest domain, from the inside.

    Args:
        hypercalls: the hypervisor interface, bound to this domain.
        pv: True for a PV guest (RAM at gfn == mfn, may transfer pages).

    Attributes:
        domid: the domain id.
    """

    def __init__(self, hypercalls: Hypercalls, *, pv: bool = False) -> None:
        self.hypercalls = hypercalls
        self.domid = hypercalls.domid
        self.pv = pv
        self._ram = GfnAllocator(RAM_GFN_BASE)
        self._holes = GfnAllocator(HOLE_GFN_BASE)
        self._grant_table: GrantTable | None = None
        self._gntshr: EmulatedGntshr | None = None
        self._gnttab: EmulatedGnttab | None = None

    def __repr__(self) -> str:
        return f"<Domain d{self.domid}{' pv' if self.pv else ''}>"

    # ------------------------------------------------------------ layers
    @property
    def grant_table(self) -> GrantTable:
        """This domain's grant table (kernel-level: refs, entries, shares, maps)."""
        if self._grant_table is None:
            from .gnttab import GrantTable

            self._grant_table = GrantTable(self)
        return self._grant_table

    @property
    def gntshr(self) -> EmulatedGntshr:
        """Portable sharing interface (libxengntshr's calls)."""
        if self._gntshr is None:
            from ..portable import EmulatedGntshr

            self._gntshr = EmulatedGntshr(self)
        return self._gntshr

    @property
    def gnttab(self) -> EmulatedGnttab:
        """Portable mapping interface (libxengnttab's calls)."""
        if self._gnttab is None:
            from ..portable import EmulatedGnttab

            self._gnttab = EmulatedGnttab(self)
        return self._gnttab

    def leaks(self) -> list[str]:
        """What this guest still holds: refs handed out (granted or not),
        deferred ends of access, pages and holes not given back.

        Returns:
            One line per leak; empty when everything was released.
        """
        from ..leaks import guest_leaks

        return guest_leaks(self)

    # ---------------------------------------------------------- hypercall
    def grant_table_op(self, cmd: int, ops: WritableBuffer, count: int | None = None) -> int:
        """Issue ``HYPERVISOR_grant_table_op`` with ctypes op structs.

        Args:
            cmd: ``GNTTABOP_*``.
            ops: a ctypes array (or structure) of the op's struct.
            count: ops to process (default: all in ``ops``).

        Returns:
            The hypercall's return (0); per-op results are in the structs.

        Raises:
            HypercallError: the hypercall returned a negative errno.
        """
        uop = as_uop(ops)
        if count is None:
            count = len(ops) if hasattr(ops, "__len__") else 1
        from ..abi.grant_table import GNTTABOP_STRUCTS

        name = GNTTABOP_STRUCTS.get(cmd)
        op = name.__name__.replace("gnttab_", "") if name else f"grant_table_op({cmd})"
        return check_rc(op, self.hypercalls.grant_table_op(cmd, uop, count))

    # ------------------------------------------------------------- memory
    def alloc_pages(self, count: int) -> Pages:
        """Populate ``count`` zeroed RAM pages, seen as one buffer.

        Raises:
            ValueError: count < 1.
            MemoryError: the hypervisor could not populate them all (none kept).
        """
        if count < 1:
            raise ValueError(f"alloc_pages: count must be >= 1, not {count}")
        gfns = [] if self.pv else self._ram.alloc(count)
        done = self.hypercalls.populate_physmap(gfns if not self.pv else [0] * count)
        if len(done) != count:
            if done:
                self.hypercalls.decrease_reservation(done)
            if not self.pv:
                self._ram.free(gfns)
            raise MemoryError(
                f"alloc_pages: d{self.domid} got {len(done)} of {count} pages "
                "(machine memory or max_pages exhausted)"
            )
        return Pages(self, done, self.hypercalls.map_gfns(done, True))

    def _free_ram(self, gfns: list[int]) -> None:
        n = self.hypercalls.decrease_reservation(gfns)
        if n != len(gfns):  # pragma: no cover - our own gfns are always RAM
            raise HypercallError("decrease_reservation", 22, f"released {n} of {len(gfns)}")
        if not self.pv:
            self._ram.free(gfns)

    def get_pages(self, npages: int) -> list[int]:
        """Unpopulated gfns that can host foreign mappings (Zephyr's ``gnttab_get_pages``).

        Returns:
            ``npages`` contiguous gfns; ``gfn << 12`` is the ``host_addr`` of a map op.
        """
        if npages < 1:
            raise ValueError(f"get_pages: npages must be >= 1, not {npages}")
        return self._holes.alloc(npages)

    def put_pages(self, gfns: Sequence[int]) -> None:
        """Give back gfns from :meth:`get_pages` (Zephyr's ``gnttab_put_pages``).

        Unmap any grant mapped there first; the emulator does not check.
        """
        self._holes.free(list(gfns))

    def view(self, gfns: Sequence[int], writable: bool = True) -> FrameView:
        """A FrameView of some of this guest's frames (its page tables)."""
        return self.hypercalls.map_gfns(gfns, writable)
