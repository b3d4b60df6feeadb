"""Linux's gntdev driver ABI (``/dev/xen/gntdev``): include/uapi/xen/gntdev.h.

Every constant keeps its C name and value; every structure is a ctypes
structure with the C layout of x86_64 (checked against the installed header by
tests/test_abi_headers.py, which compiles C). The header itself uses
``grant_ref_t`` and ``domid_t`` without including Xen's headers: C users
include ``<xen/grant_table.h>`` first. ``gntdev_grant_copy_segment.flags``
takes the ``GNTCOPY_*`` flags of :mod:`.grant_table` and its ``status`` a
``GNTST_*`` code.

Three structures end in an array declared ``[1]`` that really has ``count``
entries: :func:`map_grant_ref_request`, :func:`dmabuf_exp_from_refs_request`
and :func:`dmabuf_imp_to_refs_request` build instances with room for them
(pass those to ``fcntl.ioctl``); :func:`map_grant_refs` and
:func:`dmabuf_refs` read them back.
"""

from __future__ import annotations

import collections.abc as _abc
import ctypes

from .grant_table import domid_t as _domid_t
from .grant_table import grant_ref_t as _grant_ref_t
from .privcmd import _IOC, _IOC_NONE, _tail, _with_tail

# ------------------------------------------------------------ constants
#: ``action`` of IOCTL_GNTDEV_SET_UNMAP_NOTIFY: clear the byte at ``index``.
UNMAP_NOTIFY_CLEAR_BYTE = 0x1
#: ``action``: send an event on ``event_channel_port``.
UNMAP_NOTIFY_SEND_EVENT = 0x2

#: dma-buf ``flags``: write-combine buffer.
GNTDEV_DMA_FLAG_WC = 1 << 0
#: dma-buf ``flags``: coherent buffer.
GNTDEV_DMA_FLAG_COHERENT = 1 << 1


# ------------------------------------------------------------ structures
class ioctl_gntdev_grant_ref(ctypes.Structure):
    """``struct ioctl_gntdev_grant_ref``: one (domain, grant reference) to map."""

    _fields_ = [("domid", ctypes.c_uint32), ("ref", ctypes.c_uint32)]


class ioctl_gntdev_map_grant_ref(ctypes.Structure):
    """``struct ioctl_gntdev_map_grant_ref``: ``refs`` really has ``count`` entries."""

    _fields_ = [
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("refs", ioctl_gntdev_grant_ref * 1),
    ]


