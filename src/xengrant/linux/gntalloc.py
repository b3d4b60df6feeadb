"""Share pages through Linux's ``/dev/xen/gntalloc`` (libxengntshr's way).

:class:`LinuxGntshr` is the portable :class:`~xengrant.portable.Gntshr` on a
real Xen host.  ``share_pages`` does what libxengntshr's
``osdep_gntshr_share_pages`` (tools/libs/gnttab/linux.c) does:

1. ``IOCTL_GNTALLOC_ALLOC_GREF`` -- the driver allocates ``count`` zeroed
   pages, grants them to ``domid`` (``GNTALLOC_FLAG_WRITABLE`` or read-only)
   and returns their grant references and an ``index`` (an mmap offset);
2. ``mmap`` of ``count`` pages at ``index`` -- the pages, contiguous;
3. optionally ``IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`` (clear a byte and/or
   signal an event channel when the pages are released);
4. ``IOCTL_GNTALLOC_DEALLOC_GREF`` at once: the file no longer holds the
   pages, the mapping does.  They live until ``munmap``.

``unshare`` is ``munmap``.  The driver then ends foreign access
(``gntalloc`` ``__del_gref`` -> ``gnttab_end_foreign_access``); if the peer
still maps a page, Linux defers it (its "deferred g.e." list, retried about
once a second) and frees the page after the peer unmaps.  So ``unshare``
never blocks and never raises :class:`~xengrant.errors.Busy`, exactly as the
emulator's ``EmulatedGntshr.unshare``.  The peer keeps seeing (and writing)
the page until it unmaps.
"""

from __future__ import annotations

import errno as _errno
import logging

from ..abi import gntalloc as ga
from ..guest.share import PageView, Share
from ._device import PAGE_SIZE, Device, OsDevice
from ._log import logger, ratelimited
from ._ops import alloc_ids, alloc_request
from .errors import LinuxGrantTableFull, describe, from_oserror

GNTALLOC_PATH = "/dev/xen/gntalloc"
LIMIT_PARAM = "/sys/module/xen_gntalloc/parameters/limit"


