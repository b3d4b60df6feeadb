"""The libxenvchan wire layout: ``struct vchan_interface`` (``xen/io/libxenvchan.h``),
its offsets, and the ring orders ``libxenvchan_server_init`` chooses and a client checks."""

from __future__ import annotations

import ctypes
import errno

from ..errors import XenError

VCHAN_NOTIFY_WRITE = 0x1
VCHAN_NOTIFY_READ = 0x2
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: ``SMALL_RING_SHIFT``, ``LARGE_RING_SHIFT``, ``MAX_RING_SHIFT`` of init.c
SMALL_RING_SHIFT, LARGE_RING_SHIFT, MAX_RING_SHIFT = 10, 11, 20
SMALL_RING_OFFSET, LARGE_RING_OFFSET = 1024, 2048
MAX_RING_SIZE = 1 << MAX_RING_SHIFT
_M = 0xFFFFFFFF
#: tries of the compare-and-swap that stores one byte of a shared 16-bit word
_CAS_TRIES = 1000


class RingShared(ctypes.Structure):
    """``struct ring_shared``."""

    _fields_ = [("cons", ctypes.c_uint32), ("prod", ctypes.c_uint32)]


class VchanInterface(ctypes.Structure):
    """``struct vchan_interface`` (``grants[]`` follows at :data:`GRANTS_OFFSET`)."""

    _fields_ = [
        ("left", RingShared),
        ("right", RingShared),
        ("left_order", ctypes.c_uint16),
        ("right_order", ctypes.c_uint16),
        ("cli_live", ctypes.c_uint8),
        ("srv_live", ctypes.c_uint8),
        ("cli_notify", ctypes.c_uint8),
        ("srv_notify", ctypes.c_uint8),
    ]


LEFT = VchanInterface.left.offset
RIGHT = VchanInterface.right.offset
CLI_LIVE = VchanInterface.cli_live.offset
SRV_LIVE = VchanInterface.srv_live.offset
CLI_NOTIFY = VchanInterface.cli_notify.offset
SRV_NOTIFY = VchanInterface.srv_notify.offset
GRANTS_OFFSET = ctypes.sizeof(VchanInterface)


class VchanError(XenError):
    """A vchan could not be set up, or the peer broke the protocol.

    Attributes:
        op: what was being done (``"client_init"``, ``"read"`` ...).
        errno: an errno when one applies (``ENOENT``: no such xenstore node).
    """

    def __init__(self, op: str, detail: str, err: int = errno.EPROTO) -> None:
        self.op, self.detail, self.errno = op, detail, err
        super().__init__(f"vchan {op}: {detail}")


def server_orders(left_min: int, right_min: int) -> tuple[int, int]:
    """The ring orders ``libxenvchan_server_init`` picks: ``(read, write)``, i.e.
    ``(left_order, right_order)``.

    In-page rings when they fit (1024 bytes at 1024 and 2048 at 2048), else
    ``min_order`` (the smallest power of two, at least a page).

    Raises:
        ValueError: a minimum over 1 MiB (``MAX_RING_SIZE``), or negative.
    """
    if not (0 <= left_min <= MAX_RING_SIZE and 0 <= right_min <= MAX_RING_SIZE):
        raise ValueError(f"vchan: ring sizes {left_min}, {right_min} (at most {MAX_RING_SIZE})")

    def min_order(size: int) -> int:
        rv = PAGE_SHIFT
        while size > (1 << rv):
            rv += 1
        return rv

    read, write = min_order(left_min), min_order(right_min)
    small, large = 1 << SMALL_RING_SHIFT, 1 << LARGE_RING_SHIFT
    if left_min <= small and right_min <= large:
        read, write = SMALL_RING_SHIFT, LARGE_RING_SHIFT
    elif left_min <= large and right_min <= small:
        read, write = LARGE_RING_SHIFT, SMALL_RING_SHIFT
    elif left_min <= large:
        read = LARGE_RING_SHIFT
    elif right_min <= large:
        write = LARGE_RING_SHIFT
    return read, write


def _pages(order: int) -> int:
    return 1 << (order - PAGE_SHIFT) if order >= PAGE_SHIFT else 0


def _in_page(order: int) -> int:
    """The offset of an in-page ring (0: the ring has pages of its own)."""
    return {SMALL_RING_SHIFT: SMALL_RING_OFFSET, LARGE_RING_SHIFT: LARGE_RING_OFFSET}.get(order, 0)


def check_orders(left: int, right: int) -> None:
    """The client's checks of the orders a server wrote (``init_gnt_cli``), and
    that the grant list stays in the page, short of an in-page ring.

    Raises:
        VchanError: EPROTO, naming the orders.
    """
    for name, order in (("left_order", left), ("right_order", right)):
        if not SMALL_RING_SHIFT <= order <= MAX_RING_SHIFT:
            raise VchanError("client_init", f"{name} {order} is not in 10..20")
    if left == right and left < PAGE_SHIFT:
        raise VchanError("client_init", f"both rings in the page at order {left}")
    end = GRANTS_OFFSET + 4 * (_pages(left) + _pages(right))
    limit = min([o for o in (_in_page(left), _in_page(right)) if o] or [PAGE_SIZE])
    if end > limit:
        raise VchanError(
            "client_init", f"orders {left}, {right}: the grant list ends at {end}, past {limit}"
        )
