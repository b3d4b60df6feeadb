"""A fake Linux Xen kernel for tests: gntalloc, gntdev and evtchn devices over one memfd.

It answers the ioctls and mmaps of xengrant.linux the way Linux's drivers do
(drivers/xen/gntalloc.c, gntdev.c, evtchn.c on Xen 4.17), closely enough to
test the backend without Xen:

- gntalloc: ALLOC_GREF hands out zeroed pages and refs (ENOSPC past
  ``limit``); a gref lives while the file holds it (until DEALLOC_GREF) or a
  vma maps it, then its unmap notify fires and, if a gntdev mapping still
  holds it, it is deferred until that goes (Linux's deferred g.e. list);
- gntdev: MAP_GRANT_REF only records; mmap maps (EINVAL if any grant is not
  granted to us, from an unknown domain, or read-only and the mmap writable);
  UNMAP_GRANT_REF releases (and fires its unmap notify); GRANT_COPY gives
  per-segment GNTST codes (EINVAL for no grant side or crossing a page);
- evtchn: loopback ports, NOTIFY, read/unmask; Xen's pending-on-bind.

Every ioctl is checked against the argument type and the request number of
xengrant.abi, so a wrong number or struct fails loudly.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import compat
from xengrant import _cext, abi

P = 4096
# the trailing arrays, read at their C offsets (arguments may be larger subclasses)
_ALLOC_IDS = abi.ioctl_gntalloc_alloc_gref.gref_ids.offset
_MAP_REFS = abi.ioctl_gntdev_map_grant_ref.refs.offset


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class Gref:
    ref: int
    slot: int
    domid: int
    writable: bool
    file_held: bool = True
    vmas: int = 0
    mapped: int = 0  # gntdev pages mapping it
    notify: tuple[int, int, int] | None = None  # (action, byte offset in page, port)


class FakeKernel:
    """The shared state of the three fake devices."""

    def __init__(self, domid: int = 0, pages: int = 4096, limit: int = 1024) -> None:
        self.domid = domid
        self.known_domids = {domid}
        self.fd = os.memfd_create("fake-xen")
        os.ftruncate(self.fd, pages * P)
        self.used = bytearray(pages)
        self.grefs: dict[int, Gref] = {}
        self.next_ref = 8
        self.limit = limit
        self.nr_entries = 64 * 512  # Xen 4.17's default max_grant_frames, v1 entries
        self.gref_size = 0
        self.deferred: list[Gref] = []
        self.log: list[str] = []
        # evtchn
        self.next_port = 5
        self.peer: dict[int, int | None] = {}
        self.pending: list[int] = []

    # ------------------------------------------------------------ memory
    def alloc_slots(self, n: int) -> int:
        run = 0
        for i, u in enumerate(self.used):
            run = run + 1 if not u else 0
            if run == n:
                start = i - n + 1
                self.used[start : i + 1] = b"\1" * n
                os.pwrite(self.fd, bytes(n * P), start * P)
                return start
        raise _err(errno.ENOMEM)

    def read(self, g: Gref, off: int, n: int) -> bytes:
        return os.pread(self.fd, n, g.slot * P + off)

    def write(self, g: Gref, off: int, data: bytes) -> None:
        os.pwrite(self.fd, data, g.slot * P + off)

    # ------------------------------------------------------------- grefs
    def maybe_free(self, g: Gref) -> None:
        """gntalloc's do_cleanup/__del_gref: the last local user is gone."""
        if g.file_held or g.vmas or g.ref not in self.grefs:
            return
        if g.notify is not None:
            action, off, port = g.notify
            if action & abi.UNMAP_NOTIFY_CLEAR_BYTE:
                self.write(g, off, b"\0")
            if action & abi.UNMAP_NOTIFY_SEND_EVENT:
                self.send(port)
            g.notify = None
        self.gref_size -= 1
        del self.grefs[g.ref]
        if g.mapped:
            self.log.append(f"deferring g.e. {g.ref:#x}")
            self.deferred.append(g)
        else:
            self.used[g.slot] = 0

    def reap(self) -> None:
        for g in list(self.deferred):
            if not g.mapped:
                self.deferred.remove(g)
                self.used[g.slot] = 0
                self.log.append(f"freeing g.e. {g.ref:#x}")

    def lookup(self, domid: int, ref: int) -> Gref | None:
        if domid not in self.known_domids:
            return None
        g = self.grefs.get(ref)
        if g is None:
            g = next((d for d in self.deferred if d.ref == ref), None)
        return g if g is not None and g.domid == self.domid else None

    def missing_status(self, ref: int) -> int:
        """Xen's copy status for a ref not granted to us: past the table, or bad flags."""
        return abi.GNTST_bad_gntref if ref >= self.nr_entries else abi.GNTST_general_error

    def outstanding(self) -> dict[str, int]:
        """What is still allocated: grefs, deferred pages, pages in use."""
        return {
            "grefs": len(self.grefs),
            "deferred": len(self.deferred),
            "pages": sum(self.used),
            "gref_size": self.gref_size,
        }

    # ------------------------------------------------------------ evtchn
    def new_port(self, peer: int | None) -> int:
        p = self.next_port
        self.next_port += 1
        self.peer[p] = peer
        return p

    def send(self, port: int) -> None:
        peer = self.peer.get(port)
        if peer is not None:
            self.pending.append(peer)

    def close(self) -> None:
        os.close(self.fd)


