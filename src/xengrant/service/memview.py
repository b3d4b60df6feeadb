"""A domain process's view of machine memory: the files the service gave it, placed.

The process reserves one range for all of machine memory, frame ``mfn`` at
``mfn * 4096``, unreachable (``PROT_NONE``) until a file backing the frame is
placed there.  Files come only from the service, on the domain's memory
socket (a stream), one :data:`~xengrant.service.backing.RECORD`
each: ``PLACE`` with the file's descriptor (read-only for a read-only
grant), ``UNPLACE`` when frames left a file.  The service writes them before
the reply that makes them matter, so reading what is queued (:meth:`drain`)
after a reply brings the view up to date.  Descriptors are kept (one per
file), so that views of scattered frames can be mapped anew and a repeated
map needs nothing new (:meth:`ensure`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import mmap
import os
import resource
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .. import _cext
from ..errors import HypercallError
from . import fixedmap
from .backing import GENERATION, PLACE, RECORD, UNPLACE

PAGE_SIZE = fixedmap.PAGE_SIZE
_ANC = socket.CMSG_SPACE(4 * 4)
#: reach levels
_RO, _RW = 1, 2


def raise_nofile() -> None:
    """Raise this process's descriptor limit to its hard limit (each file is one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ClientMemory:
    """The frames this domain process may reach, placed in one reserved range.

    Args:
        side_fd: the memory socket (taken over: closed with this).
        nr_frames: machine frames.
    """

    def __init__(self, side_fd: int, nr_frames: int) -> None:
        raise_nofile()
        self.nr_frames = nr_frames
        self.side = socket.socket(fileno=side_fd)
        self.side.setblocking(False)
        #: the reserved range; its views are the frames (faults where nothing is placed)
        self.mm = fixedmap.reserve(nr_frames * PAGE_SIZE)
        self.base = fixedmap.address_of(self.mm)
        #: per frame: 0 unreachable, 1 read-only, 2 read-write
        self.reach = bytearray(nr_frames)
        #: per frame: the file placed there (0: none)
        self.fid_of = array.array("i", bytes(4 * nr_frames))
        #: file id -> (descriptor, first mfn, pages, writable)
        self.files: dict[int, tuple[int, int, int, bool]] = {}
        self._lock = threading.Lock()
        self._side_fd = self.side.fileno()
        #: the service's count of records sent (its generation page), and ours read
        self._gen: Any = None
        self._gen_map: mmap.mmap | None = None
        self._seen = 0
        self._first_record()
        self.closed = False

    def _first_record(self) -> None:
        """Take the generation page: the first record, sent with the socket."""
        self.side.settimeout(10.0)
        try:
            data, anc, _flags, _addr = self.side.recvmsg(RECORD.size, _ANC)
        finally:
            self.side.setblocking(False)
        fds = array.array("i")
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        try:
            if len(data) != RECORD.size or RECORD.unpack(data)[0] != GENERATION or len(fds) != 1:
                raise HypercallError("memory", errno.EPROTO, "no generation page first")
            self._gen_map = mmap.mmap(fds[0], PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            self._gen = memoryview(self._gen_map).cast("Q")
        finally:
            for fd in fds:
                os.close(fd)
        self._seen = 1  # the generation record itself

    def drain(self) -> int:
        """Apply every record queued on the memory socket.

        Returns:
            How many records were read.

        Raises:
            HypercallError: EPROTO, a record that is not one (the view is unsure).
        """
        n = 0
        with self._lock:
            seen = self._gen[0]  # records up to this one are in the socket
            while True:
                try:
                    data, anc, _flags, _addr = self.side.recvmsg(RECORD.size, _ANC)
                except (BlockingIOError, InterruptedError):
                    self._seen = seen
                    return n
                except OSError:
                    return n
                fds = array.array("i")
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return n
                try:
                    self._apply(data, list(fds))
                except BaseException:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    raise
                n += 1

    def _apply(self, data: bytes, fds: list[int]) -> None:
        if len(data) != RECORD.size:
            raise HypercallError("memory", errno.EPROTO, f"a {len(data)}-byte memory record")
        kind, fid, mfn, n, writable = RECORD.unpack(data)
        if not (mfn >= 0 and n > 0 and mfn + n <= self.nr_frames):
            raise HypercallError("memory", errno.EPROTO, f"frames {mfn:#x}+{n} out of range")
        if kind == PLACE:
            if len(fds) != 1:
                raise HypercallError("memory", errno.EPROTO, "a PLACE record without its file")
            fd = fds[0]
            fixedmap.place(self.base + mfn * PAGE_SIZE, n * PAGE_SIZE, fd, 0, bool(writable))
            self._forget(fid)
            self.files[fid] = (fd, mfn, n, bool(writable))
            self.fid_of[mfn : mfn + n] = array.array("i", [fid]) * n
            self.reach[mfn : mfn + n] = bytes([_RW if writable else _RO]) * n
        elif kind == UNPLACE:
            for fd in fds:
                os.close(fd)
            fid_of = self.fid_of
            m, end = mfn, mfn + n
            while m < end:  # each run of frames still that file's: one mmap
                if fid_of[m] != fid:
                    m += 1
                    continue
                stop = m + 1
                while stop < end and fid_of[stop] == fid:
                    stop += 1
                fixedmap.clear(self.base + m * PAGE_SIZE, (stop - m) * PAGE_SIZE)
                fid_of[m:stop] = array.array("i", bytes(4 * (stop - m)))
                self.reach[m:stop] = bytes(stop - m)
                m = stop
            if fid in self.files and fid not in fid_of[mfn : mfn + n] and not self._uses(fid):
                self._forget(fid)
        else:
            raise HypercallError("memory", errno.EPROTO, f"memory record kind {kind}")

    def _uses(self, fid: int) -> bool:
        f = self.files.get(fid)
        if f is None:
            return False
        _fd, start, n, _w = f
        return fid in self.fid_of[start : start + n]

    def _forget(self, fid: int) -> None:
        f = self.files.pop(fid, None)
        if f is not None:
            with contextlib.suppress(OSError):
                os.close(f[0])

    def pending(self) -> bool:
        """Did the service send records we have not read? (a load from its page)"""
        return bool(self._gen[0] != self._seen)

    def reachable(self, mfns: Sequence[int], writable: bool) -> bool:
        """Are all ``mfns`` placed, writable if asked? (Records not drained yet aside.)"""
        need = _RW if writable else _RO
        reach = self.reach
        n = len(mfns)
        first = mfns[0]
        if n > 1 and mfns[-1] - first == n - 1:
            run = reach[first : first + n]
            return run.count(_RW) == n or (not writable and run.count(0) == 0)
        return all(reach[m] >= need for m in mfns)

    def ensure(
        self, mfns: Sequence[int], gfns: Sequence[int], writable: bool,
        ask: Callable[[Sequence[int], bool], Any],
    ) -> None:
        """Make ``mfns`` (the frames at ``gfns``) reachable: drain, and if that is not
        enough, ``ask(gfns, writable)`` the service for their files (``MSG_REACH``).

        Raises:
            HypercallError: what the service answered (EACCES, EFAULT), or
                EFAULT if the frames are still not reachable.
        """
        if self.closed:
            raise HypercallError("map", errno.EBADF, "the domain's memory is closed")
        if self.pending():
            self.drain()
        if self.reachable(mfns, writable):
            return
        for _ in range(64):  # the service sends at most MAX_SEND files per answer
            sent = ask(gfns, writable)
            self.drain()
            if self.reachable(mfns, writable):
                return
            if not sent:
                break
        raise HypercallError(
            "map", errno.EFAULT, f"frames {list(mfns)[:4]}... not reachable after REACH"
        )

    def view(self, mfns: Sequence[int], readonly: bool) -> Any:
        """A FrameView of placed frames: a slice of the range when contiguous, else
        a fresh mapping of their files (``PROT_READ`` when ``readonly``)."""
        n = len(mfns)
        first = mfns[0]
        contiguous = n == 1 or (
            mfns[-1] - first == n - 1 and list(mfns) == list(range(first, first + n))
        )
        if contiguous and (readonly or self.reach[first : first + n].count(_RW) == n):
            return _cext.borrow(self.mm, first * PAGE_SIZE, n * PAGE_SIZE, readonly)
        fds, offs = [], []
        for m in mfns:
            fd, start, _n, _w = self.files[self.fid_of[m]]
            fds.append(fd)
            offs.append(m - start)
        return _cext.vmap(fds, offs, readonly)

    def fresh_view(self, mfns: Sequence[int], readonly: bool) -> Any:
        """A new mapping of the frames' files (``PROT_READ`` when ``readonly``)."""
        fds, offs = [], []
        for m in mfns:
            fd, start, _n, _w = self.files[self.fid_of[m]]
            fds.append(fd)
            offs.append(m - start)
        return _cext.vmap(fds, offs, readonly)

    def close(self) -> None:
        """Close the files and the memory socket; the range goes with its last view."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            for fid in list(self.files):
                self._forget(fid)
            self.side.close()
            gen, self._gen = self._gen, None
            if gen is not None:
                gen.release()
                if self._gen_map is not None:
                    self._gen_map.close()
        try:
            self.mm.close()
        except BufferError:
            pass  # a FrameView still borrows it: unmapped with the last one
