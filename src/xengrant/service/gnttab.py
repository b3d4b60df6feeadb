"""The portable grant API of a domain in the service: gntdev and gntalloc's calls.

:class:`RemoteGnttab` (``xengnttab_*``) and :class:`RemoteGntshr`
(``xengntshr_*``) over :class:`~xengrant.service.hypercalls.RemoteHypercalls`:
one-page maps and their unmaps on the request ring, posted unmaps, one
message per batch, unmap notifications.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from .. import _cext
from ..abi import grant_table as gt
from ..abi.gntalloc import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from ..emu.domain import P2M_GRANT_MAP_RW
from ..errors import BatchError, HypercallError, XenError
from ..guest.domain import Domain
from ..guest.gnttab import map_ops_at_holes
from ..guest.ops import map_results, pack_map_ops, pack_unmap_ops, unmap_statuses
from ..guest.share import Mapping, Share
from ..hypercall import check_rc
from ..portable import CopySegment, EmulatedGntshr, EmulatedGnttab, GrantRef
from . import protocol as p
from .hypercalls import PAGE_SIZE, RemoteHypercalls


class _NotifyingShareOwner:
    """A share's owner that fires its gntalloc unmap notification first."""

    def __init__(self, inner: Any, gntshr: RemoteGntshr, ref: int) -> None:
        self.inner = inner
        self.gntshr = gntshr
        self.ref = ref

    def _fire(self) -> None:
        if self.ref >= 0:
            ref, self.ref = self.ref, -1
            self.gntshr._fire_notify(ref)

    def _try_unshare(self, share: Share, release_refs: bool) -> None:
        self._fire()
        self.inner._try_unshare(share, release_refs)

    def _abandon_share(self, share: Share) -> None:
        with contextlib.suppress(Exception):
            self._fire()
        self.inner._abandon_share(share)


class RemoteGntshr(EmulatedGntshr):
    """:class:`~xengrant.portable.Gntshr` plus gntalloc's unmap notification."""

    def share_page_notify(
        self, domid: int, writable: bool = True, notify_offset: int = -1, notify_port: int = -1
    ) -> Share:
        """``xengntshr_share_page_notify``: one page; when it is unshared (or this
        process dies) the byte at ``notify_offset`` is cleared and/or an event
        sent on ``notify_port`` (-1: none).

        Raises:
            HypercallError: EINVAL (bad offset or unbound port); nothing stays shared.
        """
        share = self.share_pages(domid, 1, writable)
        action = (UNMAP_NOTIFY_CLEAR_BYTE if notify_offset >= 0 else 0) | (
            UNMAP_NOTIFY_SEND_EVENT if notify_port >= 0 else 0
        )
        if action:
            try:
                self._set(share.refs[0], max(notify_offset, 0), action, max(notify_port, 0))
            except BaseException:
                self.unshare(share)
                raise
            share._owner = _NotifyingShareOwner(share._owner, self, share.refs[0])
        return share

    def _set(self, ref: int, offset: int, action: int, port: int) -> None:
        if not 0 <= offset < PAGE_SIZE:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"offset {offset}")
        hc = self.domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        hc.channel.call_ok(
            p.MSG_UNMAP_NOTIFY_SET,
            p.NOTIFY_SET_REQ.pack(p.NOTIFY_GNTALLOC, ref, offset, action, port),
            "set_unmap_notify",
        )

    def _fire_notify(self, ref: int) -> None:
        hc = self.domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        hc.channel.call_ok(
            p.MSG_UNMAP_NOTIFY_FIRE, p.NOTIFY_FIRE_REQ.pack(p.NOTIFY_GNTALLOC, ref), "unmap_notify"
        )

    def unshare(self, share: Share) -> None:
        """Stop sharing (firing the page's unmap notification first, if any)."""
        owner = share._owner
        if isinstance(owner, _NotifyingShareOwner):
            owner._fire()
            share._owner = owner.inner
        super().unshare(share)


