"""``xengrant hypervisor``: the emulated hypervisor as a service on a Unix socket.

One lock guards everything: the sans-IO hypervisor core
(:class:`~xengrant.emu.Hypervisor`, over the memfd of an
:class:`~xengrant.embedded.EmbeddedXen`), the xenstore and the event channels.
Each connection binds to one domain (CREATE makes one, ATTACH takes one a
privileged domain made) and can then only act as that domain.  The memfds
backing the frames it may reach (its own, and foreign frames it maps: see
:mod:`xengrant.service.backing`) travel to the client with SCM_RIGHTS, so
its views of frames are real shared memory.

The service is :class:`Server`, made of small parts, one concept each:

- :mod:`.listener` -- the listening socket and the main loop: accept, admission,
  the connection limits, backing off when ``accept`` fails, hang-ups;
- :mod:`.connection` -- a connection, its reader thread, output queue, throttle, close;
- :mod:`.dispatch` -- requests to handlers (the C fast path first), error replies,
  async messages (events, watch events);
- :mod:`.request_ring` -- the service's end of a connection's request ring;
- :mod:`.domctl` -- domains and identity: create, attach with a secret, dom0,
  destroy (``domain_kill``);
- :mod:`.grant_table` -- ``GNTTAB_OP`` (``do_grant_table_op``), batches preemptible;
- :mod:`.preempt` -- the preemption point of long work;
- :mod:`.memory` -- ``memory_op`` messages and the memory files a domain may reach;
- :mod:`.unmap_notify` -- gntdev/gntalloc unmap notifications;
- :mod:`.event_channel` -- ``event_channel_op`` messages;
- :mod:`.xenstore_ops` -- a connection's xenstore session;
- :mod:`.sysctl` -- ``STATS`` and the debug keys (dom0's only, bounded);
- :mod:`.base` -- the state they share; :mod:`.core` -- :class:`Server` and :func:`serve`.
"""

from __future__ import annotations

from .connection import DEFAULT_SPIN, Connection
from .core import Server, serve
from .core import _stderr as _stderr  # the service's default log (tests)
from .listener import ACCEPT_BACKOFF
from .sysctl import truncate
from .unmap_notify import Notify

__all__ = ["ACCEPT_BACKOFF", "DEFAULT_SPIN", "Connection", "Notify", "Server", "serve", "truncate"]