class ioctl_gntdev_unmap_grant_ref(ctypes.Structure):
    """``struct ioctl_gntdev_unmap_grant_ref`` (IOCTL_GNTDEV_UNMAP_GRANT_REF)."""

    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class ioctl_gntdev_get_offset_for_vaddr(ctypes.Structure):
    """``struct ioctl_gntdev_get_offset_for_vaddr`` (IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR)."""

    _fields_ = [
        ("vaddr", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class ioctl_gntdev_set_max_grants(ctypes.Structure):
    """``struct ioctl_gntdev_set_max_grants`` (IOCTL_GNTDEV_SET_MAX_GRANTS)."""

    _fields_ = [("count", ctypes.c_uint32)]


class ioctl_gntdev_unmap_notify(ctypes.Structure):
    """``struct ioctl_gntdev_unmap_notify`` (IOCTL_GNTDEV_SET_UNMAP_NOTIFY)."""

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    ]


class _grant_copy_foreign(ctypes.Structure):
    _fields_ = [("ref", _grant_ref_t), ("offset", ctypes.c_uint16), ("domid", _domid_t)]


class _grant_copy_ptr(ctypes.Union):
    _fields_ = [("virt", ctypes.c_void_p), ("foreign", _grant_copy_foreign)]


class gntdev_grant_copy_segment(ctypes.Structure):
    """``struct gntdev_grant_copy_segment``: 24 bytes.

    ``source``/``dest`` are a local ``virt`` address, or a ``foreign``
    (ref, offset, domid) when ``flags`` has GNTCOPY_source_gref/GNTCOPY_dest_gref.
    """

    _fields_ = [
        ("source", _grant_copy_ptr),
        ("dest", _grant_copy_ptr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class ioctl_gntdev_grant_copy(ctypes.Structure):
    """``struct ioctl_gntdev_grant_copy``: ``count`` segments at ``segments``."""

    _fields_ = [
        ("count", ctypes.c_uint),
        ("segments", ctypes.POINTER(gntdev_grant_copy_segment)),
    ]


class ioctl_gntdev_dmabuf_exp_from_refs(ctypes.Structure):
    """``struct ioctl_gntdev_dmabuf_exp_from_refs``: ``refs`` really has ``count`` entries."""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("domid", ctypes.c_uint32),
        ("refs", ctypes.c_uint32 * 1),
    ]


class ioctl_gntdev_dmabuf_exp_wait_released(ctypes.Structure):
    """``struct ioctl_gntdev_dmabuf_exp_wait_released``."""

    _fields_ = [("fd", ctypes.c_uint32), ("wait_to_ms", ctypes.c_uint32)]


class ioctl_gntdev_dmabuf_imp_to_refs(ctypes.Structure):
    """``struct ioctl_gntdev_dmabuf_imp_to_refs``: ``refs`` really has ``count`` entries."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("domid", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("refs", ctypes.c_uint32 * 1),
    ]


class ioctl_gntdev_dmabuf_imp_release(ctypes.Structure):
    """``struct ioctl_gntdev_dmabuf_imp_release``."""

    _fields_ = [("fd", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


# -------------------------------------------------------------- ioctls
def _G(nr: int, op: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_NONE, "G", nr, ctypes.sizeof(op))


IOCTL_GNTDEV_MAP_GRANT_REF = _G(0, ioctl_gntdev_map_grant_ref)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _G(1, ioctl_gntdev_unmap_grant_ref)
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = _G(2, ioctl_gntdev_get_offset_for_vaddr)
IOCTL_GNTDEV_SET_MAX_GRANTS = _G(3, ioctl_gntdev_set_max_grants)
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _G(7, ioctl_gntdev_unmap_notify)
IOCTL_GNTDEV_GRANT_COPY = _G(8, ioctl_gntdev_grant_copy)
IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS = _G(9, ioctl_gntdev_dmabuf_exp_from_refs)
IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED = _G(10, ioctl_gntdev_dmabuf_exp_wait_released)
IOCTL_GNTDEV_DMABUF_IMP_TO_REFS = _G(11, ioctl_gntdev_dmabuf_imp_to_refs)
IOCTL_GNTDEV_DMABUF_IMP_RELEASE = _G(12, ioctl_gntdev_dmabuf_imp_release)


# ------------------------------------------------------- variable size
def map_grant_ref_request(refs: _abc.Sequence[tuple[int, int]]) -> ioctl_gntdev_map_grant_ref:
    """An IOCTL_GNTDEV_MAP_GRANT_REF argument for ``refs``, a sequence of (domid, ref)."""
    op = _with_tail(ioctl_gntdev_map_grant_ref(count=len(refs)), "refs", len(refs))
    for slot, (domid, ref) in zip(_tail(op, "refs", len(refs)), refs):
        slot.domid, slot.ref = domid, ref
    return op


def map_grant_refs(op: ioctl_gntdev_map_grant_ref) -> list[tuple[int, int]]:
    """The ``op.count`` (domid, ref) pairs of ``op.refs``."""
    return [(r.domid, r.ref) for r in _tail(op, "refs", op.count)]


def dmabuf_exp_from_refs_request(
    domid: int, refs: _abc.Sequence[int], flags: int = 0
) -> ioctl_gntdev_dmabuf_exp_from_refs:
    """An IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS argument exporting ``refs`` of ``domid``.

    ``flags`` are ``GNTDEV_DMA_FLAG_*``; the driver writes the dma-buf into ``fd``.
    """
    op = ioctl_gntdev_dmabuf_exp_from_refs(flags=flags, count=len(refs), domid=domid)
    _tail(_with_tail(op, "refs", len(refs)), "refs", len(refs))[:] = list(refs)
    return op


def dmabuf_imp_to_refs_request(
    fd: int, domid: int, count: int
) -> ioctl_gntdev_dmabuf_imp_to_refs:
    """An IOCTL_GNTDEV_DMABUF_IMP_TO_REFS argument with room for ``count`` refs.

    The driver grants dma-buf ``fd``'s pages to ``domid`` and writes the refs.
    """
    op = ioctl_gntdev_dmabuf_imp_to_refs(fd=fd, count=count, domid=domid)
    return _with_tail(op, "refs", count)


def dmabuf_refs(
    op: ioctl_gntdev_dmabuf_exp_from_refs | ioctl_gntdev_dmabuf_imp_to_refs,
) -> list[int]:
    """The ``op.count`` grant references of a dma-buf export or import."""
    return list(_tail(op, "refs", op.count))
