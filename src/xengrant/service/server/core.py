"""The service (:class:`Server`): its parts put together, and :func:`serve`."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

from ...embedded import DEFAULT_MEMORY, EmbeddedXen
from ...emu.grant_table import DEFAULT_MAX_GRANT_FRAMES
from ...emu.maptrack import DEFAULT_MAX_MAPTRACK_FRAMES
from ...xenstore.session import Domains, Session
from .. import protocol as p
from ..backing import Backing
from ..evtchn import Delivery, EventChannels
from ..identity import Identity
from ..limits import Limits, RateLimitedLog
from ..paths import default_socket_path, token_path, write_token
from ..xenstore import XenStore
from ..xssocket import XenstoredSocket
from .base import Handler
from .connection import _EPOLLIN, DEFAULT_SPIN, Connection, ConnectionIO
from .dispatch import Dispatch
from .domctl import DomainControl
from .event_channel import EventChannelOps
from .grant_table import GrantTableOps
from .listener import ACCEPT_BACKOFF, Listener, _listen
from .memory import MemoryOps
from .preempt import HandoffLock, Preemption
from .request_ring import RequestRing
from .sysctl import Sysctl
from .unmap_notify import Notify, UnmapNotify
from .xenstore_ops import XenstoreOps


class Server(
    Listener,
    ConnectionIO,
    Dispatch,
    RequestRing,
    DomainControl,
    GrantTableOps,
    Preemption,
    MemoryOps,
    UnmapNotify,
    EventChannelOps,
    XenstoreOps,
    Sysctl,
):
    """The service: listening socket, connections, hypervisor, xenstore, event channels.

    Args:
        path: the Unix socket path.
        memory: bytes of machine memory.
        max_grant_frames: per-domain default and cap (Xen: 64), unless ``limits``.
        max_maptrack_frames: per-domain default and cap (Xen: 1024), unless ``limits``.
        log: where to report client misbehaviour and handler failures
            (default: the ``xengrant.service`` logger, at WARNING; a callable
            that does nothing keeps it quiet).
        spin: seconds a connection's thread polls for the next request after
            answering one, before it sleeps (0: sleep at once).
        allow_uids: uids admitted besides this process's and root
            (:class:`~xengrant.service.identity.Identity`).
        allow_groups: groups (names or gids) whose members are admitted.
        token_file: write the dom0 token beside the socket
            (:func:`~xengrant.service.paths.token_path`); else only
            :attr:`token` gives it (to the process that made this Server).
        limits: the operator's limits (:class:`~xengrant.service.limits.Limits`).
        xenstored_path: also listen there for dom0's xenstore tools, speaking
            xs_wire as xenstored's socket does
            (:class:`~xengrant.service.xssocket.XenstoredSocket`).

    Raises:
        OSError: EADDRINUSE if a service already listens at ``path``;
            PermissionError if the default socket's directory is not private.
    """

    def __init__(
        self,
        path: str | None = None,
        memory: int = DEFAULT_MEMORY,
        *,
        max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
        max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES,
        log: Callable[[str], None] | None = None,
        spin: float = DEFAULT_SPIN,
        allow_uids: Sequence[int] = (),
        allow_groups: Sequence[int | str] = (),
        token_file: bool = True,
        limits: Limits | None = None,
        xenstored_path: str | None = None,
    ) -> None:
        self.path = path or default_socket_path(create=True)
        self.identity = Identity(allow_uids, allow_groups)
        if limits is None:
            limits = Limits(max_grant_frames=max_grant_frames,
                            max_maptrack_frames=max_maptrack_frames)
        self.xen = EmbeddedXen(
            memory, max_grant_frames=limits.max_grant_frames,
            max_maptrack_frames=limits.max_maptrack_frames,
        )
        #: the operator's limits (service/limits.py)
        self.limits = limits.resolve(self.xen.nr_frames)
        self.hv = self.xen.hv
        # machine memory as a table of files, one set per domain (service/backing.py)
        self.backing = Backing(self.xen._mmap, self.xen.fd, self.xen.nr_frames)
        machine = self.hv.machine
        machine.on_alloc = self.backing.allocated
        machine.on_release = self.backing.released
        machine.on_transfer = self.backing.transferred
        self.backing.on_overflow = self._memory_overflow
        self.xs = XenStore(
            self._privileged, quota_entries=limits.xs_entries, quota_watches=limits.xs_watches,
            max_nodes=limits.xs_nodes_total, max_watches=limits.xs_watches_total,
        )
        self.xs.mkdir(0, "/local/domain")  # what the host's init scripts leave
        #: the domains xenstore knows (XS_IS_DOMAIN_INTRODUCED), dom0 from the start
        self.xs_domains = Domains({0})
        #: each connection's xs_wire session (xengrant.xenstore.session), by ident
        self.xs_sessions: dict[int, Session] = {}
        self.xenstored: XenstoredSocket | None = None
        self.ev = EventChannels(self._privileged)
        self.log = log if log is not None else _stderr
        #: lines about one connection (or uid), rate-limited
        self._warn = RateLimitedLog(self.log, limits.log_burst, limits.log_interval)
        #: what the service refused, throttled or preempted (in STATS)
        self.counters: dict[str, int] = dict.fromkeys(
            ("refused_uid", "refused_conns", "accept_errors", "throttled", "dropped_unread",
             "preempted_batches", "batch_yields", "teardown_yields", "preempt_handoffs"), 0,
        )
        #: connections per uid
        self._per_uid: dict[int, int] = {}
        #: the listener is off epoll until then (accept failed: back off)
        self._accept_again = 0.0
        self._accept_wait = ACCEPT_BACKOFF[0]
        #: called at every preemption point, the lock held, before a waiter may get
        #: it (tests: a bystander is made to wait there)
        self.on_preempt: Callable[[str], None] | None = None
        #: seconds a connection's thread polls for the next request after one
        self.spin = spin
        self.bound: dict[int, Connection] = {}
        self.notifies: dict[int, dict[tuple[int, int], Notify]] = {}
        self.conns: dict[int, Connection] = {}
        #: socket fd -> its connection (the main thread's epoll: hang-ups, backlogs)
        self.by_fd: dict[int, Connection] = {}
        #: held while anything of the service is read or changed
        self.lock = HandoffLock()
        self.ep = select.epoll()
        self._next_ident = 1
        self._to_close: list[Connection] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        #: set while serve_forever runs (a context manager's exit waits for it to return)
        self._serving = threading.Event()
        self._loop_done = threading.Event()
        self._closed = False
        self.listener = _listen(self.path, shared=bool(allow_uids or allow_groups))
        self.token_path: str | None = None
        if token_file:
            try:
                write_token(token_path(self.path), self.identity.token)
            except BaseException:
                self.listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            self.token_path = token_path(self.path)
        self.ep.register(self.listener.fileno(), _EPOLLIN)
        self.ep.register(self._wake_r, _EPOLLIN)
        #: type -> (handler, needs a bound domain); GNTTAB_OP alone takes the
        #: payload as a writable view of the receive buffer, the rest get bytes
        self.handlers: dict[int, tuple[Handler, bool]] = {
            p.MSG_PING: (self._ping, False),
            p.MSG_CREATE: (self._create, False),
            p.MSG_ATTACH: (self._attach, False),
            p.MSG_STATS: (self._stats, False),
            p.MSG_DEBUG_KEY: (self._debug_key, False),
            p.MSG_DOMCTL_CREATE: (self._domctl_create, True),
            p.MSG_DOMCTL_DESTROY: (self._domctl_destroy, True),
            p.MSG_CLOSE: (self._close_domain, True),
            p.MSG_GNTTAB_OP: (self._gnttab_op, True),
            p.MSG_POPULATE: (self._populate, True),
            p.MSG_DECREASE: (self._decrease, True),
            p.MSG_ADD_TO_PHYSMAP: (self._add_to_physmap, True),
            p.MSG_TRANSLATE: (self._translate, True),
            p.MSG_RING_SETUP: (self._ring_setup, True),
            p.MSG_REACH: (self._reach, True),
            p.MSG_GRANT_PREPARE: (self._grant_prepare, True),
            p.MSG_GRANT_END: (self._grant_end, True),
            p.MSG_EVTCHN_ALLOC_UNBOUND: (self._ev_alloc_unbound, True),
            p.MSG_EVTCHN_BIND_INTERDOMAIN: (self._ev_bind_interdomain, True),
            p.MSG_EVTCHN_SEND: (self._ev_send, True),
            p.MSG_EVTCHN_CLOSE: (self._ev_close, True),
            p.MSG_EVTCHN_STATUS: (self._ev_status, True),
            p.MSG_XS_READ: (self._xs_read, True),
            p.MSG_XS_WRITE: (self._xs_write, True),
            p.MSG_XS_MKDIR: (self._xs_mkdir, True),
            p.MSG_XS_RM: (self._xs_rm, True),
            p.MSG_XS_DIRECTORY: (self._xs_directory, True),
            p.MSG_XS_GET_PERMS: (self._xs_get_perms, True),
            p.MSG_XS_SET_PERMS: (self._xs_set_perms, True),
            p.MSG_XS_WATCH: (self._xs_watch, True),
            p.MSG_XS_UNWATCH: (self._xs_unwatch, True),
            p.MSG_XS_GET_DOMAIN_PATH: (self._xs_get_domain_path, True),
            p.MSG_XS_WIRE: (self._xs_wire, True),
            p.MSG_UNMAP_NOTIFY_SET: (self._notify_set, True),
            p.MSG_UNMAP_NOTIFY_FIRE: (self._notify_fire, True),
        }
        self._pending_fds: tuple[int, ...] = ()
        self._deliveries: list[Delivery] = []
        if xenstored_path is not None:
            try:
                self.xenstored = XenstoredSocket(
                    # the HandoffLock is a Lock to it: acquire, release, with
                    xenstored_path, self.xs, cast(threading.Lock, self.lock), self.xs_domains,
                    self._dispatch_async, self.log, uid=self.identity.uid,
                )
            except BaseException:
                self.listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise

    def close(self) -> None:
        """Drop every connection (destroying their domains) and free machine memory.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        with self.lock:
            readers = [c.reader for c in self.conns.values() if c.reader is not None]
            for conn in list(self.conns.values()):
                self._schedule_close(conn)
            self._reap()
            self.backing.flush()
        for t in readers:
            t.join(5.0)
        if self.xenstored is not None:
            self.xenstored.close()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.token_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.token_path)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ep.close()
        self.backing.close()
        self.xen.close()

    def __enter__(self) -> Server:
        """``with Server(...) as srv:`` run ``srv.serve_forever`` in a thread; leaving the
        block stops the loop, waits for it to return and closes the service."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()  # first: a loop not started yet returns at once
        if self._serving.is_set():
            self._loop_done.wait()
        self.close()




#: the service's lines (client misbehaviour, refusals, handler failures): rate-limited per
#: connection by RateLimitedLog before they get here; ``xengrant hypervisor`` prints them
_logger = logging.getLogger("xengrant.service")


def _stderr(text: str) -> None:
    """The default ``log``: the ``xengrant.service`` logger, at WARNING."""
    _logger.warning("%s", text)


def serve(
    path: str | None = None,
    memory: int = DEFAULT_MEMORY,
    *,
    ready: Callable[[str], None] | None = None,
    handle_signals: bool = True,
    **kw: Any,
) -> None:
    """Run the service at ``path`` until SIGTERM/SIGINT (or the process ends).

    Args:
        path: socket path (default: :func:`default_socket_path`).
        memory: bytes of machine memory.
        ready: called with the socket path once it accepts connections.
        handle_signals: stop cleanly on SIGTERM and SIGINT (main thread only).
        kw: more :class:`Server` arguments.
    """
    # descriptors: connections, rings and memory files; take what the hard limit
    # allows (the connection limits follow, limits.default_max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 16), hard))
    server = Server(path, memory, **kw)
    old_wakeup = None
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop())
        # The signal may land on another thread of this process, leaving the
        # loop asleep in epoll_wait: the wakeup fd makes it return to Python
        # (where the handler runs) whichever thread took the signal.
        old_wakeup = signal.set_wakeup_fd(server.wake_fd, warn_on_full_buffer=False)
    if ready is not None:
        ready(server.path)
    try:
        server.serve_forever(close=False)
    finally:
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)
        server.close()