def gntalloc_limit(path: str = LIMIT_PARAM) -> int | None:
    """gntalloc's ``limit`` module parameter: grant refs the driver may hold (default 1024).

    Returns:
        The limit, or None when it cannot be read.
    """
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class LinuxGntshr:
    """:class:`~xengrant.portable.Gntshr` over ``/dev/xen/gntalloc``.

    Args:
        path: the device node.
        device: an already open :class:`~._device.Device` (tests pass a fake).

    Raises:
        OSError: the device cannot be opened.
    """

    def __init__(self, path: str = GNTALLOC_PATH, *, device: Device | None = None) -> None:
        self.dev: Device = device if device is not None else OsDevice(path)
        self.path = path
        self.closed = False

    def __repr__(self) -> str:
        return f"<LinuxGntshr {self.path}{' closed' if self.closed else ''}>"

    def __enter__(self) -> LinuxGntshr:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the device.

        Pages of shares still alive stay until their ``unshare`` (munmap).
        """
        if not self.closed:
            self.closed = True
            self.dev.close()

    # ------------------------------------------------------------- sharing
    def share_pages(
        self,
        domid: int,
        count: int,
        writable: bool = True,
        *,
        notify_offset: int | None = None,
        notify_port: int | None = None,
    ) -> Share:
        """Share ``count`` new zeroed pages with ``domid`` (``xengntshr_share_pages``).

        Args:
            domid: the domain given access.
            count: pages (>= 1).
            writable: whether ``domid`` may map them writable.
            notify_offset: byte offset in the share to clear when the pages
                are released (``UNMAP_NOTIFY_CLEAR_BYTE``;
                ``xengntshr_share_page_notify``).
            notify_port: a local event-channel port bound through
                ``/dev/xen/evtchn`` to signal then (``UNMAP_NOTIFY_SEND_EVENT``).

        Returns:
            A :class:`~xengrant.Share`: ``refs``, ``mem`` (the mmap).

        Raises:
            ValueError: ``count`` < 1, or ``notify_offset`` outside the share.
            GrantTableFull: gntalloc's ``limit`` or the kernel's free grant
                refs are exhausted (``ENOSPC``); a :class:`LinuxGrantTableFull`.
            MemoryError: no memory for the pages (``ENOMEM``).
            GrantError: any other driver failure (a ``LinuxGrantError``).
        """
        if count < 1:
            raise ValueError(f"share_pages: count must be >= 1, not {count}")
        if notify_offset is not None and not 0 <= notify_offset < count * PAGE_SIZE:
            raise ValueError(f"share_pages: notify_offset {notify_offset} is outside the share")
        op = alloc_request(domid, ga.GNTALLOC_FLAG_WRITABLE if writable else 0, count)
        try:
            self.dev.ioctl(ga.IOCTL_GNTALLOC_ALLOC_GREF, op)
        except OSError as e:
            raise self._alloc_error(count, e) from e
        index, refs = int(op.index), alloc_ids(op, count)
        try:
            view = self._map_and_notify(index, count, notify_offset, notify_port)
        finally:
            # libxengntshr deallocates at once: the mmap keeps the pages alive.
            self._dealloc(index, count)
        return Share(self, domid, refs, writable, view, resource=index)

    def _alloc_error(self, count: int, e: OSError) -> Exception:
        err = e.errno or _errno.EIO
        if err == _errno.ENOSPC:
            ratelimited(logging.WARNING, ("gntalloc", "enospc"),
                        "share_pages of %d page(s): no grant refs left (gntalloc limit %s)",
                        count, gntalloc_limit())
            return LinuxGrantTableFull(
                "share_pages",
                count,
                err,
                describe(f"IOCTL_GNTALLOC_ALLOC_GREF of {self.path}", err),
                gntalloc_limit(),
            )
        ratelimited(logging.WARNING, ("gntalloc", err), "share_pages of %d page(s): %s", count,
                    describe("IOCTL_GNTALLOC_ALLOC_GREF", err))
        return from_oserror("share_pages", f"IOCTL_GNTALLOC_ALLOC_GREF of {self.path}", e)

    def _map_and_notify(
        self, index: int, count: int, notify_offset: int | None, notify_port: int | None
    ) -> PageView:
        try:
            view = self.dev.mmap(count * PAGE_SIZE, True, index)
        except OSError as e:
            raise from_oserror("share_pages", f"mmap of {self.path}", e) from e
        if notify_offset is None and notify_port is None:
            return view
        notify = ga.ioctl_gntalloc_unmap_notify(index=index)
        if notify_offset is not None:
            notify.index = index + notify_offset
            notify.action |= ga.UNMAP_NOTIFY_CLEAR_BYTE
        if notify_port is not None:
            notify.action |= ga.UNMAP_NOTIFY_SEND_EVENT
            notify.event_channel_port = notify_port
        if notify.action:
            try:
                self.dev.ioctl(ga.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, notify)
            except OSError as e:
                view.close()
                ratelimited(logging.WARNING, ("gntalloc", "notify"),
                            "no unmap notify for index %#x: %s", index,
                            describe("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", e.errno or 0))
                raise from_oserror(
                    "share_pages", f"IOCTL_GNTALLOC_SET_UNMAP_NOTIFY of {self.path}", e
                ) from e
        return view

    def _dealloc(self, index: int, count: int) -> None:
        try:
            self.dev.ioctl(
                ga.IOCTL_GNTALLOC_DEALLOC_GREF,
                ga.ioctl_gntalloc_dealloc_gref(index=index, count=count),
            )
        except OSError as e:  # pragma: no cover - the driver just handed out index
            raise from_oserror(
                "share_pages", f"IOCTL_GNTALLOC_DEALLOC_GREF of {self.path}", e
            ) from e

    def unshare(self, share: Share) -> None:
        """Stop sharing: ``munmap`` (``xengntshr_unshare``).

        Pages the peer still maps are freed by Linux once it unmaps.

        Raises:
            BufferError: views of ``share.mem`` are still alive (nothing done).
        """
        share.try_unshare()

    # ----------------------------------------------------- ShareOwner side
    def _try_unshare(self, share: Share, release_refs: bool) -> None:
        share._release_memory()
        share.refs.clear()
        share.released = True

    def _abandon_share(self, share: Share) -> None:
        refs = list(share.refs)
        share.released = True
        share.refs.clear()
        share.mem.release()
        try:
            if share._view is not None:
                share._view.close()
        except BufferError:  # unmapped when the last view goes; gntalloc frees it then
            logger.debug("share of refs %s dropped with views alive: unmapped when the last "
                         "goes", refs)
