"""xengrant on real Xen: the portable layer over Linux's Xen devices.

- :class:`LinuxGntshr` -- share pages through ``/dev/xen/gntalloc``
  (libxengntshr's way; :mod:`.gntalloc` documents the semantics).
- :class:`LinuxGnttab` -- map and copy grants through ``/dev/xen/gntdev``
  (libxengnttab's way; :mod:`.gntdev` documents what errors can be told apart).
- :class:`EventChannels` -- ``/dev/xen/evtchn``, for unmap notifications.
- :class:`LinuxXenStore` -- a minimal xenstore client (``xs_wire.h`` over
  ``/dev/xen/xenbus`` or xenstored's socket): a domU's own domid, rendezvous.
- :func:`portable_backend` -- the portable pair (``gntshr``, ``gnttab``) of
  the emulator or of real Xen; :func:`available`, :func:`open_backend`.

Code written against :class:`~xengrant.portable.Gntshr` and
:class:`~xengrant.portable.Gnttab` runs unchanged on both::

    from xengrant.linux import portable_backend
    with portable_backend("auto") as b:          # real Xen if /dev/xen/gntdev exists
        share = b.gntshr.share_pages(b.domid, 1)   # grant to ourselves
        with b.gnttab.map_grant_ref(b.domid, share.refs[0]) as m:
            m.mem[:2] = b"hi"
        b.gntshr.unshare(share)

docs/real-xen.md covers the harness that tests this on a real Xen 4.17.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import LinuxBatchError, LinuxGrantError, LinuxGrantTableFull
from .evtchn import EVTCHN_PATH, EventChannels, LinuxEvtchn
from .gntalloc import GNTALLOC_PATH, LinuxGntshr, gntalloc_limit
from .gntdev import GNTDEV_PATH, LinuxGnttab
from .xenstore import XENBUS_DEVICE, LinuxXenStore, open_xenstore, xenstore_domid

if TYPE_CHECKING:
    from ..embedded import EmbeddedXen
    from ..guest.domain import Domain
    from ..portable import Gntshr, Gnttab

__all__ = [
    "EVTCHN_PATH",
    "GNTALLOC_PATH",
    "GNTDEV_PATH",
    "Backend",
    "EventChannels",
    "LinuxBatchError",
    "LinuxEvtchn",
    "LinuxGntshr",
    "LinuxGnttab",
    "LinuxGrantError",
    "LinuxGrantTableFull",
    "LinuxXenStore",
    "available",
    "gntalloc_limit",
    "open_backend",
    "open_xenstore",
    "own_domid",
    "portable_backend",
]

#: the environment variable naming the default backend kind
ENV_BACKEND = "XENGRANT_BACKEND"
KINDS = ("auto", "emulated", "linux")


def available(gntdev: str = GNTDEV_PATH) -> bool:
    """Whether this is a Xen host whose Linux offers the grant device (``/dev/xen/gntdev``)."""
    return os.path.exists(gntdev)


def own_domid(
    capabilities: str = "/proc/xen/capabilities",
    xenbus: str = XENBUS_DEVICE,
    timeout: float = 10.0,
) -> int | None:
    """This domain's id: 0 in dom0 (``control_d``), else its xenstore ``domid`` node.

    A domU reads ``domid`` (relative to its home, written by the toolstack)
    through ``xenbus`` (:mod:`.xenstore`).

    Args:
        capabilities: xenfs's capabilities file.
        xenbus: the xenbus device (absent: not a Xen guest, or no xenstore).
        timeout: the bound on the xenstore read, in seconds.

    Returns:
        The domid, or None when neither source can tell.
    """
    try:
        with open(capabilities) as f:
            if "control_d" in f.read():
                return 0
    except OSError:
        pass
    if not os.path.exists(xenbus):
        return None
    return xenstore_domid(xenbus, timeout)


class Backend:
    """A portable ``gntshr`` + ``gnttab`` pair, closed together.

    Attributes:
        kind: ``"emulated"`` or ``"linux"``.
        gntshr: a :class:`~xengrant.portable.Gntshr`.
        gnttab: a :class:`~xengrant.portable.Gnttab`.
        domid: this domain's id (grant to it to share with yourself): 0 in
            dom0, a domU's from xenstore; None when unknown (no xenstore).
        xen: the :class:`~xengrant.EmbeddedXen` (emulated only).
        domain: the emulated :class:`~xengrant.Domain` (emulated only).
    """

    def __init__(
        self,
        kind: str,
        gntshr: Gntshr,
        gnttab: Gnttab,
        domid: int | None,
        xen: EmbeddedXen | None = None,
        domain: Domain | None = None,
    ) -> None:
        self.kind = kind
        self.gntshr = gntshr
        self.gnttab = gnttab
        self.domid = domid
        self.xen = xen
        self.domain = domain

    def __repr__(self) -> str:
        return f"<Backend {self.kind} d{self.domid}>"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the devices (linux) or the emulated Xen (emulated)."""
        for part in (self.gnttab, self.gntshr):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        if self.xen is not None:
            self.xen.close()
            self.xen = None


def open_backend(
    gntalloc: str = GNTALLOC_PATH, gntdev: str = GNTDEV_PATH, *, diagnose: bool = True
) -> Backend:
    """The real-Xen backend: :class:`LinuxGntshr` and :class:`LinuxGnttab`.

    Raises:
        OSError: a device cannot be opened (not a Xen host, or the
            ``xen-gntalloc``/``xen-gntdev`` modules are not loaded).
    """
    shr = LinuxGntshr(gntalloc)
    try:
        tab = LinuxGnttab(gntdev, diagnose=diagnose)
    except BaseException:
        shr.close()
        raise
    return Backend("linux", shr, tab, own_domid())


def portable_backend(kind: str | None = None, *, domid: int = 0, memory: int = 64 << 20) -> Backend:
    """The portable layer of the emulator or of real Xen.

    Args:
        kind: ``"emulated"`` (an :class:`~xengrant.EmbeddedXen` with one
            domain, ``domid``, that can grant to itself as dom0 does),
            ``"linux"`` (:func:`open_backend`), or ``"auto"`` (``linux`` when
            ``/dev/xen/gntdev`` exists, else ``emulated``).  None reads
            ``$XENGRANT_BACKEND``, defaulting to ``"emulated"``: the emulator
            stays the default.
        domid: the emulated domain's id.
        memory: the emulated machine's memory in bytes.

    Raises:
        ValueError: an unknown kind.
        OSError: ``"linux"`` and the devices cannot be opened.
    """
    if kind is None:
        kind = os.environ.get(ENV_BACKEND) or "emulated"
    if kind not in KINDS:
        raise ValueError(f"portable_backend: kind must be one of {KINDS}, not {kind!r}")
    if kind == "auto":
        kind = "linux" if available() else "emulated"
    if kind == "linux":
        return open_backend()
    from ..embedded import EmbeddedXen

    xen = EmbeddedXen(memory=memory)
    dom = xen.create_domain(domid=domid, pv=True)
    return Backend("emulated", dom.gntshr, dom.gnttab, dom.domid, xen=xen, domain=dom)
