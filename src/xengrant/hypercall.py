"""The narrow hypercall interface every guest API stands on.

A guest (kernel-level) needs exactly this from whatever runs it, and nothing
more, so the emulator in this process, the emulator in another process (over a
socket) and, for the parts real Xen lets userspace reach, Linux's privcmd can
each provide it:

- ``grant_table_op(cmd, uop, count)``: ``HYPERVISOR_grant_table_op``; ``uop``
  holds ``count`` packed C op structs and gets its OUT fields written back.
- ``populate_physmap``/``decrease_reservation``/``add_to_physmap``: the
  ``XENMEM_*`` ops that give the guest RAM and place its grant-table frames.
- ``map_gfns(gfns, writable)``: the guest's own page tables -- a contiguous
  view of some of its guest frames (RAM, grant-table frames, or foreign frames
  it mapped with ``GNTTABOP_map_grant_ref``).

The portable layer real Xen also offers to userspace (share pages, map grants,
copy, unshare, unmap: libxengntshr/libxengnttab over gntalloc/gntdev) is
:mod:`xengrant.portable`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

from .errors import HypercallError

#: Anything exposing a writable buffer: a ctypes array, a bytearray, a memoryview.
WritableBuffer = Union[bytearray, memoryview, "ctypes.Array[Any]", ctypes.Structure]
#: Anything exposing bytes to read: the same, or bytes.
ReadableBuffer = Union[bytes, bytearray, memoryview, "ctypes.Array[Any]", ctypes.Structure]


@runtime_checkable
class FrameView(Protocol):
    """What ``map_gfns`` returns: a buffer over frames, closed when unmapped.

    ``memoryview(view)`` gives the bytes; ``close()`` refuses with BufferError
    while views of it are alive (xengrant._cext.FrameView).
    """

    @property
    def closed(self) -> bool: ...

    @property
    def readonly(self) -> bool: ...

    @property
    def exports(self) -> int: ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...

    if TYPE_CHECKING:  # the buffer protocol (PEP 688), for type checkers only: C types have
        # no __buffer__ attribute before Python 3.12, so isinstance() must not ask for it

        def __buffer__(self, flags: int, /) -> memoryview: ...


class Hypercalls(Protocol):
    """The calls a guest makes to its hypervisor, as the domain ``domid``."""

    domid: int

    def grant_table_op(self, cmd: int, uop: memoryview, count: int) -> int:
        """``HYPERVISOR_grant_table_op``: returns 0 or a negative errno."""
        ...

    def populate_physmap(self, gfns: Sequence[int]) -> list[int]:
        """``XENMEM_populate_physmap``: the gfns populated (PV: new mfns)."""
        ...

    def decrease_reservation(self, gfns: Sequence[int]) -> int:
        """``XENMEM_decrease_reservation``: how many gfns were released."""
        ...

    def add_to_physmap(self, space: int, idx: int, gpfn: int) -> int:
        """``XENMEM_add_to_physmap``: 0 or a negative errno."""
        ...

    def map_gfns(self, gfns: Sequence[int], writable: bool) -> FrameView:
        """A :class:`FrameView` of the guest frames, contiguous, in order."""
        ...


def as_uop(ops: WritableBuffer) -> memoryview:
    """A writable byte view of a ctypes array/structure or bytearray of ops."""
    mv = memoryview(ops)
    if mv.readonly:
        raise TypeError("hypercall op buffers must be writable")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def check_rc(op: str, rc: int) -> int:
    """Raise :class:`HypercallError` for a negative hypercall return.

    Returns:
        ``rc`` when it is not negative.
    """
    if rc < 0:
        raise HypercallError(op, -rc)
    return rc
