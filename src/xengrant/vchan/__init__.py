"""A libxenvchan-compatible byte channel between two domains.

libxenvchan (Xen's ``tools/libs/vchan``; Qubes' qrexec, mirage's vchan) joins
two domains with one granted page, optional granted ring pages and one event
channel.  :class:`Vchan` speaks the same protocol over xengrant's portable
interfaces -- xenstore (``read``/``write``/``set_perms``/``rm``), event
channels (:class:`~xengrant.evtport.EventPort`) and ``gntshr``/``gnttab`` --
so a :class:`Vchan` on the emulator's service, and later on real Xen, talks to
the C library on the other end.

The shared page is ``struct vchan_interface`` (``xen/io/libxenvchan.h``,
:class:`VchanInterface`)::

    0   struct ring_shared left  { u32 cons, prod }   client writes, server reads
    8   struct ring_shared right { u32 cons, prod }   server writes, client reads
    16  u16 left_order, right_order     10: ring at 1024 in the page, 11: at 2048,
                                        12..20: 2**(order-12) pages granted
    20  u8 cli_live, srv_live           0 closed, 1 connected, 2 (cli) not yet
    22  u8 cli_notify, srv_notify       VCHAN_NOTIFY_WRITE / _READ: "tell me when"
    24  u32 grants[]                    the left ring's refs, then the right's

Setup (``libxenvchan_server_init``, ``libxenvchan_client_init``): the server
binds an unbound port for the peer, shares the page (with an unmap notify that
clears ``srv_live``), picks the ring orders from ``left_min``/``right_min``
(:func:`server_orders`), shares the ring pages, and writes ``<path>/ring-ref``
and ``<path>/event-channel`` readable by the peer.  The client reads both,
binds the port, maps the page (its unmap notify clears ``cli_live``), maps
the left ring writable and the right one read-only, sets ``cli_live = 1`` and
notifies.

Reads and writes (``io.c``): a reader that finds too little asks the writer
for an event (sets ``VCHAN_NOTIFY_WRITE`` in the writer's notify byte), then
looks again; a writer that moved ``prod`` clears that bit and, if it was set,
notifies.  The same for space, with ``VCHAN_NOTIFY_READ``.  Stream calls
(:meth:`Vchan.read`, :meth:`Vchan.write`) move what they can; packet calls
(:meth:`Vchan.recv`, :meth:`Vchan.send`) all or nothing.

Trust: the peer is another domain.  Its index is read once per look and
checked: more data (or less space) than the ring holds raises
:class:`VchanError` naming the values (libxenvchan reports 0 and "locks up
the ring"); our own indices and the ring orders are kept privately after
setup, so nothing the peer writes there can send a copy outside the ring; the
client checks the orders and the grant list before mapping anything.
"""

from __future__ import annotations

from .channel import Vchan, VchanDomain, VchanTimeout
from .layout import (
    CLI_LIVE,
    CLI_NOTIFY,
    GRANTS_OFFSET,
    LEFT,
    MAX_RING_SHIFT,
    MAX_RING_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    RIGHT,
    SRV_LIVE,
    SRV_NOTIFY,
    VCHAN_NOTIFY_READ,
    VCHAN_NOTIFY_WRITE,
    RingShared,
    VchanError,
    VchanInterface,
    check_orders,
    server_orders,
)
from .streams import open_vchan_connection, start_vchan_server

__all__ = [
    "CLI_LIVE",
    "CLI_NOTIFY",
    "GRANTS_OFFSET",
    "LEFT",
    "MAX_RING_SHIFT",
    "MAX_RING_SIZE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "RIGHT",
    "SRV_LIVE",
    "SRV_NOTIFY",
    "VCHAN_NOTIFY_READ",
    "VCHAN_NOTIFY_WRITE",
    "RingShared",
    "Vchan",
    "VchanDomain",
    "VchanError",
    "VchanInterface",
    "VchanTimeout",
    "check_orders",
    "open_vchan_connection",
    "server_orders",
    "start_vchan_server",
]
