"""What the tests need from newer Pythons, on every Python the package claims (3.9+).

``os.eventfd``, ``os.eventfd_read`` and ``os.eventfd_write`` are Python 3.10+; on 3.9 the
same system call goes through libc and the same 8-byte counter reads and writes.
"""

from __future__ import annotations

import ctypes
import os

#: linux/eventfd.h: EFD_CLOEXEC is O_CLOEXEC, EFD_NONBLOCK is O_NONBLOCK
EFD_CLOEXEC = getattr(os, "EFD_CLOEXEC", os.O_CLOEXEC)
EFD_NONBLOCK = getattr(os, "EFD_NONBLOCK", os.O_NONBLOCK)


def eventfd(initval: int = 0, flags: int = EFD_CLOEXEC) -> int:
    """``os.eventfd``: a new eventfd."""
    if hasattr(os, "eventfd"):
        return os.eventfd(initval, flags)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.eventfd(ctypes.c_uint(initval), ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def eventfd_read(fd: int) -> int:
    """``os.eventfd_read``: the counter, cleared (BlockingIOError when 0 and non-blocking)."""
    if hasattr(os, "eventfd_read"):
        return os.eventfd_read(fd)
    return int.from_bytes(os.read(fd, 8), "little")


def eventfd_write(fd: int, value: int) -> None:
    """``os.eventfd_write``: add to the counter."""
    if hasattr(os, "eventfd_write"):
        os.eventfd_write(fd, value)
        return
    os.write(fd, value.to_bytes(8, "little"))
