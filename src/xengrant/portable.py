"""The portable layer: what userspace can do on any Xen, emulated or real.

On a real Xen host userspace has no grant table of its own: Linux's
/dev/xen/gntalloc shares pages (libxengntshr) and /dev/xen/gntdev maps and
copies grants (libxengnttab).  These two interfaces are that surface, and code
written against them runs unchanged on the embedded emulator, on an emulator
in another process, or on real Xen:

- :class:`Gntshr` -- ``share_pages(domid, count, writable) -> Share``,
  ``unshare(share)`` (never blocks: a page the peer still maps is released
  when it unmaps, as gntalloc defers the end of access).
- :class:`Gnttab` -- ``map_grant_ref``, ``map_grant_refs`` (contiguous, from
  one or several domains), ``map_domain_grant_refs``, ``unmap``,
  ``grant_copy``.

:class:`EmulatedGntshr` and :class:`EmulatedGnttab` implement them for an
emulated :class:`~xengrant.guest.domain.Domain`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union

from .abi import grant_table as gt
from .guest.share import Mapping, Share

if TYPE_CHECKING:
    from .guest.domain import Domain


@dataclass
class GrantRef:
    """One side of a copy named by grant: ``ref`` of ``domid``, from ``offset``."""

    domid: int
    ref: int
    offset: int = 0


#: A local side of a copy: any buffer (source) or writable buffer (dest).
Local = Union[bytes, bytearray, memoryview]


@dataclass
class CopySegment:
    """One ``grant_copy`` segment (libxengnttab ``xengnttab_grant_copy_segment_t``).

    Exactly one side should be a :class:`GrantRef` (gntdev refuses copies
    with no grant side); ``status`` is set to the op's ``GNTST_*`` code.
    """

    source: GrantRef | Local
    dest: GrantRef | Local
    len: int
    status: int = gt.GNTST_okay


def _fill_copy_ptr(ptr: gt.gnttab_copy_ptr, side: GrantRef | Local, bounce_gfn: int) -> None:
    """One side of a ``gnttab_copy``: the grant, or the bounce page as a DOMID_SELF gmfn."""
    if isinstance(side, GrantRef):
        ptr.u.ref, ptr.domid, ptr.offset = side.ref, side.domid, side.offset
    else:
        ptr.u.gmfn, ptr.domid, ptr.offset = bounce_gfn, gt.DOMID_SELF, 0


class Gntshr(Protocol):
    """Share pages with another domain (libxengntshr)."""

    def share_pages(self, domid: int, count: int, writable: bool = True) -> Share: ...

    def unshare(self, share: Share) -> None: ...


class Gnttab(Protocol):
    """Map and copy other domains' grants (libxengnttab)."""

    def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> Mapping: ...

    def map_grant_refs(
        self, grants: Sequence[tuple[int, int]], writable: bool = True
    ) -> Mapping: ...

    def map_domain_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> Mapping: ...

    def unmap(self, mapping: Mapping) -> None: ...

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]: ...


class _UnmapNotify:
    """gntalloc's / gntdev's unmap notification on an emulated domain: clear a byte
    of the page and/or send an event on a port of the domain's ``evtchn``, once,
    just before the share or mapping goes (``UNMAP_NOTIFY_CLEAR_BYTE``,
    ``UNMAP_NOTIFY_SEND_EVENT``: gntalloc's ``__del_gref``, gntdev's
    ``unmap_grant_pages``) -- including when it is dropped unreleased."""

    def __init__(self, inner: Any, domain: Domain, offset: int, port: int) -> None:
        self.inner, self.domain, self.offset, self.port = inner, domain, offset, port
        self.fired = False

    def _fire(self, mem: memoryview) -> None:
        if self.fired:
            return
        self.fired = True
        if self.offset >= 0:
            with contextlib.suppress(ValueError):  # mem released already: nothing to clear
                mem[self.offset] = 0
        if self.port >= 0:
            with contextlib.suppress(Exception):  # the port went first: nothing to tell
                self.domain.evtchn.notify(self.port)  # type: ignore[attr-defined]

    # ShareOwner
    def _try_unshare(self, share: Share, release_refs: bool) -> None:
        self._fire(share.mem)
        self.inner._try_unshare(share, release_refs)

    def _abandon_share(self, share: Share) -> None:
        self._fire(share.mem)
        self.inner._abandon_share(share)

    # MappingOwner
    def _unmap(self, mapping: Mapping) -> None:
        self._fire(mapping.mem)
        self.inner._unmap(mapping)


def _check_notify(op: str, offset: int, port: int, domain: Domain) -> None:
    if not -1 <= offset < 4096:
        raise ValueError(f"{op}: notify offset {offset} is outside the page")
    if port >= 0 and getattr(domain, "evtchn", None) is None:
        raise ValueError(f"{op}: d{domain.domid} has no event channels to notify on")


