"""A service request-ring page in this process, as both ends see it, and its two
eventfds: the piece tests/test_service_ring.py and tests/test_ring_client_diff.py
drive the ring's C and Python through."""

from __future__ import annotations

import mmap
import os

import compat
from xengrant.service import ring as r


class RingPage:
    """A ring page in this process, as both ends see it, and the two eventfds."""

    def __init__(self) -> None:
        self.mem = mmap.mmap(-1, r.RING_PAGE)
        r.INDICES.pack_into(self.mem, 0, 0, 1, 0, 1)  # SHARED_RING_INIT
        self.front = bytearray(8)  # req_prod_pvt, rsp_cons
        self.back = bytearray(8)  # req_cons, rsp_prod_pvt
        flags = compat.EFD_CLOEXEC | compat.EFD_NONBLOCK
        self.svc_kick, self.cli_kick = compat.eventfd(0, flags), compat.eventfd(0, flags)

    def slot(self, idx: int) -> bytes:
        off = r.RING_HDR + (idx % r.RING_SIZE) * r.RING_SLOT
        return bytes(self.mem[off : off + r.RING_SLOT])

    def put_slot(self, idx: int, data: bytes) -> None:
        off = r.RING_HDR + (idx % r.RING_SIZE) * r.RING_SLOT
        self.mem[off : off + len(data)] = data

    def close(self) -> None:
        self.mem.close()
        os.close(self.svc_kick)
        os.close(self.cli_kick)