class _Dev:
    path = "/dev/xen/fake"

    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel
        self.closed = False
        self.calls: list[str] = []

    def _check(self, request: int, arg: Any, cls: type, number: int, name: str) -> None:
        assert request == number, f"{name}: request {request:#x} != {number:#x}"
        assert isinstance(arg, cls), f"{name}: argument {type(arg).__name__}"
        self.calls.append(name)

    def fileno(self) -> int:
        return -1

    def read(self, size: int) -> bytes:
        raise _err(errno.EINVAL)

    def write(self, data: bytes) -> int:
        raise _err(errno.EINVAL)

    def close(self) -> None:
        self.closed = True


class _AllocVma(mmap.mmap):
    """A gntalloc mapping: munmap drops the grefs' vma count."""

    grefs: list[Gref]
    kernel: FakeKernel

    def close(self) -> None:
        if not self.closed:
            super().close()  # BufferError first, while exported
            for g in self.grefs:
                g.vmas -= 1
                self.kernel.maybe_free(g)


class FakeGntalloc(_Dev):
    path = "/dev/xen/gntalloc"

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel)
        self.files: dict[int, list[Gref]] = {}
        self.next_index = 0

    def ioctl(self, request: int, arg: Any) -> int:
        k = self.k
        if isinstance(arg, abi.ioctl_gntalloc_alloc_gref):
            self._check(request, arg, type(arg), abi.IOCTL_GNTALLOC_ALLOC_GREF, "ALLOC_GREF")
            n = arg.count
            if k.gref_size + n > k.limit:
                raise _err(errno.ENOSPC)
            start = k.alloc_slots(n) if n else 0
            refs = []
            for i in range(n):
                g = Gref(k.next_ref, start + i, arg.domid, bool(arg.flags & 1))
                k.next_ref += 1
                k.grefs[g.ref] = g
                refs.append(g)
            k.gref_size += n
            arg.index = self.next_index
            self.next_index += max(n, 1) * P
            self.files[arg.index] = refs
            struct.pack_into(f"={n}I", arg, _ALLOC_IDS, *[g.ref for g in refs])
            return 0
        if isinstance(arg, abi.ioctl_gntalloc_dealloc_gref):
            self._check(request, arg, type(arg), abi.IOCTL_GNTALLOC_DEALLOC_GREF, "DEALLOC_GREF")
            refs = self.files.pop(arg.index, None)
            if refs is None or len(refs) != arg.count:
                raise _err(errno.EINVAL)
            for g in refs:
                g.file_held = False
                k.maybe_free(g)
            return 0
        if isinstance(arg, abi.ioctl_gntalloc_unmap_notify):
            self._check(
                request, arg, type(arg), abi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, "SET_UNMAP_NOTIFY"
            )
            base, off = arg.index & ~(P - 1), arg.index & (P - 1)
            for index, refs in self.files.items():
                if index <= base < index + len(refs) * P:
                    g = refs[(base - index) // P]
                    g.notify = (arg.action, off, arg.event_channel_port)
                    return 0
            raise _err(errno.ENOENT)
        raise _err(errno.ENOTTY)

    def mmap(self, length: int, writable: bool, offset: int) -> Any:
        refs = self.files.get(offset)
        if refs is None or length != len(refs) * P:
            raise _err(errno.EINVAL)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        vma = _AllocVma(self.k.fd, length, mmap.MAP_SHARED, prot, offset=refs[0].slot * P)
        vma.grefs, vma.kernel = list(refs), self.k
        for g in refs:
            g.vmas += 1
        return vma


@dataclass
class _Map:
    grants: list[tuple[int, int]]
    held: list[Gref] = field(default_factory=list)
    mapped: bool = False
    address: int = 0
    notify: tuple[int, int, int] | None = None


class FakeGntdev(_Dev):
    path = "/dev/xen/gntdev"

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel)
        self.maps: dict[int, _Map] = {}
        self.next_index = 0

    def ioctl(self, request: int, arg: Any) -> int:
        k = self.k
        if isinstance(arg, abi.ioctl_gntdev_map_grant_ref):
            self._check(request, arg, type(arg), abi.IOCTL_GNTDEV_MAP_GRANT_REF, "MAP_GRANT_REF")
            if not arg.count:
                raise _err(errno.EINVAL)
            arg.index = self.next_index
            self.next_index += arg.count * P
            flat = struct.unpack_from(f"={2 * arg.count}I", arg, _MAP_REFS)
            self.maps[arg.index] = _Map(list(zip(flat[::2], flat[1::2])))
            return 0
        if isinstance(arg, abi.ioctl_gntdev_unmap_grant_ref):
            self._check(
                request, arg, type(arg), abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, "UNMAP_GRANT_REF"
            )
            m = self.maps.get(arg.index)
            if m is None or len(m.grants) != arg.count:
                raise _err(errno.ENOENT)
            del self.maps[arg.index]
            if m.notify is not None and m.held:
                action, off, port = m.notify
                if action & abi.UNMAP_NOTIFY_CLEAR_BYTE:
                    k.write(m.held[off // P], off % P, b"\0")
                if action & abi.UNMAP_NOTIFY_SEND_EVENT:
                    k.send(port)
            for g in m.held:
                g.mapped -= 1
            k.reap()
            return 0
        if isinstance(arg, abi.ioctl_gntdev_unmap_notify):
            self._check(
                request, arg, type(arg), abi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, "SET_UNMAP_NOTIFY"
            )
            for index, m in self.maps.items():
                if index <= arg.index < index + len(m.grants) * P:
                    if arg.action & abi.UNMAP_NOTIFY_CLEAR_BYTE and m.held and not m.mapped:
                        raise _err(errno.EINVAL)
                    if arg.action & abi.UNMAP_NOTIFY_SEND_EVENT and (
                        arg.event_channel_port not in k.peer
                    ):
                        raise _err(errno.EINVAL)
                    m.notify = (arg.action, arg.index - index, arg.event_channel_port)
                    return 0
            raise _err(errno.ENOENT)
        if isinstance(arg, abi.ioctl_gntdev_get_offset_for_vaddr):
            self._check(
                request,
                arg,
                type(arg),
                abi.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR,
                "GET_OFFSET_FOR_VADDR",
            )
            for index, m in self.maps.items():
                if m.address and m.address == arg.vaddr:
                    arg.offset, arg.count = index, len(m.grants)
                    return 0
            raise _err(errno.EINVAL)
        if isinstance(arg, abi.ioctl_gntdev_grant_copy):
            self._check(request, arg, type(arg), abi.IOCTL_GNTDEV_GRANT_COPY, "GRANT_COPY")
            return self._copy(arg)
        raise _err(errno.ENOTTY)

    def mmap(self, length: int, writable: bool, offset: int) -> Any:
        k = self.k
        m = self.maps.get(offset)
        if m is None or length != len(m.grants) * P or m.held:
            raise _err(errno.EINVAL)
        held = []
        for domid, ref in m.grants:
            g = k.lookup(domid, ref)
            if g is None or (writable and not g.writable):
                raise _err(errno.EINVAL)
            held.append(g)
        for g in held:
            g.mapped += 1
        m.held, m.mapped = held, writable
        view = _cext.vmap(k.fd, [g.slot for g in held], not writable)
        if writable:
            c = ctypes.c_char.from_buffer(view)
            m.address = ctypes.addressof(c)
            del c
        return view

    def _copy_gref(self, f: Any) -> tuple[Any, int]:
        """A copy segment's grant ``(domid, ref)``: the grant (or None) and its status."""
        k = self.k
        g = k.lookup(f.domid, f.ref)
        if f.domid not in k.known_domids:
            return g, abi.GNTST_bad_domain
        if g is None:
            return g, k.missing_status(f.ref)
        return g, abi.GNTST_okay

    def _copy(self, arg: Any) -> int:
        k = self.k
        segs = [arg.segments[i] for i in range(arg.count)]
        for s in segs:
            if not s.flags & (abi.GNTCOPY_source_gref | abi.GNTCOPY_dest_gref):
                raise _err(errno.EINVAL)
            if s.flags & abi.GNTCOPY_source_gref and s.source.foreign.offset + s.len > P:
                raise _err(errno.EINVAL)
            if s.flags & abi.GNTCOPY_dest_gref and s.dest.foreign.offset + s.len > P:
                raise _err(errno.EINVAL)
        for s in segs:
            src = dst = None
            st = abi.GNTST_okay
            if s.flags & abi.GNTCOPY_source_gref:
                src, st = self._copy_gref(s.source.foreign)
            if st == abi.GNTST_okay and s.flags & abi.GNTCOPY_dest_gref:
                dst, st = self._copy_gref(s.dest.foreign)
                if st == abi.GNTST_okay and not dst.writable:
                    st = abi.GNTST_general_error
            s.status = st
            if st != abi.GNTST_okay:
                continue
            data = (
                k.read(src, s.source.foreign.offset, s.len)
                if src is not None
                else ctypes.string_at(s.source.virt, s.len)
            )
            if dst is not None:
                k.write(dst, s.dest.foreign.offset, data)
            else:
                ctypes.memmove(s.dest.virt, data, s.len)
        return 0


class FakeEvtchn(_Dev):
    path = "/dev/xen/evtchn"

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel)
        self.efd = compat.eventfd(0, compat.EFD_NONBLOCK)

    def ioctl(self, request: int, arg: Any) -> int:
        k = self.k
        if isinstance(arg, abi.ioctl_evtchn_bind_unbound_port):
            self._check(request, arg, type(arg), abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT, "UNBOUND")
            return k.new_port(None)
        if isinstance(arg, abi.ioctl_evtchn_bind_interdomain):
            self._check(request, arg, type(arg), abi.IOCTL_EVTCHN_BIND_INTERDOMAIN, "INTERDOMAIN")
            if arg.remote_port not in k.peer:
                raise _err(errno.EINVAL)
            p = k.new_port(arg.remote_port)
            k.peer[arg.remote_port] = p
            k.pending.append(p)  # Xen sets the new local port pending
            self._kick()
            return p
        if isinstance(arg, abi.ioctl_evtchn_notify):
            self._check(request, arg, type(arg), abi.IOCTL_EVTCHN_NOTIFY, "NOTIFY")
            k.send(arg.port)
            self._kick()
            return 0
        if isinstance(arg, abi.ioctl_evtchn_unbind):
            self._check(request, arg, type(arg), abi.IOCTL_EVTCHN_UNBIND, "UNBIND")
            k.peer.pop(arg.port, None)
            return 0
        raise _err(errno.ENOTTY)

    def _kick(self) -> None:
        if self.k.pending:
            compat.eventfd_write(self.efd, 1)

    def fileno(self) -> int:
        self._kick()
        return self.efd

    def read(self, size: int) -> bytes:
        try:
            compat.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        if not self.k.pending:
            raise _err(errno.EAGAIN)
        out, self.k.pending = self.k.pending[: size // 4], self.k.pending[size // 4 :]
        return b"".join(struct.pack("=I", p) for p in out)

    def write(self, data: bytes) -> int:
        return len(data)

    def mmap(self, length: int, writable: bool, offset: int) -> Any:
        raise _err(errno.ENODEV)

    def close(self) -> None:
        super().close()
        os.close(self.efd)
