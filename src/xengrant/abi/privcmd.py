"""Linux's privcmd driver ABI (``/dev/xen/privcmd``): include/uapi/xen/privcmd.h.

Every constant keeps its C name and value; every structure is a ctypes
structure with the C layout of x86_64 (checked against the installed header by
tests/test_abi_headers.py, which compiles C). Pointer members are ctypes
pointers, so a structure can be handed to ``fcntl.ioctl`` as it is.

This module also holds the pieces the other Linux driver modules
(:mod:`.gntalloc`, :mod:`.gntdev`, :mod:`.evtchn`) share:

- ``_IOC`` and its constants, as include/uapi/asm-generic/ioctl.h defines them
  (x86 and Arm use the generic layout: nr 8 bits, type 8, size 14, dir 2);
- ``_with_tail`` / ``_tail`` for the structures that end in a variable-length
  array declared ``[1]`` (``gref_ids``, ``refs``): the ctypes class keeps the C
  size, and an instance is grown to hold ``n`` entries, as a C caller mallocs
  ``sizeof(op) + (n - 1) * sizeof(entry)``.

The header itself includes ``<xen/interface/xen.h>``, a kernel-internal path
that linux-libc-dev does not ship; C users point it at Xen's ``<xen/xen.h>``.
"""

from __future__ import annotations

import ctypes
import typing as _t

from .grant_table import domid_t as _domid_t
from .grant_table import xen_pfn_t as _xen_pfn_t

