"""Map and copy foreign grants through Linux's ``/dev/xen/gntdev`` (libxengnttab's way).

:class:`LinuxGnttab` is the portable :class:`~xengrant.portable.Gnttab` on a
real Xen host, doing what ``osdep_gnttab_grant_map`` and friends do in
libxengnttab (tools/libs/gnttab/linux.c):

- map: ``IOCTL_GNTDEV_MAP_GRANT_REF`` with the ``(domid, ref)`` pairs only
  records them and returns an ``index``; the grant map hypercall happens at
  ``mmap`` of ``count`` pages at ``index`` (read-only when the mmap is not
  ``PROT_WRITE``: gntdev then adds ``GNTMAP_readonly``).  The pages of one
  mapping are contiguous whatever domains they come from.
- unmap: ``munmap`` (gntdev unmaps the grants, firing any unmap notify),
  then ``IOCTL_GNTDEV_UNMAP_GRANT_REF`` to release the index.
- copy: ``IOCTL_GNTDEV_GRANT_COPY`` (``GNTTABOP_copy`` in batches; each
  segment gets Xen's own ``GNTST_*`` status).
- notify: ``IOCTL_GNTDEV_SET_UNMAP_NOTIFY`` clears a byte of the mapping
  and/or signals an event channel when the mapping goes.

What can and cannot be told apart (gntdev's ``gntdev_mmap`` ->
``gntdev_map_grant_pages`` returns ``-EINVAL`` for any page whose map op
failed, and for a writable mmap of a read-only grant): every map failure is
one ``EINVAL`` from ``mmap``.  With ``diagnose=True`` (the default) the
backend then finds which grants failed and why, on the failure path only:

- several grants: each is mapped again alone; those that map are
  ``GNTST_okay`` (and unmapped at once);
- each failing grant: a one-byte ``GNTTABOP_copy`` reading it gives Xen's
  own status for that grant (``GNTST_bad_gntref`` for a bad or out-of-range
  ref, ``GNTST_bad_domain`` for an unknown domain, ``GNTST_general_error`` for
  an entry not granted to us); if that read succeeds the map failed for a
  reason a read cannot see (a writable map of a read-only grant, maptrack
  exhaustion): ``GNTST_general_error``.

The error is a :class:`~.errors.LinuxGrantError` (one grant) or
:class:`~.errors.LinuxBatchError` (several), the emulator's types, with
``errno`` ``EINVAL`` and ``linux`` saying so.  docs/real-xen.md compares the
codes with the emulator's.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import struct
from collections.abc import Sequence

from ..abi import gntdev as gd
from ..abi import grant_table as gt
from ..errors import GrantError
from ..guest.share import Mapping
from ..portable import CopySegment, GrantRef
from ._device import PAGE_SIZE, Device, OsDevice
from ._log import logger, ratelimited
from ._ops import map_request
from .errors import LinuxBatchError, LinuxGrantError, describe, from_oserror

GNTDEV_PATH = "/dev/xen/gntdev"

#: segments per IOCTL_GNTDEV_GRANT_COPY call (gntdev batches 16 per hypercall itself)
COPY_CHUNK = 1024


class LinuxGnttab:
    """:class:`~xengrant.portable.Gnttab` over ``/dev/xen/gntdev``.

    Args:
        path: the device node.
        device: an already open :class:`~._device.Device` (tests pass a fake).
        diagnose: after a failed map, find the status of each grant (see the
            module docstring); False reports ``GNTST_general_error`` for all.

    Raises:
        OSError: the device cannot be opened.
    """

    def __init__(
        self, path: str = GNTDEV_PATH, *, device: Device | None = None, diagnose: bool = True
    ) -> None:
        self.dev: Device = device if device is not None else OsDevice(path)
        self.path = path
        self.diagnose = diagnose
        self.closed = False
        #: mappings not yet unmapped, by index
        self.live: dict[int, Mapping] = {}

    def __repr__(self) -> str:
        return f"<LinuxGnttab {self.path} {len(self.live)} mapping(s)>"

    def __enter__(self) -> LinuxGnttab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the device.

        Live mappings stay usable until their ``unmap`` (each mmap holds the
        file); gntdev frees everything once the last one is unmapped.
        """
        if not self.closed:
            self.closed = True
            if self.live:
                logger.debug("%s closed with %d mapping(s) live: gntdev frees them as they "
                             "are unmapped", self.path, len(self.live))
            self.dev.close()

    # ------------------------------------------------------------ mapping
    def map_grant_ref(
        self,
        domid: int,
        ref: int,
        writable: bool = True,
        *,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> Mapping:
        """Map one grant (``xengnttab_map_grant_ref``; ``_notify`` with the keywords).

        Raises:
            GrantError: the map failed (a :class:`LinuxGrantError`, ``errno``
                EINVAL, ``status`` as found by the diagnosis).
        """
        return self.map_grant_refs(
            [(domid, ref)], writable, notify_offset=notify_offset, notify_port=notify_port
        )

    def map_domain_grant_refs(
        self,
        domid: int,
        refs: Sequence[int],
        writable: bool = True,
        *,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> Mapping:
        """Map several grants of one domain contiguously (``xengnttab_map_domain_grant_refs``)."""
        return self.map_grant_refs(
            [(domid, r) for r in refs],
            writable,
            notify_offset=notify_offset,
            notify_port=notify_port,
        )

    def map_grant_refs(
        self,
        grants: Sequence[tuple[int, int]],
        writable: bool = True,
        *,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> Mapping:
        """Map ``(domid, ref)`` pairs into one contiguous buffer, all or nothing.

        Args:
            grants: the grants, in page order; any mix of domains.
            writable: map ``PROT_READ | PROT_WRITE`` (else read-only).
            notify_offset: byte of the mapping to clear when it is unmapped
                (needs a writable mapping).
            notify_port: local event-channel port to signal then.

        Returns:
            A :class:`~xengrant.Mapping` (``resource`` is the gntdev index).

        Raises:
            ValueError: no grants, or ``notify_offset`` outside the mapping.
            GrantError: one grant failed (:class:`LinuxGrantError`).
            BatchError: some of several failed (:class:`LinuxBatchError`,
                ``statuses`` per grant); nothing stays mapped.
            MemoryError: gntdev is out of memory (``ENOMEM``).
        """
        grants = [(int(d), int(r)) for d, r in grants]
        n = len(grants)
        if n == 0:
            raise ValueError("map_grant_refs: no grants to map")
        if notify_offset is not None and not 0 <= notify_offset < n * PAGE_SIZE:
            raise ValueError(f"map_grant_refs: notify_offset {notify_offset} is outside the map")
        index = self._reserve(grants)
        try:
            view = self.dev.mmap(n * PAGE_SIZE, writable, index)
        except OSError as e:
            self._release_index(index, n)
            raise self._map_error(grants, writable, e) from e
        mapping = Mapping(
            self, [d for d, _ in grants], [r for _, r in grants], writable, view, resource=index
        )
        self.live[index] = mapping
        if notify_offset is not None or notify_port is not None:
            try:
                self.set_unmap_notify(mapping, notify_offset, notify_port)
            except BaseException:
                mapping.unmap()
                raise
        return mapping

    def _reserve(self, grants: Sequence[tuple[int, int]]) -> int:
        op = map_request(grants)
        try:
            self.dev.ioctl(gd.IOCTL_GNTDEV_MAP_GRANT_REF, op)
        except OSError as e:
            err = e.errno or _errno.EIO
            if err == _errno.ENOMEM:
                ratelimited(logging.WARNING, ("gntdev", "enomem"),
                            "map_grant_refs of %d grant(s): gntdev is out of memory (ENOMEM)",
                            len(grants))
                raise MemoryError(
                    f"map_grant_refs: Linux: {describe('IOCTL_GNTDEV_MAP_GRANT_REF', err)}"
                ) from e
            linux = describe(f"IOCTL_GNTDEV_MAP_GRANT_REF of {len(grants)} grant(s)", err)
            raise self._error(grants, [gt.GNTST_general_error] * len(grants), err, linux) from e
        return int(op.index)

    def _release_index(self, index: int, count: int) -> None:
        op = gd.ioctl_gntdev_unmap_grant_ref(index=index, count=count)
        try:
            self.dev.ioctl(gd.IOCTL_GNTDEV_UNMAP_GRANT_REF, op)
        except OSError as e:
            ratelimited(logging.WARNING, ("gntdev", "release"),
                        "%s kept index %#x of %d page(s): %s", self.path, index, count,
                        describe("IOCTL_GNTDEV_UNMAP_GRANT_REF", e.errno or 0))
            raise LinuxGrantError(
                "unmap_grant_ref",
                gt.GNTST_bad_handle,
                e.errno or _errno.EIO,
                describe(f"IOCTL_GNTDEV_UNMAP_GRANT_REF of index {index:#x}", e.errno or 0),
            ) from e

    def _error(
        self, grants: Sequence[tuple[int, int]], statuses: Sequence[int], err: int, linux: str
    ) -> Exception:
        # gntdev's map failures are the granting domain's doing (a revoked or
        # bad grant): Xen's reasons at DEBUG, rate-limited (gdprintk in a
        # debug build's map_grant_ref)
        for (dom, ref), st in zip(grants, statuses):
            if st != gt.GNTST_okay:
                ratelimited(logging.DEBUG, ("map", st),
                            "map of d%d ref %d: %s (%d): Linux: %s", dom, ref,
                            gt.GNTST_NAMES.get(st, str(st)), st, linux)
        if len(grants) == 1:
            dom, ref = grants[0]
            return LinuxGrantError("map_grant_ref", statuses[0], err, linux, f"d{dom} ref {ref}")
        return LinuxBatchError("map_grant_refs", statuses, err, linux)

    def _map_error(
        self, grants: Sequence[tuple[int, int]], writable: bool, e: OSError
    ) -> Exception:
        err = e.errno or _errno.EIO
        if err == _errno.ENOMEM:
            ratelimited(logging.WARNING, ("gntdev", "enomem"),
                        "mmap of %d page(s) of %s: out of memory (ENOMEM)", len(grants), self.path)
            return MemoryError(f"map_grant_refs: Linux: {describe('mmap of ' + self.path, err)}")
        linux = describe(
            f"mmap of {self.path} ({'rw' if writable else 'ro'}, {len(grants)} page(s))", err
        )
        if err != _errno.EINVAL or not self.diagnose:
            return self._error(grants, [gt.GNTST_general_error] * len(grants), err, linux)
        return self._error(grants, self.diagnose_grants(grants, writable), err, linux)

    def diagnose_grants(self, grants: Sequence[tuple[int, int]], writable: bool) -> list[int]:
        """The status of each grant, as the module docstring describes.

        Used after a failed map.  A grant that maps alone is ``GNTST_okay``;
        a failing one gets the status of a one-byte ``GNTTABOP_copy``
        reading it, or ``GNTST_general_error`` if that read succeeds.
        """
        statuses = []
        for dom, ref in grants:
            if len(grants) > 1 and self._maps_alone(dom, ref, writable):
                statuses.append(gt.GNTST_okay)
                continue
            st = self._probe_copy(dom, ref)
            statuses.append(st if st != gt.GNTST_okay else gt.GNTST_general_error)
        return statuses

    def _maps_alone(self, dom: int, ref: int, writable: bool) -> bool:
        try:
            index = self._reserve([(dom, ref)])
        except (GrantError, MemoryError):
            return False
        try:
            view = self.dev.mmap(PAGE_SIZE, writable, index)
        except OSError:
            return False
        else:
            view.close()
            return True
        finally:
            self._release_index(index, 1)

    def _probe_copy(self, dom: int, ref: int) -> int:
        byte = bytearray(1)
        seg = CopySegment(GrantRef(dom, ref, 0), byte, 1)
        try:
            self._copy_chunk([seg], log=False)  # the map's failure is logged, not the probe's
            return seg.status
        except (OSError, GrantError, ValueError):
            return gt.GNTST_general_error

    def unmap(self, mapping: Mapping) -> None:
        """Unmap (``xengnttab_unmap``; same as ``mapping.unmap()``)."""
        mapping.unmap()

    def _unmap(self, mapping: Mapping) -> None:
        mapping._release_memory()  # munmap: gntdev unmaps the grants (and notifies)
        index: int = mapping.resource
        mapping.released = True
        self.live.pop(index, None)
        if not self.closed:  # after close, the munmap released the file's last map
            self._release_index(index, len(mapping.refs))

    def set_unmap_notify(
        self, mapping: Mapping, offset: int | None = None, port: int | None = None
    ) -> None:
        """Notify when ``mapping`` is unmapped (``IOCTL_GNTDEV_SET_UNMAP_NOTIFY``).

        Args:
            mapping: a live mapping of this device.
            offset: byte of the mapping to clear (``UNMAP_NOTIFY_CLEAR_BYTE``;
                the granter sees it become 0).
            port: local event-channel port (bound via ``/dev/xen/evtchn``) to
                signal (``UNMAP_NOTIFY_SEND_EVENT``).

        Raises:
            ValueError: neither given, or ``offset`` outside the mapping.
            GrantError: gntdev refused (EINVAL: clear byte on a read-only
                mapping, or a port not bound by evtchn; ENOENT: not mapped).
        """
        if offset is None and port is None:
            raise ValueError("set_unmap_notify: give offset and/or port")
        if mapping.released:
            raise ValueError("set_unmap_notify: the mapping is unmapped")
        if offset is not None and not 0 <= offset < len(mapping.refs) * PAGE_SIZE:
            raise ValueError(f"set_unmap_notify: offset {offset} is outside the mapping")
        op = gd.ioctl_gntdev_unmap_notify(index=int(mapping.resource) + (offset or 0))
        if offset is not None:
            op.action |= gd.UNMAP_NOTIFY_CLEAR_BYTE
        if port is not None:
            op.action |= gd.UNMAP_NOTIFY_SEND_EVENT
            op.event_channel_port = port
        try:
            self.dev.ioctl(gd.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, op)
        except OSError as e:
            ratelimited(logging.WARNING, ("gntdev", "notify"),
                        "no unmap notify for index %#x: %s", op.index,
                        describe("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", e.errno or 0))
            raise from_oserror(
                "set_unmap_notify", f"IOCTL_GNTDEV_SET_UNMAP_NOTIFY of {self.path}", e
            ) from e

    def offset_for_address(self, address: int) -> tuple[int, int]:
        """``IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR``: the index and page count of a mapping.

        Args:
            address: the start of a mapping made by this device.

        Returns:
            ``(offset, count)``: the mmap offset (index) and pages.

        Raises:
            GrantError: not the start of one of this device's mappings (EINVAL).
        """
        op = gd.ioctl_gntdev_get_offset_for_vaddr(vaddr=address)
        try:
            self.dev.ioctl(gd.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, op)
        except OSError as e:
            raise from_oserror(
                "get_offset_for_vaddr", f"IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR of {address:#x}", e
            ) from e
        return int(op.offset), int(op.count)

    # --------------------------------------------------------------- copy
    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between grants and local buffers (``xengnttab_grant_copy``).

        Local sides go through one bounce buffer.  A segment whose grant side
        crosses the end of its page gets ``GNTST_bad_copy_arg`` (Xen's code)
        without being sent: gntdev would refuse the whole ioctl with EINVAL.

        Returns:
            Each segment's ``GNTST_*`` status, also stored in the segment.

        Raises:
            ValueError: a segment with no grant side or longer than a page
                (the emulator's checks; gntdev says EINVAL to both).
            GrantError: gntdev refused the ioctl (a ``LinuxGrantError``).
        """
        for seg in segments:
            if not 0 <= seg.len <= PAGE_SIZE:
                raise ValueError(f"grant_copy: len {seg.len} is not within a page")
            if not (isinstance(seg.source, GrantRef) or isinstance(seg.dest, GrantRef)):
                raise ValueError("grant_copy: at least one side must be a GrantRef")
        for start in range(0, len(segments), COPY_CHUNK):
            self._copy_chunk(segments[start : start + COPY_CHUNK])
        return [seg.status for seg in segments]

    def _copy_chunk(self, segments: Sequence[CopySegment], log: bool = True) -> None:
        n = len(segments)
        bounce = ctypes.create_string_buffer(max(1, sum(s.len for s in segments)))
        bmem = memoryview(bounce).cast("B")
        base = ctypes.addressof(bounce)
        ops = (gd.gntdev_grant_copy_segment * n)()
        sent: list[tuple[int, CopySegment, int]] = []  # (op slot, segment, bounce offset)
        pos = 0
        for seg in segments:
            src, dst, length = seg.source, seg.dest, seg.len
            src_g, dst_g = isinstance(src, GrantRef), isinstance(dst, GrantRef)
            if (src_g and src.offset + length > PAGE_SIZE) or (  # type: ignore[union-attr]
                dst_g and dst.offset + length > PAGE_SIZE  # type: ignore[union-attr]
            ):
                seg.status = gt.GNTST_bad_copy_arg
                continue
            at = len(sent) * _SEG_SIZE
            flags = 0
            if src_g:
                _FOREIGN.pack_into(ops, at + _SEG_SRC, src.ref, src.offset, src.domid)  # type: ignore[union-attr]
                flags |= gt.GNTCOPY_source_gref
            else:
                bmem[pos : pos + length] = memoryview(src).cast("B")[:length]  # type: ignore[arg-type]
                _VIRT.pack_into(ops, at + _SEG_SRC, base + pos)
            if dst_g:
                _FOREIGN.pack_into(ops, at + _SEG_DST, dst.ref, dst.offset, dst.domid)  # type: ignore[union-attr]
                flags |= gt.GNTCOPY_dest_gref
            else:
                _VIRT.pack_into(ops, at + _SEG_DST, base + pos)
            _TAIL.pack_into(ops, at + _SEG_LEN, length, flags, gt.GNTST_general_error)
            sent.append((at, seg, pos))
            pos += length
        if not sent:
            return
        arg = gd.ioctl_gntdev_grant_copy(count=len(sent), segments=ops)
        try:
            self.dev.ioctl(gd.IOCTL_GNTDEV_GRANT_COPY, arg)
        except OSError as e:
            if log:
                ratelimited(logging.WARNING, ("gntdev", "copy"),
                            "grant_copy of %d segment(s): %s", len(sent),
                            describe("IOCTL_GNTDEV_GRANT_COPY", e.errno or 0))
            raise from_oserror("grant_copy", f"IOCTL_GNTDEV_GRANT_COPY of {self.path}", e) from e
        for at, seg, off in sent:
            (seg.status,) = _STATUS.unpack_from(ops, at + _SEG_STATUS)
            if seg.status != gt.GNTST_okay and log:  # the peer's grant: Xen's reason at DEBUG
                g = seg.source if isinstance(seg.source, GrantRef) else seg.dest
                assert isinstance(g, GrantRef)
                ratelimited(logging.DEBUG, ("copy", seg.status),
                            "grant_copy with d%d ref %d: %s (%d)", g.domid, g.ref,
                            gt.GNTST_NAMES.get(seg.status, str(seg.status)), seg.status)
            if seg.status == gt.GNTST_okay and not isinstance(seg.dest, GrantRef):
                memoryview(seg.dest).cast("B")[: seg.len] = bmem[off : off + seg.len]


# gntdev_grant_copy_segment, packed with struct at the abi offsets (the copy hot path)
_SEG = gd.gntdev_grant_copy_segment
_SEG_SIZE = ctypes.sizeof(_SEG)
_SEG_SRC, _SEG_DST = _SEG.source.offset, _SEG.dest.offset
_SEG_LEN, _SEG_STATUS = _SEG.len.offset, _SEG.status.offset
_FOREIGN = struct.Struct("=IHH")  # grant_ref_t ref; uint16_t offset; domid_t domid
_VIRT = struct.Struct("=Q")  # void *virt
_TAIL = struct.Struct("=HHh")  # uint16_t len, flags; int16_t status
_STATUS = struct.Struct("=h")
assert _SEG.len.offset + 2 == _SEG.flags.offset and _SEG.flags.offset + 2 == _SEG_STATUS
assert _FOREIGN.size == ctypes.sizeof(gd._grant_copy_foreign)
