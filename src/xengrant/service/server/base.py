"""What every part of the service shares: its state, and the calls one part makes
into another (:class:`ServerBase`).

The service is one :class:`~xengrant.service.server.Server` made of small
parts (mixins), one concept each: the listener, a connection's I/O, request
dispatch, the request ring, domain control, the grant-table and memory ops,
preemption, unmap notifications, event channels, xenstore, sysctl.  They all
work on the state declared here, under :attr:`ServerBase.lock`.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ...embedded import EmbeddedXen
from ...emu import Hypervisor
from ...emu.domain import DomainState
from ...xenstore.session import Domains, Session
from .. import protocol as p
from ..backing import Backing
from ..evtchn import Delivery, EventChannels
from ..identity import Identity
from ..limits import Limits, RateLimitedLog
from ..ring import ServiceRing
from ..xenstore import XenStore
from ..xssocket import XenstoredSocket

if TYPE_CHECKING:
    from .connection import Connection, Payload
    from .preempt import HandoffLock
    from .unmap_notify import Notify

#: A message handler: the reply's payload for a request's payload.
Handler = Callable[["Connection", Any], bytes]


class ServerBase:
    """The service's state (set up by :class:`~xengrant.service.server.Server`) and
    the calls its parts make into each other (declared for the type checker)."""

    path: str
    identity: Identity
    xen: EmbeddedXen
    #: the operator's limits (service/limits.py)
    limits: Limits
    hv: Hypervisor
    backing: Backing
    xs: XenStore
    #: the domains xenstore knows (XS_IS_DOMAIN_INTRODUCED), dom0 from the start
    xs_domains: Domains
    #: each connection's xs_wire session (xengrant.xenstore.session), by ident
    xs_sessions: dict[int, Session]
    xenstored: XenstoredSocket | None
    ev: EventChannels
    log: Callable[[str], None]
    #: lines about one connection (or uid), rate-limited
    _warn: RateLimitedLog
    #: what the service refused, throttled or preempted (in STATS)
    counters: dict[str, int]
    #: connections per uid
    _per_uid: dict[int, int]
    #: the listener is off epoll until then (accept failed: back off)
    _accept_again: float
    _accept_wait: float
    #: called at every preemption point, the lock held, before a waiter may get
    #: it (tests: a bystander is made to wait there)
    on_preempt: Callable[[str], None] | None
    #: seconds a connection's thread polls for the next request after one
    spin: float
    #: domid -> the connection bound to it
    bound: dict[int, Connection]
    notifies: dict[int, dict[tuple[int, int], Notify]]
    conns: dict[int, Connection]
    #: socket fd -> its connection (the main thread's epoll: hang-ups, backlogs)
    by_fd: dict[int, Connection]
    #: held while anything of the service is read or changed; long work hands it
    #: to a waiting thread at its preemption points (service/server/preempt.py)
    lock: HandoffLock
    ep: select.epoll
    _next_ident: int
    _to_close: list[Connection]
    _wake_r: int
    _wake_w: int
    _stopping: bool
    _serving: threading.Event
    _loop_done: threading.Event
    _closed: bool
    listener: socket.socket
    token_path: str | None
    #: type -> (handler, needs a bound domain)
    handlers: dict[int, tuple[Handler, bool]]
    #: descriptors the reply being built carries (SCM_RIGHTS)
    _pending_fds: tuple[int, ...]
    #: event-channel upcalls to send (:meth:`_dispatch_async`)
    _deliveries: list[Delivery]

    @staticmethod
    def _ok(body: bytes = b"") -> bytes:
        return p.STATUS.pack(0) + body

    def _dom(self, conn: Connection) -> int:
        assert conn.domid is not None
        return conn.domid

    if TYPE_CHECKING:  # implemented by the parts (see Server's bases)
        def close(self) -> None: raise NotImplementedError
        def _privileged(self, domid: int) -> bool: raise NotImplementedError
        def _destroy(self, domid: int) -> None: raise NotImplementedError
        def _read_loop(self, conn: Connection) -> None: raise NotImplementedError
        def _send(self, conn: Connection, data: bytes, fds: tuple[int, ...] = ()) -> None:
            raise NotImplementedError
        def _flush(self, conn: Connection) -> None: raise NotImplementedError
        def _queue(self, conn: Connection, reply: bytes, fds: tuple[int, ...], flags: int,
                   hold: bool) -> None: raise NotImplementedError
        def _schedule_close(self, conn: Connection) -> None: raise NotImplementedError
        def _reap(self) -> None: raise NotImplementedError
        def _throttle(self, conn: Connection) -> None: raise NotImplementedError
        def _request(self, conn: Connection, mtype: int, flags: int, seq: int,
                     payload: Payload | None, length: int, hold: bool = False,
                     first_op: int = 0) -> None: raise NotImplementedError
        def _error_reply(self, conn: Connection, mtype: int, seq: int,
                         e: Exception) -> bytes: raise NotImplementedError
        def _dispatch_async(self) -> None: raise NotImplementedError
        def _on_data(self, conn: Connection, rbuf: memoryview, n: int) -> None:
            raise NotImplementedError
        def _ring_wait(self, conn: Connection, ring: ServiceRing, rbuf: memoryview,
                       spin_ns: int) -> int: raise NotImplementedError
        def _serve_ring(self, conn: Connection, ring: ServiceRing) -> None:
            raise NotImplementedError
        def _gnttab_reply(self, domid: int, payload: Payload, seq: int,
                          first_op: int = 0) -> bytes: raise NotImplementedError
        def _delta(self, domid: int, gfns: Sequence[int] | None) -> bytes:
            raise NotImplementedError
        def _preempt(self, kind: str) -> None: raise NotImplementedError
        def _fire_all_notifies(self, d: DomainState) -> list[int]: raise NotImplementedError
        def _notify_before_unmap(self, domid: int, notes: dict[tuple[int, int], Notify],
                                 uop: memoryview, count: int) -> list[tuple[int, Notify]]:
            raise NotImplementedError
        def _notify_after_unmap(self, domid: int, notes: dict[tuple[int, int], Notify],
                                uop: memoryview, fired: list[tuple[int, Notify]]) -> None:
            raise NotImplementedError
        def _xs_close(self, ident: int) -> None: raise NotImplementedError
        def _ring_snapshot(self, domid: int) -> dict[str, int] | None:
            raise NotImplementedError