# ------------------------------------------ asm-generic/ioctl.h (shared)
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir_: int, type_: str | int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: an ioctl number; ``type_`` is a char like ``'G'``."""
    code = ord(type_) if isinstance(type_, str) else type_
    for value, mask, what in (
        (dir_, _IOC_DIRMASK, "dir"),
        (code, _IOC_TYPEMASK, "type"),
        (nr, _IOC_NRMASK, "nr"),
        (size, _IOC_SIZEMASK, "size"),
    ):
        if not 0 <= value <= mask:
            raise ValueError(f"_IOC {what} {value!r} out of range 0..{mask}")
    return (
        (dir_ << _IOC_DIRSHIFT)
        | (code << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# -------------------------------------- trailing "[1]" arrays (shared)
_S = _t.TypeVar("_S", bound=ctypes.Structure)


def _tail_type(cls: type[ctypes.Structure], field: str) -> tuple[int, type[_t.Any]]:
    """Offset and element type of the array member ``field`` of ``cls``."""
    for entry in cls._fields_:
        if entry[0] == field:
            array = _t.cast("type[ctypes.Array[_t.Any]]", entry[1])
            return getattr(cls, field).offset, _t.cast("type[_t.Any]", array._type_)
    raise AttributeError(f"{cls.__name__} has no field {field!r}")


def _with_tail(op: _S, field: str, n: int) -> _S:
    """Grow ``op`` (in place) so its trailing ``field[1]`` array holds ``n`` entries.

    Never shrinks below the C ``sizeof``; the added bytes are zeroed. Returns ``op``.
    """
    if n < 0:
        raise ValueError(f"negative entry count {n}")
    offset, elem = _tail_type(type(op), field)
    old = ctypes.sizeof(op)
    new = offset + n * ctypes.sizeof(elem)
    if new > old:
        ctypes.resize(op, new)
        ctypes.memset(ctypes.addressof(op) + old, 0, new - old)
    return op


def _tail(op: ctypes.Structure, field: str, n: int) -> ctypes.Array[_t.Any]:
    """The first ``n`` entries of the trailing array ``field``: a view into ``op``."""
    offset, elem = _tail_type(type(op), field)
    if n < 0 or offset + n * ctypes.sizeof(elem) > ctypes.sizeof(op):
        raise ValueError(f"{type(op).__name__}.{field} has no room for {n} entries")
    view: ctypes.Array[_t.Any] = (elem * n).from_buffer(op, offset)
    return view


# ------------------------------------------------------------ constants
#: OR'ed into an ``arr`` entry by IOCTL_PRIVCMD_MMAPBATCH on failure.
PRIVCMD_MMAPBATCH_MFN_ERROR = 0xF0000000
PRIVCMD_MMAPBATCH_PAGED_ERROR = 0x80000000


# ------------------------------------------------------------ structures
class privcmd_hypercall(ctypes.Structure):
    """``struct privcmd_hypercall``: hypercall number and up to five arguments."""

    _fields_ = [("op", ctypes.c_uint64), ("arg", ctypes.c_uint64 * 5)]


class privcmd_mmap_entry(ctypes.Structure):
    """``struct privcmd_mmap_entry``: ``mfn`` is really a GFN (name kept for the ABI)."""

    _fields_ = [("va", ctypes.c_uint64), ("mfn", ctypes.c_uint64), ("npages", ctypes.c_uint64)]


class privcmd_mmap(ctypes.Structure):
    """``struct privcmd_mmap`` (IOCTL_PRIVCMD_MMAP)."""

    _fields_ = [
        ("num", ctypes.c_int),
        ("dom", _domid_t),
        ("entry", ctypes.POINTER(privcmd_mmap_entry)),
    ]


class privcmd_mmapbatch(ctypes.Structure):
    """``struct privcmd_mmapbatch`` (IOCTL_PRIVCMD_MMAPBATCH)."""

    _fields_ = [
        ("num", ctypes.c_int),
        ("dom", _domid_t),
        ("addr", ctypes.c_uint64),
        ("arr", ctypes.POINTER(_xen_pfn_t)),
    ]


class privcmd_mmapbatch_v2(ctypes.Structure):
    """``struct privcmd_mmapbatch_v2`` (IOCTL_PRIVCMD_MMAPBATCH_V2)."""

    _fields_ = [
        ("num", ctypes.c_uint),
        ("dom", _domid_t),
        ("addr", ctypes.c_uint64),
        ("arr", ctypes.POINTER(_xen_pfn_t)),
        ("err", ctypes.POINTER(ctypes.c_int)),
    ]


class privcmd_dm_op_buf(ctypes.Structure):
    """``struct privcmd_dm_op_buf``: one buffer of a device-model op."""

    _fields_ = [("uptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class privcmd_dm_op(ctypes.Structure):
    """``struct privcmd_dm_op`` (IOCTL_PRIVCMD_DM_OP)."""

    _fields_ = [
        ("dom", _domid_t),
        ("num", ctypes.c_uint16),
        ("ubufs", ctypes.POINTER(privcmd_dm_op_buf)),
    ]


class privcmd_mmap_resource(ctypes.Structure):
    """``struct privcmd_mmap_resource`` (IOCTL_PRIVCMD_MMAP_RESOURCE)."""

    _fields_ = [
        ("dom", _domid_t),
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("idx", ctypes.c_uint32),
        ("num", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    ]


# -------------------------------------------------------------- ioctls
IOCTL_PRIVCMD_HYPERCALL = _IOC(_IOC_NONE, "P", 0, ctypes.sizeof(privcmd_hypercall))
IOCTL_PRIVCMD_MMAP = _IOC(_IOC_NONE, "P", 2, ctypes.sizeof(privcmd_mmap))
IOCTL_PRIVCMD_MMAPBATCH = _IOC(_IOC_NONE, "P", 3, ctypes.sizeof(privcmd_mmapbatch))
IOCTL_PRIVCMD_MMAPBATCH_V2 = _IOC(_IOC_NONE, "P", 4, ctypes.sizeof(privcmd_mmapbatch_v2))
IOCTL_PRIVCMD_DM_OP = _IOC(_IOC_NONE, "P", 5, ctypes.sizeof(privcmd_dm_op))
IOCTL_PRIVCMD_RESTRICT = _IOC(_IOC_NONE, "P", 6, ctypes.sizeof(_domid_t))
IOCTL_PRIVCMD_MMAP_RESOURCE = _IOC(_IOC_NONE, "P", 7, ctypes.sizeof(privcmd_mmap_resource))
