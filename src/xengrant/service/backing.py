"""Machine memory as a table of files: what each domain process may map.

The service's view of machine memory stays one buffer (the hypervisor core
and its C fast paths index it by ``mfn * 4096``), but it is no longer one
file that every domain process holds.  The range is the service's private
memfd (never sent) with other memfds mapped over parts of it
(``MAP_FIXED | MAP_SHARED``): every run of frames allocated to a domain is a
fresh memfd of its own, sealed against shrinking and growing, mode 0600.
``fid_of[mfn]`` says which file backs a frame (0: the private one).

A domain process gets a file only by asking (:meth:`Backing.reach`), for
gfns of its own p2m: its own frames' files read-write, a foreign frame's
file only while it maps that frame, and only if every page of the file is
granted to it (full-page ``GTF_permit_access`` entries naming it) with the
access it asks.  Read-only: a descriptor opened ``O_RDONLY``.  Files are
sent on the domain's memory socket (a stream of :data:`RECORD` s, each one send
with at most one descriptor), before the reply that says so.

Linux cannot take a descriptor back, so a file that left the service is
never used for anybody else's data: a frame freed goes back to the private
file (rehome), a page whose grant ends while a peer holds its file moves to
a fresh file (:meth:`Backing.end_grant`), a transferred page moves to a
fresh file of its new owner.  Whoever holds a file a frame left gets an
:data:`UNPLACE` record.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import resource
import socket
import struct
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import cast

from .. import _cext
from .._runs import runs
from ..abi import grant_table as gt
from ..emu.domain import (
    P2M_GNTTAB_SHARED,
    P2M_GNTTAB_STATUS,
    P2M_GRANT_MAP_RO,
    P2M_GRANT_MAP_RW,
    P2M_RAM_RW,
    DomainState,
)
from ..errors import HypercallError
from . import fixedmap

PAGE_SIZE = fixedmap.PAGE_SIZE
#: A memory-socket record: kind, file id, first mfn, pages, writable.
RECORD = struct.Struct("<IIqqI")
#: Map the attached file at the frames (replacing what was there).
PLACE = 1
#: The frames left that file: unmap them (if still that file's).
UNPLACE = 2
#: The first record: the domain's generation page (read-only), whose u64 counts
#: the records sent, so that the client looks at the socket only when it moved.
GENERATION = 3
_GEN = struct.Struct("<Q")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Files one domain's frames may take at once (each is a mapping and a
#: descriptor in the service); past it, allocations fail as out of memory.
MAX_FILES_PER_DOMAIN = 8192
#: Bytes a domain's memory socket may hold unread; past it the domain's
#: connection is dropped (a client that stops reading).
SIDE_SNDBUF = 1 << 20
#: Files sent in answer to one reach (SCM_RIGHTS carries at most 253 per message).
MAX_SEND = 200
_OWN = frozenset({P2M_RAM_RW, P2M_GNTTAB_SHARED, P2M_GNTTAB_STATUS})
_FOREIGN = frozenset({P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO})


def max_files() -> int:
    """Files the service may hold in all: below its descriptor limit (raised to the
    hard limit) and the kernel's mapping count (``vm.max_map_count``, each file
    is a mapping and may split the private one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    maps = 65530
    with contextlib.suppress(OSError, ValueError), open("/proc/sys/vm/max_map_count") as f:
        maps = int(f.read())
    fds = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(64, min(fds - 512, maps // 2 - 1024))


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_PUNCH = 2 | 1  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _punch(fd: int, offset: int, length: int) -> None:
    """Zero ``length`` bytes of a memfd from ``offset`` (and free the memory).

    Raises:
        OSError: the kernel refused (never for the service's own writable files).
    """
    if _fallocate(fd, _PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


class MemFile:
    """One memfd backing a run of frames of one owner."""

    __slots__ = ("fd", "fid", "holders", "npages", "owner", "ro_fd", "start", "used")

    def __init__(self, fid: int, fd: int, start: int, npages: int, owner: int) -> None:
        self.fid = fid
        self.fd = fd
        self.ro_fd = -1
        self.start = start
        self.npages = npages
        self.owner = owner
        #: frames it backs now
        self.used = npages
        #: domains it was sent to -> sent writable
        self.holders: dict[int, bool] = {}

    def close(self) -> None:
        for fd in (self.fd, self.ro_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.ro_fd = -1


class Backing:
    """The table mfn -> file of a service's machine memory (see the module docstring).

    Args:
        view: the service's mapping of machine memory (the private memfd's).
        pool_fd: the private memfd (frames nobody owns are its pages).
        nr_frames: machine frames.
        limit: files in all (default :func:`max_files`).
    """

    def __init__(
        self, view: mmap.mmap, pool_fd: int, nr_frames: int, limit: int | None = None
    ) -> None:
        self.base = fixedmap.address_of(view)
        self.mem = memoryview(view)
        self.pool_fd = pool_fd
        self.nr_frames = nr_frames
        self.limit = max_files() if limit is None else limit
        self.fid_of = array.array("i", bytes(4 * nr_frames))
        self.files: dict[int, MemFile] = {}
        self.per_owner: dict[int, int] = {}
        self._next_fid = 1
        #: frames freed, not remapped yet (:meth:`flush`)
        self._freed: list[int] = []
        #: domid -> the service's end of its memory socket
        self.sides: dict[int, socket.socket] = {}
        #: domid -> its generation page (records sent so far)
        self.gens: dict[int, mmap.mmap] = {}
        #: called with a domid whose memory socket is full (it stopped reading)
        self.on_overflow: Callable[[int], None] = lambda domid: None

    # ------------------------------------------------------------- files
    def _new_file(self, owner: int, start: int, n: int, content: bytes | None = None) -> MemFile:
        if len(self.files) >= self.limit or self.per_owner.get(owner, 0) >= MAX_FILES_PER_DOMAIN:
            raise OSError(errno.ENOMEM, f"d{owner}: too many memory files")
        fd = os.memfd_create(f"xengrant-d{owner}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, n * PAGE_SIZE)
            if content is not None:
                os.pwrite(fd, content, 0)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            os.fchmod(fd, 0o600)
            fixedmap.place(self.base + start * PAGE_SIZE, n * PAGE_SIZE, fd, 0, True)
        except BaseException:
            os.close(fd)
            raise
        f = MemFile(self._next_fid, fd, start, n, owner)
        self._next_fid += 1
        self.files[f.fid] = f
        self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        self.fid_of[start : start + n] = array.array("i", [f.fid]) * n
        return f

    def _segments(self, start: int, n: int) -> list[tuple[int, int, int]]:
        """``(first mfn, pages, fid)`` of the files backing ``start .. start+n-1``."""
        fid_of = self.fid_of
        out = []
        a, end = start, start + n
        while a < end:
            fid = fid_of[a]
            b = a + 1
            while b < end and fid_of[b] == fid:
                b += 1
            out.append((a, b - a, fid))
            a = b
        return out

    def _leave(self, f: MemFile, start: int, n: int) -> None:
        """Frames ``start..`` (``n``) no longer use file ``f``: tell its holders, maybe close it."""
        f.used -= n
        for domid in f.holders:
            self._push(domid, UNPLACE, f, start, n)
        if f.used <= 0:
            f.close()
            del self.files[f.fid]
            left = self.per_owner.get(f.owner, 1) - 1
            if left:
                self.per_owner[f.owner] = left
            else:
                self.per_owner.pop(f.owner, None)

    # ------------------------------------------------ machine hooks
    def allocated(self, owner: int, frames: list[int]) -> None:
        """``Machine.on_alloc``: each run of new frames becomes a file of ``owner``.

        Raises:
            OSError: no file could be made (the machine gives the frames back).
        """
        self.flush()  # a frame freed in this same request may be handed out again
        made: list[MemFile] = []
        try:
            for start, n in runs(frames):
                made.append(self._new_file(owner, start, n))
        except BaseException:
            for f in made:
                self._to_pool(f.start, f.npages)
                self._leave(f, f.start, f.npages)
            raise

    def _to_pool(self, start: int, n: int) -> None:
        fixedmap.place(
            self.base + start * PAGE_SIZE, n * PAGE_SIZE, self.pool_fd, start * PAGE_SIZE, True
        )
        self.fid_of[start : start + n] = array.array("i", bytes(4 * n))

    def released(self, mfns: list[int]) -> None:
        """``Machine.on_release``: freed (and scrubbed) frames go back to the private
        file, at the latest with :meth:`flush` (frames freed one by one, as a batch
        of unmaps frees them, are remapped and announced in runs)."""
        self._freed += mfns

    def flush(self) -> None:
        """Remap the frames freed since the last flush (the caller holds the service
        lock, and flushes before it lets go of it: holders hear of it before any
        reply that could make them look)."""
        if not self._freed:
            return
        freed, self._freed = self._freed, []
        if len(freed) > 1:
            freed.sort()
        for start, n in runs(freed):
            for a, m, fid in self._segments(start, n):
                f = self.files.get(fid)
                if f is None:
                    continue
                # the scrub Xen does on free: a hole punched in the old file
                # zeroes the pages for whoever still holds it, and gives the
                # memory back; the frames are the private file's again (zero)
                try:
                    _punch(f.fd, (a - f.start) * PAGE_SIZE, m * PAGE_SIZE)
                except OSError:  # pragma: no cover - our own writable file
                    _cext.memset(self.mem, a * PAGE_SIZE, m * PAGE_SIZE, 0)
                self._to_pool(a, m)
                self._leave(f, a, m)

    def transferred(self, mfn: int, new_owner: int) -> None:
        """``Machine.on_transfer``: the page moves to a fresh file of its new owner
        (the old owner, and whoever it let hold the page, keep the old file)."""
        self._move(mfn, new_owner)

    def _move(self, mfn: int, owner: int) -> MemFile:
        """Copy frame ``mfn`` into a fresh one-page file of ``owner`` and back it with that."""
        self.flush()
        old = self.files.get(self.fid_of[mfn])
        content = bytes(self.mem[mfn * PAGE_SIZE : (mfn + 1) * PAGE_SIZE])
        f = self._new_file(owner, mfn, 1, content)
        if old is not None:
            self._leave(old, mfn, 1)
        return f

    # --------------------------------------------------- domain sockets
    def open_side(self, domid: int) -> socket.socket:
        """A new memory socket for ``domid`` (replacing any it had).

        Returns:
            The domain process's end, to send it; the caller closes it once
            sent (it holds no file until records come).
        """
        self.close_side(domid)
        # a stream: a datagram queue holds only net.unix.max_dgram_qlen (10)
        # records; each record is one send of RECORD.size bytes
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(OSError):
                mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SIDE_SNDBUF)
            mine.setblocking(False)
            mine.shutdown(socket.SHUT_RD)
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            gen_fd = os.memfd_create(f"xengrant-gen-d{domid}", flags)
            try:
                os.ftruncate(gen_fd, PAGE_SIZE)
                fcntl.fcntl(gen_fd, fcntl.F_ADD_SEALS, _SEALS)
                os.fchmod(gen_fd, 0o600)
                gen = mmap.mmap(gen_fd, PAGE_SIZE, mmap.MAP_SHARED)
                ro = os.open(f"/proc/self/fd/{gen_fd}", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                os.close(gen_fd)
            try:
                data = RECORD.pack(GENERATION, 0, 0, 1, 0)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ro]))]
                mine.sendmsg([data], anc, socket.MSG_DONTWAIT)
            finally:
                os.close(ro)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        self.sides[domid] = mine
        self.gens[domid] = gen
        return theirs

    def close_side(self, domid: int) -> None:
        """The domain is gone: close its memory socket (files it held stay held)."""
        mine = self.sides.pop(domid, None)
        if mine is not None:
            mine.close()
        gen = self.gens.pop(domid, None)
        if gen is not None:
            gen.close()

    def _push(self, domid: int, kind: int, f: MemFile, mfn: int, n: int,
              writable: bool = False, fd: int = -1) -> bool:
        mine = self.sides.get(domid)
        if mine is None:
            return False
        data = RECORD.pack(kind, f.fid, mfn, n, int(writable))
        try:
            if fd >= 0:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                sent = mine.sendmsg([data], anc, socket.MSG_DONTWAIT)
            else:
                sent = mine.send(data, socket.MSG_DONTWAIT)
            if sent != len(data):  # a record cut in two: the stream is lost
                raise BlockingIOError(errno.EAGAIN, "memory socket full")
        except OSError:
            self.close_side(domid)
            self.on_overflow(domid)
            return False
        gen = self.gens[domid]  # after the record is in the socket
        _GEN.pack_into(gen, 0, _GEN.unpack_from(gen)[0] + 1)
        return True

    # ------------------------------------------------------ requests
    def reach(self, hv_domains: dict[int, DomainState], d: DomainState, gfns: Sequence[int],
              writable: bool) -> int:
        """``MSG_REACH``: send ``d`` the files backing its ``gfns`` it does not hold yet.

        Returns:
            How many files were sent (on its memory socket, before the reply).

        Raises:
            HypercallError: EFAULT (a gfn with nothing there), EACCES (a
                foreign file holds pages not granted to ``d`` with that access,
                or a read-only mapping asked writable), ENOBUFS (the memory
                socket is gone or full).
        """
        if d.domid not in self.sides:
            raise HypercallError("reach", errno.ENOBUFS, f"d{d.domid} has no memory socket")
        todo: dict[int, MemFile] = {}
        p2m = d.p2m
        got = list(map(p2m.get, gfns))  # C-speed lookups; checks per file below
        if None in got:
            gfn = gfns[got.index(None)]
            raise HypercallError("reach", errno.EFAULT, f"d{d.domid} gfn {gfn:#x}: nothing there")
        ents = cast("list[tuple[int, int]]", got)
        mfns = [e[0] for e in ents]
        if min(mfns, default=0) < 0 or max(mfns, default=0) >= self.nr_frames:
            raise HypercallError("reach", errno.EFAULT, f"d{d.domid}: a frame out of range")
        fid_of = self.fid_of
        fids = set(map(fid_of.__getitem__, mfns))
        all_types = set(map(itemgetter(1), ents))
        by_fid: dict[int, set[int]] = {}
        if len(fids) == 1 or all_types <= _FOREIGN or all_types <= _OWN:
            # the common case (one file, or one kind of entry): C-speed sets
            by_fid = {fid: all_types for fid in fids}
        else:
            for fid, ent in zip(map(fid_of.__getitem__, mfns), ents):
                types = by_fid.get(fid)
                if types is None:
                    by_fid[fid] = {ent[1]}
                else:
                    types.add(ent[1])
        for fid, types in by_fid.items():
            f = self.files.get(fid)
            if f is None:
                raise HypercallError("reach", errno.EFAULT, f"d{d.domid}: a frame with no file")
            if f.owner == d.domid:
                pass  # its own frames, however its p2m holds them
            elif types <= _FOREIGN:
                if writable and P2M_GRANT_MAP_RO in types:
                    raise HypercallError(
                        "reach", errno.EACCES, f"d{d.domid}: a read-only mapping asked writable"
                    )
                granter = hv_domains.get(f.owner)
                if granter is None or not self._all_granted(granter, f, d.domid, writable):
                    raise HypercallError(
                        "reach", errno.EACCES,
                        f"d{d.domid}: frames {f.start:#x}+{f.npages} share a file with pages "
                        f"d{f.owner} did not grant d{d.domid}"
                        + (" writable" if writable else "")
                        + " (grant it through the library, which gives it a file of its own)",
                    )
            else:
                raise HypercallError(
                    "reach", errno.EFAULT, f"d{d.domid}: d{f.owner}'s frames as types {types}"
                )
            held = f.holders.get(d.domid)
            if held is None or (writable and not held):
                todo[f.fid] = f
        self.flush()
        sent = 0
        for f in list(todo.values())[:MAX_SEND]:
            w = writable or f.holders.get(d.domid, False)
            fd = f.fd if w else self._ro_fd(f)
            if not self._push(d.domid, PLACE, f, f.start, f.npages, w, fd):
                raise HypercallError("reach", errno.ENOBUFS, f"d{d.domid}: memory socket full")
            f.holders[d.domid] = w
            sent += 1
        return sent

    @staticmethod
    def _ro_fd(f: MemFile) -> int:
        if f.ro_fd < 0:
            # a new open file description, read-only: mmap(PROT_WRITE) of it is EACCES
            f.ro_fd = os.open(f"/proc/self/fd/{f.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return f.ro_fd

    def _all_granted(self, granter: DomainState, f: MemFile, grantee: int, writable: bool) -> bool:
        """Is every frame ``f`` backs granted by ``granter`` to ``grantee`` (writable if asked)?"""
        span: Sequence[int] = range(f.start, f.start + f.npages)
        if self.fid_of[f.start : f.start + f.npages].count(f.fid) != f.npages:
            span = [m for m in span if self.fid_of[m] == f.fid]  # some frames left it
        return granted_mfns(self.mem, granter, grantee, writable).issuperset(span)

    def prepare_grant(self, d: DomainState, gfns: Sequence[int], grantee: int) -> int:
        """``MSG_GRANT_PREPARE``: give each of ``d``'s RAM ``gfns`` a file of its own
        (before its grant entry is written), unless its file holds it alone and
        nobody but ``d`` and ``grantee`` was sent it.

        Returns:
            How many pages moved (each a :data:`PLACE` record to ``d``).

        Raises:
            HypercallError: EINVAL, a gfn that is not ``d``'s RAM; ENOMEM.
        """
        moved = 0
        for gfn in gfns:
            mfn = self._own_ram(d, gfn, "grant_prepare")
            f = self.files[self.fid_of[mfn]]
            if f.used == 1 and set(f.holders) <= {d.domid, grantee}:
                continue
            self._rehome(d, mfn)
            moved += 1
        return moved

    def end_grant(self, d: DomainState, gfns: Sequence[int]) -> int:
        """``MSG_GRANT_END``: ``d`` ended access to these pages and keeps them: each
        whose file a peer was sent moves to a fresh file (the peer keeps the old one).

        Returns:
            How many pages moved.
        """
        moved = 0
        for gfn in gfns:
            mfn = self._own_ram(d, gfn, "grant_end")
            f = self.files[self.fid_of[mfn]]
            if set(f.holders) <= {d.domid}:
                continue
            self._rehome(d, mfn)
            moved += 1
        return moved

    def _own_ram(self, d: DomainState, gfn: int, op: str) -> int:
        ent = d.p2m.get(gfn)
        if ent is None or ent[1] != P2M_RAM_RW:
            raise HypercallError(op, errno.EINVAL, f"d{d.domid} gfn {gfn:#x} is not its RAM")
        mfn = ent[0]
        if self.files.get(self.fid_of[mfn]) is None:  # pragma: no cover - RAM has a file
            raise HypercallError(op, errno.EFAULT, f"d{d.domid} mfn {mfn:#x}: no file")
        return int(mfn)

    def _rehome(self, d: DomainState, mfn: int) -> None:
        """Move ``d``'s page ``mfn`` to a fresh file and send it to ``d`` (its view moves too)."""
        try:
            f = self._move(mfn, d.domid)
        except OSError as e:
            raise HypercallError("grant_prepare", e.errno or errno.ENOMEM, str(e)) from None
        # (no memory socket: no process views it; a full one: the connection goes)
        self._push(d.domid, PLACE, f, mfn, 1, True, f.fd)
        f.holders[d.domid] = True

    def close(self) -> None:
        """Close every file and memory socket (the service is going)."""
        self._freed = []
        for f in self.files.values():
            f.close()
        self.files.clear()
        for domid in list(self.sides):
            self.close_side(domid)
        self.mem.release()

    def snapshot(self) -> dict[str, int]:
        """Counts for the stats: files, and memory sockets."""
        self.flush()
        return {"files": len(self.files), "sockets": len(self.sides)}


def granted_mfns(mem: memoryview, d: DomainState, grantee: int, writable: bool) -> set[int]:
    """Frames ``d`` grants ``grantee`` whole (``GTF_permit_access``, no sub-page),
    writable if ``writable``, read from its grant table as it is now."""
    g = d.gt
    v1 = g.version == 1
    # the header word (flags | domid << 16) of a full-page grant to grantee
    mask = 0xFFFF0000 | gt.GTF_type_mask | gt.GTF_sub_page | (gt.GTF_readonly if writable else 0)
    want = (grantee & 0xFFFF) << 16 | gt.GTF_permit_access
    targets: list[int] = []
    for frame in g.shared:
        page = mem[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE]
        if v1:  # {u16 flags, u16 domid, u32 frame}
            words = page.cast("I").tolist()
            hdrs, frames = words[0::2], words[1::2]
        else:  # {u16 flags, u16 domid, u32 pad, u64 frame}
            quads = page.cast("Q").tolist()
            hdrs = [q & 0xFFFFFFFF for q in quads[0::2]]
            frames = quads[1::2]
        page.release()
        targets += [t for h, t in zip(hdrs, frames) if h & mask == want]
    if d.pv:
        return set(targets)
    ents = [e for e in map(d.p2m.get, targets) if e is not None]
    return set(map(itemgetter(0), filter(_is_ram, ents)))


def _is_ram(ent: tuple[int, int]) -> bool:
    return ent[1] == P2M_RAM_RW