class RemoteGnttab(EmulatedGnttab):
    """:class:`~xengrant.portable.Gnttab` with posted unmaps, one-message copies and
    gntdev's unmap notify.

    Mapping and unmapping work as gntdev's ``IOCTL_GNTDEV_MAP_GRANT_REF`` +
    ``mmap`` and ``munmap``: one ``GNTTABOP_map_grant_ref`` for the whole
    batch, all or nothing.  :meth:`Mapping.unmap` of a mapping made here
    *posts* its ``GNTTABOP_unmap_grant_ref`` (see :meth:`_unmap`): it returns
    without waiting for the service, as ``xengnttab_unmap`` reports only
    ``munmap``'s result on Linux.
    """

    #: largest number of segments copied in one hypercall (bounce pages kept)
    COPY_BATCH = 256

    def __init__(self, domain: Domain) -> None:
        super().__init__(domain)
        self._bounces: Any = None
        hc = domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        self._hc = hc

    # ------------------------------------------------------------ mapping
    def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> Mapping:
        """Map one grant.

        Raises:
            GrantError: with Xen's GNTST code.
            ValueError: a domid or ref that does not fit the op.
        """
        return self._map([domid], [ref], writable)

    def map_grant_refs(self, grants: Sequence[tuple[int, int]], writable: bool = True) -> Mapping:
        """Map ``(domid, ref)`` pairs into one contiguous buffer, all or nothing.

        Raises:
            GrantError: a single grant failed (its GNTST code).
            BatchError: some of several failed (each entry's status); none stays mapped.
            ValueError: no grants, or one that does not fit the op.
        """
        return self._map([d for d, _ in grants], [r for _, r in grants], writable)

    def map_domain_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> Mapping:
        """Map several grants of one domain contiguously, all or nothing.

        Raises:
            GrantError, BatchError, ValueError: as :meth:`map_grant_refs`.
        """
        return self._map([domid] * len(refs), list(refs), writable)

    def _map(self, domids: list[int], refs: list[int], writable: bool) -> Mapping:
        """One ``GNTTABOP_map_grant_ref`` over fresh holes, then a view of them.

        As gntdev's ``gntdev_map_grant_pages``: if any op fails, the others
        are unmapped again and the holes given back (``GrantTable.map_grants``
        has the same contract, and packs its ops with the same
        :func:`~xengrant.guest.gnttab.map_ops_at_holes`).  One grant goes on
        the request ring when it can take it (:meth:`_map_one`).

        A signal that arrives while the service maps is raised once the
        reply is in (:meth:`Channel.held_signals`): the caller never gets
        the mapping, so it is unmapped first (posted), as a gntdev map is
        when its file is closed.

        Raises:
            GrantError: one grant, failed (Xen's GNTST code and debug reason).
            BatchError: several, some failed.
            ValueError: no grants, or a domid/ref that does not fit the op.
        """
        ch = self._hc.channel
        held = ch.hold_signals()
        try:
            mapping = self._map_one(domids[0], refs[0], writable) if len(refs) == 1 else None
            if mapping is None:
                mapping = self._map_ops(domids, refs, writable)
        except BaseException as e:
            ch.release_signals(held)
            if held:
                raise held[0] from e
            raise
        ch.release_signals(held)
        if held:
            mapping.unmap()  # nobody gets it
            raise held[0]
        return mapping

    def _map_ops(self, domids: list[int], refs: list[int], writable: bool) -> Mapping:
        """:meth:`_map` by ``grant_table_op`` (any batch; one op the ring did not take)."""
        gfns, buf = map_ops_at_holes(self.domain, domids, refs, writable)
        rc = self._hc.grant_table_op(gt.GNTTABOP_map_grant_ref, memoryview(buf), len(gfns))
        return self._mapped(domids, refs, writable, gfns, buf, rc)

    def _map_one(self, domid: int, ref: int, writable: bool) -> Mapping | None:
        """One grant on the request ring (:meth:`Channel.map_one`).

        Returns:
            The mapping; None if the ring cannot take it (nothing done).

        Raises:
            GrantError: Xen's GNTST code.
            ServiceError: the connection failed or timed out (it is closed:
                the domain is gone).
        """
        hc = self._hc
        domain = self.domain
        gfn = domain.get_pages(1)[0]
        flags = gt.GNTMAP_host_map | (0 if writable else gt.GNTMAP_readonly)
        try:
            got = hc.channel.map_one(domid, ref, gfn, flags, hc.p2m)
        except XenError:  # the connection failed, or an earlier posted request's failure
            domain.put_pages([gfn])
            raise
        if got is None:
            domain.put_pages([gfn])
            return None
        handle, mfn, p2mt, body = got
        if body is None:  # a success, in the p2m mirror already
            hc.last_reasons = []
            if p2mt == P2M_GRANT_MAP_RW:
                mem = hc.memory
                if mem.reach[mfn] == 2 and not mem.pending():
                    view = _cext.borrow(hc._mmap, mfn * PAGE_SIZE, PAGE_SIZE, not writable)
                else:
                    view = self._view([gfn], [handle], writable)
            else:
                view = self._view([gfn], [handle], writable)
            return Mapping(self, [domid], [ref], writable, view, [handle], resource=[gfn])
        buf = pack_map_ops([gfn], flags, [ref], [domid])
        rc = hc._finish(body, memoryview(buf))
        return self._mapped([domid], [ref], writable, [gfn], buf, rc)

    def _mapped(
        self,
        domids: list[int],
        refs: list[int],
        writable: bool,
        gfns: list[int],
        buf: bytearray,
        rc: int,
    ) -> Mapping:
        """The end of :meth:`_map`: the hypercall returned ``rc``; ``buf`` has the ops' results.

        Raises:
            GrantError, BatchError: as :meth:`_map` (the holes given back).
        """
        domain = self.domain
        if rc < 0:
            domain.put_pages(gfns)
            check_rc("map_grant_ref", rc)
        n = len(gfns)
        statuses, handles = map_results(buf, n)
        if any(statuses):
            # the grant table's rollback: the same hypercalls, through this domain's service
            domain.grant_table._map_failed(domids, refs, gfns, statuses, handles)
        view = self._view(gfns, handles, writable)
        return Mapping(self, domids, refs, writable, view, handles, resource=gfns)

    def _view(self, gfns: list[int], handles: list[int], writable: bool) -> Any:
        """The view of grants just mapped at ``gfns``; if this process may not reach
        them (the service refused their files), they are unmapped again and the
        refusal raised.

        Raises:
            HypercallError: EACCES (a file holding pages not granted to us), EFAULT.
        """
        try:
            return self._hc.map_gfns(gfns, writable)
        except HypercallError:
            buf = pack_unmap_ops(gfns, handles)
            with contextlib.suppress(XenError):
                self._hc.grant_table_op(gt.GNTTABOP_unmap_grant_ref, memoryview(buf), len(gfns))
                self.domain.put_pages(
                    [g for g, st in zip(gfns, unmap_statuses(buf, len(gfns))) if not st]
                )
            raise

    def _unmap(self, mapping: Mapping) -> None:
        """Unmap a mapping made here: ``GNTTABOP_unmap_grant_ref``, posted.

        The contract (``Mapping.unmap`` of this domain's gnttab):

        - Its memory goes at once (the view is closed); the op is sent at
          once, flagged ``F_POSTED``, and not waited for.  The service runs
          it before any later request of this domain, so a peer this domain
          signals afterwards through the service (event channel, xenstore)
          sees the grant unmapped.  A signal that does not go through the
          service (a pipe, a store to a shared ring) can overtake it: call
          :meth:`sync` first.
        - Its reply comes with the next reply on this connection (the
          service holds it until then, so it wakes nobody).  The holes go
          back to the domain when it is read, and only those whose op
          succeeded.
        - A failure (any op status other than GNTST_okay, or a refused
          hypercall) is not lost: the next call on the connection raises it
          as a :class:`~xengrant.errors.BatchError` (op ``unmap_grant_ref``,
          the GNTST codes) before sending anything, as do :meth:`sync` and
          ``RemoteDomain.close``.  Linux's gntdev behaves alike but only
          WARNs: ``xengnttab_unmap`` returns ``munmap``'s result alone
          (``__unmap_grant_pages_done``).

        Raises:
            BufferError: views of ``mapping.mem`` are alive; nothing is unmapped.
            BatchError: an earlier posted unmap failed (this mapping stays mapped).
            ServiceError: the connection is gone (the mapping stays unreleased).
        """
        ch = self._hc.channel
        if ch.deferred:
            ch.raise_deferred()
        mapping._release_memory()
        gfns: list[int] = mapping.resource
        handles = mapping.handles
        assert handles is not None
        if len(gfns) == 1:
            # on the ring: a success's response is finished by its consumer
            on_reply = partial(self._one_unmapped, gfns, handles, mapping.domids, mapping.refs)
            if ch.post_unmap_one(gfns[0], handles[0], on_reply):
                mapping.released = True
                return
        buf = pack_unmap_ops(gfns, handles)
        self._hc.post_grant_table_op(
            gt.GNTTABOP_unmap_grant_ref,
            memoryview(buf),
            len(gfns),
            partial(self._unmapped, gfns, mapping.domids, mapping.refs, buf),
        )
        mapping.released = True

    def _one_unmapped(
        self, gfns: list[int], handles: list[int], domids: list[int], refs: list[int], body: bytes
    ) -> BaseException | None:
        """A posted one-op unmap's reply, when it is not a success the ring's consumer
        finished (an error, or the service answered on the socket)."""
        buf = pack_unmap_ops(gfns, handles)
        return self._unmapped(gfns, domids, refs, buf, self._hc._finish(body, memoryview(buf)))

    def _unmapped(
        self, gfns: list[int], domids: list[int], refs: list[int], buf: bytearray, rc: int
    ) -> BaseException | None:
        """A posted unmap's outcome: the holes whose op succeeded go back.

        Returns:
            None, or the failure the next call raises (:attr:`Channel.deferred`).
        """
        if rc < 0:
            return HypercallError("unmap_grant_ref", -rc, f"posted unmap of refs {refs}")
        statuses = unmap_statuses(buf, len(gfns))
        domain = self.domain
        if not any(statuses):
            domain.put_pages(gfns)
            return None
        # a gfn whose unmap failed may still hold the page: not a hole again
        domain.put_pages([g for g, st in zip(gfns, statuses) if st == gt.GNTST_okay])
        failed = [(domids[i], refs[i]) for i, st in enumerate(statuses) if st]
        return BatchError(
            "unmap_grant_ref",
            statuses,
            f"posted unmap of (domid, ref) {failed}, reported with a later reply",
        )

    def _orphan(self, retry: Callable[[], bool]) -> None:
        """A mapping whose views outlived it: unmap it once they are gone."""
        self.domain.grant_table._orphan(retry)

    def sync(self) -> None:
        """Wait until the service has done every posted unmap; raise a failure one reported.

        Raises:
            BatchError, HypercallError: the oldest posted unmap that failed.
            ServiceError: the connection failed.
        """
        self._hc.channel.sync()

    def map_grant_ref_notify(
        self,
        domid: int,
        ref: int,
        notify_offset: int = -1,
        notify_port: int = -1,
        writable: bool = True,
    ) -> Mapping:
        """``xengnttab_map_grant_ref_notify``: map one grant; when it is unmapped
        (or this process dies) the byte at ``notify_offset`` is cleared and/or an
        event sent on ``notify_port`` (-1: none).

        Raises:
            GrantError: the map failed.
            HypercallError: the notify could not be set (nothing stays mapped).
        """
        mapping = self.map_grant_ref(domid, ref, writable)
        if notify_offset >= 0 or notify_port >= 0:
            try:
                self.set_unmap_notify(
                    mapping,
                    max(notify_offset, 0),
                    notify_port if notify_port >= 0 else None,
                    clear_byte=notify_offset >= 0,
                )
            except BaseException:
                mapping.unmap()
                raise
        return mapping

    def set_unmap_notify(
        self, mapping: Mapping, offset: int, port: int | None = None, clear_byte: bool = True
    ) -> None:
        """``IOCTL_GNTDEV_SET_UNMAP_NOTIFY`` on a mapping.

        Args:
            mapping: a mapping made by this domain.
            offset: byte offset in ``mapping.mem`` to clear.
            port: event channel to notify, or None.
            clear_byte: clear the byte (a read-only mapping refuses: EINVAL).

        Raises:
            HypercallError: EINVAL (bad offset, port or action), ENOENT.
        """
        if mapping.released or mapping.handles is None:
            raise HypercallError("set_unmap_notify", errno.ENOENT, "mapping is unmapped")
        if not 0 <= offset < len(mapping.handles) * PAGE_SIZE:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"offset {offset}")
        action = (UNMAP_NOTIFY_CLEAR_BYTE if clear_byte else 0) | (
            UNMAP_NOTIFY_SEND_EVENT if port is not None else 0
        )
        if not action:
            raise HypercallError("set_unmap_notify", errno.EINVAL, "nothing to do")
        hc = self.domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        handle = mapping.handles[offset // PAGE_SIZE]
        hc.channel.call_ok(
            p.MSG_UNMAP_NOTIFY_SET,
            p.NOTIFY_SET_REQ.pack(p.NOTIFY_GNTDEV, handle, offset % PAGE_SIZE, action, port or 0),
            "set_unmap_notify",
        )

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between grants and local buffers: one hypercall per 256 segments.

        Returns:
            The statuses, also stored in each segment.

        Raises:
            ValueError: a segment with no grant side or longer than a page.
        """
        for seg in segments:
            if not 0 <= seg.len <= PAGE_SIZE:
                raise ValueError(f"grant_copy: len {seg.len} is not within a page")
            if not (isinstance(seg.source, GrantRef) or isinstance(seg.dest, GrantRef)):
                raise ValueError("grant_copy: at least one side must be a GrantRef")
        out: list[int] = []
        for i in range(0, len(segments), self.COPY_BATCH):
            out += self._copy_batch(segments[i : i + self.COPY_BATCH])
        return out

    def _copy_batch(self, segments: Sequence[CopySegment]) -> list[int]:
        n = len(segments)
        if not n:
            return []
        if self._bounces is None or len(self._bounces.gfns) < n:
            if self._bounces is not None:
                self._bounces.free()
                self._bounces = None
            self._bounces = self.domain.alloc_pages(max(n, 16))
        bounce = self._bounces
        ops = (gt.gnttab_copy * n)()
        for i, seg in enumerate(segments):
            o = ops[i]
            o.len = seg.len
            gfn = bounce.gfns[i]
            base = i * PAGE_SIZE
            if isinstance(seg.source, GrantRef):
                o.source.u.ref, o.source.domid = seg.source.ref, seg.source.domid
                o.source.offset = seg.source.offset
                o.flags |= gt.GNTCOPY_source_gref
            else:
                data = memoryview(seg.source).cast("B")[: seg.len]
                bounce.mem[base : base + seg.len] = data
                o.source.u.gmfn, o.source.domid, o.source.offset = gfn, gt.DOMID_SELF, 0
            if isinstance(seg.dest, GrantRef):
                o.dest.u.ref, o.dest.domid = seg.dest.ref, seg.dest.domid
                o.dest.offset = seg.dest.offset
                o.flags |= gt.GNTCOPY_dest_gref
            else:
                o.dest.u.gmfn, o.dest.domid, o.dest.offset = gfn, gt.DOMID_SELF, 0
        self.domain.grant_table_op(gt.GNTTABOP_copy, ops, n)
        out = []
        for i, seg in enumerate(segments):
            seg.status = int(ops[i].status)
            if seg.status == gt.GNTST_okay and not isinstance(seg.dest, GrantRef):
                dest = memoryview(seg.dest).cast("B")
                dest[: seg.len] = bounce.mem[i * PAGE_SIZE : i * PAGE_SIZE + seg.len]
            out.append(seg.status)
        return out

    def close(self) -> None:
        """Free the bounce pages."""
        super().close()
        if self._bounces is not None:
            self._bounces.free()
            self._bounces = None
