"""One open Linux Xen device (``/dev/xen/gntalloc``, ``gntdev``, ``evtchn``).

Every system call the Linux backend makes goes through a :class:`Device`:
``ioctl`` with a ctypes structure (the driver reads and writes it in place, as
libxengnttab passes a pointer), ``mmap`` of a range of the device at an offset
(the ``index`` the driver handed out), ``read``/``write`` (event channels) and
``close``.  :class:`OsDevice` is the real one; tests pass a fake with the same
methods, so the backend runs without Xen.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from typing import TYPE_CHECKING, Protocol, Union

if TYPE_CHECKING:
    from ..guest.share import PageView

try:
    from .. import _cext
except ImportError:  # pragma: no cover
    _cext = None

PAGE_SIZE = 4096


class Device(Protocol):
    """What the backend needs from an open device."""

    path: str

    def ioctl(self, request: int, arg: ctypes.Structure) -> int:
        """``ioctl(fd, request, &arg)``; raises OSError with the driver's errno."""
        ...

    def mmap(self, length: int, writable: bool, offset: int) -> PageView:
        """``mmap(NULL, length, prot, MAP_SHARED, fd, offset)``.

        Returns an object with the buffer protocol (read-only unless
        ``writable``) and ``close()`` (munmap; BufferError while exported).
        """
        ...

    def fileno(self) -> int:
        """The file descriptor (for poll/select)."""
        ...

    def read(self, size: int) -> bytes:
        """``read(fd, size)``; raises OSError (EAGAIN when non-blocking and empty)."""
        ...

    def write(self, data: bytes) -> int:
        """``write(fd, data)``."""
        ...

    def close(self) -> None:
        """Close the file descriptor (the driver frees what it still holds for it)."""
        ...


class OsDevice:
    """A device node opened with ``os.open`` (``O_RDWR | O_CLOEXEC``).

    Args:
        path: the device node, e.g. ``/dev/xen/gntdev``.
        nonblock: also ``O_NONBLOCK`` (event channels).

    Raises:
        OSError: the node cannot be opened (ENOENT: the driver is not loaded).
    """

    def __init__(self, path: str, nonblock: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
        self.fd = os.open(path, flags)

    def __repr__(self) -> str:
        return f"<OsDevice {self.path} fd={self.fd}>"

    def ioctl(self, request: int, arg: ctypes.Structure) -> int:
        return int(fcntl.ioctl(self.fd, request, arg, True))

    def mmap(self, length: int, writable: bool, offset: int) -> PageView:
        """One ``mmap`` of the whole range (gntdev wants one vma per mapping).

        Python's ``mmap.mmap`` would ``dup`` the descriptor for every
        mapping (1024 single-page mappings exhaust ``RLIMIT_NOFILE``), so this
        uses ``xengrant._cext.vmap``: a ``PROT_NONE`` reservation, then one
        ``MAP_SHARED | MAP_FIXED`` mmap of the device over it.  Its
        ``FrameView`` refuses ``close()`` while exported, like ``mmap``.
        """
        if _cext is None:  # pragma: no cover - the extension is always built
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            return mmap.mmap(self.fd, length, mmap.MAP_SHARED, prot, offset=offset)
        first = offset // PAGE_SIZE
        view: PageView = _cext.vmap(self.fd, range(first, first + length // PAGE_SIZE),
                                    not writable)
        return view

    def fileno(self) -> int:
        return self.fd

    def read(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


#: A writable buffer whose address gntdev can be asked about.
AddressableBuffer = Union[bytearray, memoryview, mmap.mmap, "PageView"]


def buffer_address(buf: AddressableBuffer) -> int:
    """The virtual address of a writable buffer (an mmap, a bytearray).

    Used for ``IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR``; the temporary export is
    dropped before returning.
    """
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c
