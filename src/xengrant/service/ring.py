"""The request ring of a service connection: one-op map/unmap without a system call.

A domain process and ``xengrant hypervisor`` can share one page per
connection: a shared ring as ``xen/include/public/io/ring.h`` defines it
(``DEFINE_RING_TYPES``), carrying one-op ``GNTTABOP_map_grant_ref`` and
posted one-op ``GNTTABOP_unmap_grant_ref`` requests and their responses, and
two eventfds, the event channels that wake a side that went to sleep.  It is
what a PV front end and back end share, and for the same reason: a request
and its response cross without a system call while the other side polls,
and a notification is sent only when the other side asked for one
(``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``, ``RING_FINAL_CHECK_FOR_REQUESTS``).

Everything else stays on the socket.  The service answers in C
(:func:`xengrant._cext.ring_serve`) the requests that succeed the common way;
any other one it answers on the socket, as a ``MSG_GNTTAB_OP`` reply with the
request's sequence number, and its ring response says so (``RSP_SOCKET``).
Order: the service serves the ring before each read of the socket, so a
request put on the ring before one sent on the socket runs first; a client
sends on the ring only while no posted socket request waits for its reply,
so the reverse holds too.

The layout (``_ring.c`` has the rules; ``tests/test_service_ring.py``
compiles ``io/ring.h`` to check it)::

    0   u32 req_prod, u32 req_event, u32 rsp_prod, u32 rsp_event
    16  pvt and __pad (48 bytes)
    64  RING_SIZE slots of 64 bytes, request then response:
        request   u32 id (seq), u16 cmd, u16 flags (0 or F_POSTED), the op at 8
        response  u32 id, u16 cmd, i16 kind (RSP_DONE, RSP_SOCKET), the op at 8
                  as the hypervisor left it, i64 mfn at 40, i64 p2m type at 48
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct

from .. import abi
from ..guest.ops import MAP_OP, UNMAP_OP
from . import protocol as p

#: One page, as a PV ring (``__CONST_RING_SIZE`` over ``PAGE_SIZE``).
RING_PAGE = 4096
#: ``struct *_sring`` up to ``ring[]``: four indices, ``pvt``, ``__pad``.
RING_HDR = 64
#: A slot: ``union { request; response; }`` padded to 64 bytes.
RING_SLOT = 64
#: ``__RING_SIZE(s, 4096)``: (4096 - 64) / 64 = 63, rounded down to a power of two.
RING_SIZE = 32
#: A response: the op ran here (its results at 8, the p2m entry at 40).
RSP_DONE = 0
#: A response: the reply comes on the socket.
RSP_SOCKET = 1

#: The four indices.
INDICES = struct.Struct("<IIII")
#: A slot's head: id, cmd, flags (a request) or kind (a response).
SLOT_HEAD = struct.Struct("<IHh")
#: A response's p2m entry of the op's gfn: mfn (-1: none), type.
SLOT_P2M = struct.Struct("<qq")

_OPSIZE = {
    abi.GNTTABOP_map_grant_ref: MAP_OP.size,
    abi.GNTTABOP_unmap_grant_ref: UNMAP_OP.size,
}


def _init(mem: mmap.mmap) -> None:
    """``SHARED_RING_INIT``: producers 0, event indices 1."""
    INDICES.pack_into(mem, 0, 0, 1, 0, 1)


def request(slot: bytes) -> tuple[int, int, int, bytes]:
    """A request slot as a ``MSG_GNTTAB_OP`` request.

    Args:
        slot: the 64 bytes :func:`xengrant._cext.ring_take` copied out.

    Returns:
        ``(seq, cmd, flags, payload)``: ``payload`` is ``GNTTAB_REQ`` (cmd,
        one op) and the op's bytes; a cmd other than map or unmap gets the
        whole slot body, for the handler to refuse.
    """
    seq, cmd, flags = struct.unpack_from("<IHH", slot)
    size = _OPSIZE.get(cmd, RING_SLOT - 8)
    return seq, cmd, flags, p.GNTTAB_REQ.pack(cmd, 1) + slot[8 : 8 + size]


def response_seq(slot: bytes) -> int:
    """The request a response slot answers."""
    seq: int = SLOT_HEAD.unpack_from(slot)[0]
    return seq


def response_payload(slot: bytes) -> bytes:
    """An ``RSP_DONE`` response to a one-op map, as the ``MSG_GNTTAB_OP`` reply
    payload the socket would have carried (for a handler of socket replies).

    Args:
        slot: the response's 64 bytes.

    Returns:
        status 0, rc 0, the op (32 bytes), the p2m entry of its gfn, no reasons.
    """
    op = slot[8 : 8 + MAP_OP.size]
    gfn = struct.unpack_from("<Q", op)[0] >> 12
    mfn, p2mt = SLOT_P2M.unpack_from(slot, 40)
    return (struct.pack("<iiI", 0, 0, MAP_OP.size) + op
            + struct.pack("<Iqqq", 1, gfn, mfn, p2mt) + b"\0\0")



def _eventfd() -> int:
    """A non-blocking, close-on-exec eventfd (``eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)``).

    ``os.eventfd`` is Python 3.10+; on 3.9 the same system call goes through libc.

    Raises:
        OSError: the kernel's errno (EMFILE, ENFILE, ENOMEM).
    """
    if hasattr(os, "eventfd"):
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    # EFD_CLOEXEC and EFD_NONBLOCK are O_CLOEXEC and O_NONBLOCK (linux/eventfd.h)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.eventfd(ctypes.c_uint(0), ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK)))
    if fd < 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, f"eventfd: {os.strerror(err)}")
    return fd

class ServiceRing:
    """The service's end: it makes the page and the two eventfds.

    The page is a memfd sealed at one page (``F_SEAL_SHRINK``,
    ``F_SEAL_GROW``, ``F_SEAL_SEAL``): the client cannot shrink it under the
    service's mapping (a SIGBUS in the service).

    Attributes:
        mem: the mapped page.
        memfd: the page's memfd until it was sent (:meth:`drop_memfd`; -1 after).
        state: ``req_cons`` and ``rsp_prod_pvt`` (u32 each), private.
        svc_kick: the eventfd the client kicks (the service waits on it).
        cli_kick: the eventfd the service kicks (the client waits on it).
    """

    def __init__(self) -> None:
        self.memfd = os.memfd_create("xengrant-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.svc_kick = self.cli_kick = -1
        try:
            os.ftruncate(self.memfd, RING_PAGE)
            fcntl.fcntl(
                self.memfd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
            self.mem = mmap.mmap(self.memfd, RING_PAGE)
            _init(self.mem)
            self.svc_kick = _eventfd()
            self.cli_kick = _eventfd()
        except BaseException:
            self.close()
            raise
        self.state = bytearray(8)

    def fds(self) -> tuple[int, int, int]:
        """What the client gets (SCM_RIGHTS): the page, its kick, its wake-up."""
        return self.memfd, self.svc_kick, self.cli_kick

    def drop_memfd(self) -> None:
        """Close the page's memfd once it was sent: :attr:`mem` (the mapping) is
        all the service needs of it."""
        fd, self.memfd = self.memfd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        """Unmap the page, close the descriptors (the reader thread's, when it ends)."""
        mem = getattr(self, "mem", None)
        if mem is not None:
            mem.close()
        for fd in (self.memfd, self.svc_kick, self.cli_kick):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.memfd = self.svc_kick = self.cli_kick = -1


class ClientRing:
    """The client's end, from the three descriptors the service sent.

    Attributes:
        mem: the mapped page.
        state: ``req_prod_pvt`` and ``rsp_cons`` (u32 each), private.
        kick: the eventfd that wakes the service.
        wait: the eventfd the service kicks when this end asked for it.

    Raises:
        OSError: a descriptor that is not a one-page memfd and two eventfds.
    """

    def __init__(self, memfd: int, kick: int, wait: int) -> None:
        try:
            if os.fstat(memfd).st_size != RING_PAGE:
                raise OSError(0, "the ring is not one page")
            self.mem = mmap.mmap(memfd, RING_PAGE)
        finally:
            os.close(memfd)
        self.kick, self.wait = kick, wait
        self.state = bytearray(8)

    def close(self) -> None:
        """Unmap the page and close both eventfds."""
        self.mem.close()
        for fd in (self.kick, self.wait):
            with contextlib.suppress(OSError):
                os.close(fd)
