"""Linux's gntalloc driver ABI (``/dev/xen/gntalloc``): include/uapi/xen/gntalloc.h.

Every constant keeps its C name and value; every structure is a ctypes
structure with the C layout of x86_64 (checked against the installed header by
tests/test_abi_headers.py, which compiles C).

``ioctl_gntalloc_alloc_gref`` ends in ``gref_ids[1]``, really ``count``
entries: :func:`alloc_gref_request` builds an instance with room for them
(pass it to ``fcntl.ioctl``) and :func:`alloc_gref_ids` reads them back.
"""

from __future__ import annotations

import ctypes

from .privcmd import _IOC, _IOC_NONE, _tail, _with_tail

# ------------------------------------------------------------ constants
#: ``flags`` of IOCTL_GNTALLOC_ALLOC_GREF: the peer may map the pages writable.
GNTALLOC_FLAG_WRITABLE = 1

#: ``action`` of IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: clear the byte at ``index``.
UNMAP_NOTIFY_CLEAR_BYTE = 0x1
#: ``action``: send an event on ``event_channel_port``.
UNMAP_NOTIFY_SEND_EVENT = 0x2


# ------------------------------------------------------------ structures
class ioctl_gntalloc_alloc_gref(ctypes.Structure):
    """``struct ioctl_gntalloc_alloc_gref``: ``gref_ids`` really has ``count`` entries."""

    _fields_ = [
        ("domid", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("gref_ids", ctypes.c_uint32 * 1),
    ]


class ioctl_gntalloc_dealloc_gref(ctypes.Structure):
    """``struct ioctl_gntalloc_dealloc_gref`` (IOCTL_GNTALLOC_DEALLOC_GREF)."""

    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32)]


class ioctl_gntalloc_unmap_notify(ctypes.Structure):
    """``struct ioctl_gntalloc_unmap_notify`` (IOCTL_GNTALLOC_SET_UNMAP_NOTIFY)."""

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    ]


# -------------------------------------------------------------- ioctls
IOCTL_GNTALLOC_ALLOC_GREF = _IOC(_IOC_NONE, "G", 5, ctypes.sizeof(ioctl_gntalloc_alloc_gref))
IOCTL_GNTALLOC_DEALLOC_GREF = _IOC(_IOC_NONE, "G", 6, ctypes.sizeof(ioctl_gntalloc_dealloc_gref))
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = _IOC(
    _IOC_NONE, "G", 7, ctypes.sizeof(ioctl_gntalloc_unmap_notify)
)


# ------------------------------------------------------- variable size
def alloc_gref_request(domid: int, flags: int, count: int) -> ioctl_gntalloc_alloc_gref:
    """An IOCTL_GNTALLOC_ALLOC_GREF argument with room for ``count`` ``gref_ids``.

    Args:
        domid: the domain to be given access.
        flags: ``GNTALLOC_FLAG_*``.
        count: number of pages (and grant references) to allocate.
    """
    op = ioctl_gntalloc_alloc_gref(domid=domid, flags=flags, count=count)
    return _with_tail(op, "gref_ids", count)


def alloc_gref_ids(op: ioctl_gntalloc_alloc_gref) -> list[int]:
    """The ``op.count`` grant references the driver wrote into ``op.gref_ids``."""
    return list(_tail(op, "gref_ids", op.count))
