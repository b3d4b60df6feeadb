"""Placing files at fixed addresses inside a reserved range (``mmap(MAP_FIXED)``).

The service and each domain process keep one virtual range for all of
machine memory, frame ``mfn`` at ``base + mfn * 4096``, and map the files
that back frames over parts of it.  Python's :mod:`mmap` cannot map at an
address, so this calls libc's ``mmap`` through :mod:`ctypes` (off the hot
paths: files are placed when frames are allocated or first reached).
"""

from __future__ import annotations

import ctypes
import mmap
import os

PAGE_SIZE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _check(got: int | None, want: int, what: str) -> None:
    if got is None or got == _FAILED or got != want:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def address_of(buf: mmap.mmap) -> int:
    """The address of the first byte of a writable mmap."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c  # release the export, so that buf can close


def reserve(nbytes: int) -> mmap.mmap:
    """A range of ``nbytes`` no access reaches until files are placed in it.

    Python's mmap object of it is writable (its views are), the pages are
    ``PROT_NONE``: a read or write of a page nothing was placed on faults.
    """
    m = mmap.mmap(
        -1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
        mmap.PROT_READ | mmap.PROT_WRITE,
    )
    addr = address_of(m)
    if _mprotect(addr, nbytes, _PROT_NONE) != 0:
        err = ctypes.get_errno()
        m.close()
        raise OSError(err, f"mprotect: {os.strerror(err)}")
    return m


def place(addr: int, length: int, fd: int, offset: int, writable: bool) -> None:
    """Map ``length`` bytes of ``fd`` from ``offset`` shared at ``addr`` (replacing what was there).

    Raises:
        OSError: the kernel refused (EACCES: a read-only descriptor mapped writable).
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    got = _mmap(addr, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    _check(got, addr, "mmap(MAP_FIXED)")


def clear(addr: int, length: int) -> None:
    """Make ``length`` bytes at ``addr`` unreachable again (``PROT_NONE``, no file)."""
    got = _mmap(
        addr, length, _PROT_NONE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0,
    )
    _check(got, addr, "mmap(PROT_NONE)")