class EmulatedGntshr:
    """:class:`Gntshr` for an emulated domain (its grant table does the work)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def share_page_notify(
        self, domid: int, writable: bool = True, notify_offset: int = -1, notify_port: int = -1
    ) -> Share:
        """``xengntshr_share_page_notify``: one page; when it is unshared (or dropped)
        the byte at ``notify_offset`` is cleared and/or an event sent on
        ``notify_port`` (a port of this domain's ``evtchn``; -1: none).

        Raises:
            ValueError: an offset outside the page, or a port on a domain
                without event channels.
            GrantTableFull, MemoryError: see ``GrantTable.share_pages``.
        """
        _check_notify("share_page_notify", notify_offset, notify_port, self.domain)
        share = self.share_pages(domid, 1, writable)
        if notify_offset >= 0 or notify_port >= 0:
            share._owner = _UnmapNotify(share._owner, self.domain, notify_offset, notify_port)
        return share

    def share_pages(self, domid: int, count: int, writable: bool = True) -> Share:
        """Share ``count`` new zeroed pages with ``domid``.

        Raises:
            GrantTableFull, MemoryError, ValueError: see ``GrantTable.share_pages``.
        """
        return self.domain.grant_table.share_pages(domid, count, writable)

    def unshare(self, share: Share) -> None:
        """Stop sharing; pages the peer still maps are freed when it unmaps.

        Raises:
            BufferError: views of ``share.mem`` are still alive.
        """
        if share.released:
            return
        owner = share._owner
        if isinstance(owner, _UnmapNotify):
            owner._fire(share.mem)
        share._release_memory()
        # gntalloc's DEALLOC_GREF: end access now, or when the peer unmaps.
        self.domain.grant_table._abandon_share(share)


class EmulatedGnttab:
    """:class:`Gnttab` for an emulated domain."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._bounce: Any = None

    def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> Mapping:
        """Map one grant.

        Raises:
            GrantError: with Xen's GNTST code.
        """
        return self.domain.grant_table.map_grants([(domid, ref)], writable)

    def map_grant_refs(self, grants: Sequence[tuple[int, int]], writable: bool = True) -> Mapping:
        """Map ``(domid, ref)`` pairs into one contiguous buffer, all or nothing.

        Raises:
            BatchError: some failed (each entry's status); none stays mapped.
        """
        return self.domain.grant_table.map_grants(grants, writable)

    def map_domain_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> Mapping:
        """Map several grants of one domain contiguously."""
        return self.domain.grant_table.map_domain_refs(domid, refs, writable)

    def unmap(self, mapping: Mapping) -> None:
        """Unmap (same as ``mapping.unmap()``)."""
        mapping.unmap()

    def map_grant_ref_notify(
        self,
        domid: int,
        ref: int,
        notify_offset: int = -1,
        notify_port: int = -1,
        writable: bool = True,
    ) -> Mapping:
        """``xengnttab_map_grant_ref_notify``: map one grant; when it is unmapped (or
        dropped) the byte at ``notify_offset`` is cleared and/or an event sent on
        ``notify_port`` (a port of this domain's ``evtchn``; -1: none).

        Raises:
            ValueError: an offset outside the page, a byte to clear in a
                read-only mapping (gntdev's EINVAL), or a port on a domain
                without event channels.
            GrantError: the map failed.
        """
        _check_notify("map_grant_ref_notify", notify_offset, notify_port, self.domain)
        if notify_offset >= 0 and not writable:
            raise ValueError("map_grant_ref_notify: no byte to clear in a read-only mapping")
        mapping = self.map_grant_ref(domid, ref, writable)
        if notify_offset >= 0 or notify_port >= 0:
            mapping._owner = _UnmapNotify(mapping._owner, self.domain, notify_offset,
                                          notify_port)
        return mapping

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between grants and local buffers; each segment gets its status.

        Local sides go through a bounce page of this domain's RAM (the
        emulator can only copy between frames).

        Returns:
            The statuses, also stored in each segment.

        Raises:
            ValueError: a segment with no grant side or longer than a page.
        """
        domain = self.domain
        if self._bounce is None:
            self._bounce = domain.alloc_pages(1)
        bounce = self._bounce
        gfn = bounce.gfns[0]
        out = []
        for seg in segments:
            if not 0 <= seg.len <= 4096:
                raise ValueError(f"grant_copy: len {seg.len} is not within a page")
            src_g = isinstance(seg.source, GrantRef)
            dst_g = isinstance(seg.dest, GrantRef)
            if not (src_g or dst_g):
                raise ValueError("grant_copy: at least one side must be a GrantRef")
            op = (gt.gnttab_copy * 1)()
            o = op[0]
            o.len = seg.len
            if src_g:
                o.flags |= gt.GNTCOPY_source_gref
            else:
                data = memoryview(seg.source).cast("B")[: seg.len]  # type: ignore[arg-type]
                bounce.mem[: seg.len] = data
            if dst_g:
                o.flags |= gt.GNTCOPY_dest_gref
            _fill_copy_ptr(o.source, seg.source, gfn)
            _fill_copy_ptr(o.dest, seg.dest, gfn)
            domain.grant_table.copy(op, 1)  # gntdev: gnttab_batch_copy, eagain retried
            seg.status = int(o.status)
            if seg.status == gt.GNTST_okay and not dst_g:
                dest = memoryview(seg.dest).cast("B")  # type: ignore[arg-type]
                dest[: seg.len] = bounce.mem[: seg.len]
            out.append(seg.status)
        return out

    def close(self) -> None:
        """Free the bounce page."""
        if self._bounce is not None:
            self._bounce.free()
            self._bounce = None
