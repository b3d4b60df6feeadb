"""xengrant: Xen grant tables in Python.

- :class:`EmbeddedXen` -- an emulated Xen hypervisor in this process (memfd
  machine memory, real atomics, Xen 4.17's status codes).
- :class:`Domain` -- a guest: memory, :attr:`Domain.grant_table` (the
  kernel-level API of Linux, mirage and Zephyr), :attr:`Domain.gntshr` and
  :attr:`Domain.gnttab` (the portable libxengntshr/libxengnttab layer).
- :class:`Share`, :class:`Mapping` -- shared pages and foreign mappings,
  released like files.
- :class:`PgdirFrontend`, :class:`PgdirBackend` -- big buffers shared through a
  page directory of grefs (displif.h/sndif.h), both ends, both allocation modes.
- :func:`portable_backend` -- the portable layer on the emulator or, with
  ``"linux"``/``"auto"``, on real Xen through /dev/xen/gntalloc and gntdev.
- :class:`FrontRing`, :class:`BackRing` -- io/ring.h shared rings over granted
  pages, for any ctypes request/response layout (:mod:`xengrant.ring`).
- :class:`Vchan` -- a libxenvchan-compatible byte channel (:mod:`xengrant.vchan`).
- :class:`Evtchn` -- the portable event-channel handle (libxenevtchn's calls):
  ``domain.evtchn`` of an :class:`EmbeddedXen` domain (:class:`EmbeddedEvtchn`),
  of a service domain, or real Xen's ``xengrant.linux.LinuxEvtchn``.
- :class:`EventPort` -- one bound event-channel port, on any of them.
- :class:`XenStore` -- the portable xenstore connection (libxenstore's calls,
  transactions with :func:`run_transaction`): ``domain.xs`` of an
  :class:`EmbeddedXen` domain (:class:`EmbeddedXenStore`), of a service
  domain, or real Xen's ``xengrant.linux.LinuxXenStore``; :mod:`xengrant.xenbus`
  on top.
- :mod:`xengrant.abi` -- Xen's and Linux's constants and structs by C name.

Quick start::

    import xengrant
    with xengrant.EmbeddedXen() as xen:
        front, back = xen.create_domain(), xen.create_domain()
        share = front.grant_table.share_pages(back.domid, count=1)
        with back.gnttab.map_grant_ref(front.domid, share.refs[0]) as m:
            m.mem[:5] = b"hello"
            assert bytes(share.mem[:5]) == b"hello"
        share.unshare()
"""

from __future__ import annotations

from . import abi, xenbus
from .abi.grant_table import gnttabop_error
from .embedded import EmbeddedXen
from .embedded_domain import EmbeddedDomain
from .emu.faults import Fault, Faults
from .errors import (
    BatchError,
    Busy,
    GrantError,
    GrantTableFull,
    GrantTableTimeout,
    HypercallError,
    XenError,
)
from .evtchn import EmbeddedEvtchn, Evtchn, EvtchnError
from .evtport import EventPort
from .guest.domain import Domain, Pages
from .guest.gnttab import FreeCallback, GrantEntry, GrantTable, decode_flags
from .guest.share import Mapping, Share
from .hypercall import Hypercalls
from .leaks import LeakError
from .linux import portable_backend
from .pgdir import PgdirBackend, PgdirError, PgdirFrontend
from .portable import CopySegment, Gntshr, Gnttab, GrantRef
from .ring import BackRing, FrontRing, RingError
from .vchan import (
    Vchan,
    VchanError,
    VchanTimeout,
    open_vchan_connection,
    start_vchan_server,
)
from .xs_embedded import EmbeddedXenStore
from .xsapi import Transaction, TransactionConflict, XenStore, run_transaction

__version__ = "0.1.0"

__all__ = [
    "BackRing",
    "BatchError",
    "Busy",
    "CopySegment",
    "Domain",
    "EmbeddedDomain",
    "EmbeddedEvtchn",
    "EmbeddedXen",
    "EmbeddedXenStore",
    "EventPort",
    "Evtchn",
    "EvtchnError",
    "Fault",
    "Faults",
    "FreeCallback",
    "FrontRing",
    "Gntshr",
    "Gnttab",
    "GrantEntry",
    "GrantError",
    "GrantRef",
    "GrantTable",
    "GrantTableFull",
    "GrantTableTimeout",
    "HypercallError",
    "Hypercalls",
    "LeakError",
    "Mapping",
    "Pages",
    "PgdirBackend",
    "PgdirError",
    "PgdirFrontend",
    "RingError",
    "Share",
    "Transaction",
    "TransactionConflict",
    "Vchan",
    "VchanError",
    "VchanTimeout",
    "XenError",
    "XenStore",
    "abi",
    "decode_flags",
    "gnttabop_error",
    "open_vchan_connection",
    "portable_backend",
    "run_transaction",
    "start_vchan_server",
    "xenbus",
]
