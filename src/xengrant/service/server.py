"""``xengrant hypervisor``: the emulated hypervisor as a service on a Unix socket.

One lock guards everything: the sans-IO hypervisor core
(:class:`~xengrant.emu.Hypervisor`, over the memfd of an
:class:`~xengrant.embedded.EmbeddedXen`), the xenstore and the event channels.
Each connection has a thread of its own, blocked in ``poll`` + ``recv_into``
on its socket; what it reads it handles under the lock.  The main thread
(``epoll``) accepts connections, writes what could not be sent at once, and
on a hang-up waits for that connection's thread to finish before it accepts
anyone else: whoever connects after a process died finds its domain gone.
Each connection binds to one domain (CREATE makes one, ATTACH takes one a
privileged domain made) and can then only act as that domain.  The memfds
backing the frames it may reach (its own, and foreign frames it maps: see
:mod:`xengrant.service.backing`) travel to the client with SCM_RIGHTS, so
its views of frames are real shared memory.

When a connection closes (the process exited or was killed), the service
destroys its domain as Xen's ``domain_kill`` would: unmap notifications fire
(the byte is cleared, the event sent, as Linux's gntdev/gntalloc do when the
process's files close), its mappings of others' grants are released, its
event channels are closed (peers see their ports unbound), its watches go, its
xenstore home is removed as libxl does and ``@releaseDomain`` fires.  Pages it
granted stay valid for their mappers until they unmap; then the zombie goes.

Nothing a client sends can stop the loop: every handler failure becomes an
error reply (see :mod:`xengrant.service.protocol`), and a connection that
does not read its replies is dropped once 64 MiB are queued for it.

The hot path is short on purpose: one ``recv_into`` a buffer that is
reused, whole messages handled straight from that buffer (a GNTTAB_OP's op
structs are the hypercall's ``uop`` in place, with no copy), and one ``send``
of every reply the read produced.  A thread blocked in ``recv`` (not in
``epoll_wait``) is woken as the sender's partner (a synchronous wake-up), so
the scheduler runs it on the sender's CPU rather than waking an idle one --
on a virtual machine that costs far more than the request itself.  The reply
to a request flagged ``F_POSTED`` (a client's unmap it does not wait for) is
queued and leaves with the next one, so it costs its client no wake-up.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import rshift
from typing import Any, Union

from .. import _cext
from ..abi import grant_table as gt
from ..abi.gntalloc import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from ..abi.memory import XENMAPIDX_grant_table_status
from ..debugkeys import dump_all
from ..embedded import DEFAULT_MEMORY, EmbeddedXen
from ..emu import gnttab_map
from ..emu.domain import P2M_RAM_RW, DomainState
from ..emu.grant_table import DEFAULT_MAX_GRANT_FRAMES
from ..emu.machine import PAGE_SIZE
from ..emu.maptrack import DEFAULT_MAX_MAPTRACK_FRAMES
from ..errors import HypercallError
from ..xenstore import wire as xsw
from ..xenstore.session import Domains, Session
from . import protocol as p
from .backing import Backing
from .evtchn import ECS_INTERDOMAIN, ECS_UNBOUND, Delivery, EventChannels, EvtchnError
from .identity import Identity
from .limits import Limits, RateLimitedLog
from .paths import Cred, default_socket_path, peer_cred, token_path, write_token
from .ring import INDICES as RING_INDICES
from .ring import ServiceRing
from .ring import request as ring_request
from .xenstore import XenStore, XenStoreError
from .xssocket import XenstoredSocket

#: Seconds between tries to accept when accept() fails (EMFILE...): doubled up to the max.
ACCEPT_BACKOFF = (0.01, 1.0)
#: Seconds a long batch or teardown leaves the lock free at a preemption point.
PREEMPT_PAUSE = 100e-6
#: Seconds a connection's thread polls for the next request after answering one.
DEFAULT_SPIN = 100e-6
_RECV = 1 << 18
#: Answer map/unmap messages in C (:func:`_cext.serve_gnttab`) when the
#: emulator's C map path is on too; tests turn it off to compare.
SERVE_FASTPATH = True
_UNMAP_HANDLE = struct.Struct("<I")
_UNMAP_HANDLE_OFF = 16
_UNMAP_STATUS = struct.Struct("<h")
_UNMAP_STATUS_OFF = 20
_UNMAP_SIZE = 24
_LITTLE = sys.byteorder == "little"
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
#: the peer hung up (or the socket failed): what the main thread watches for
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OK = p.STATUS.pack(0)
_NO_REASONS = p.pack_reasons([])
_NO_DELTA = p.pack_p2m([], [])
#: a request's payload: bytes, or a writable view of the receive buffer
Payload = Union[bytes, memoryview]


@dataclass
class Notify:
    """An unmap notification (gntdev/gntalloc ``SET_UNMAP_NOTIFY``)."""

    kind: int
    key: int
    offset: int
    action: int
    port: int
    mfn: int = -1


class Connection:
    """One client socket and what it is bound to."""

    def __init__(self, sock: socket.socket, ident: int, cred: Cred | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = ident
        #: the peer's credentials (SO_PEERCRED at accept)
        self.cred = cred if cred is not None else Cred(-1, -1, -1)
        #: the domain this connection was bound to until dom0 destroyed it
        self.destroyed: int | None = None
        self.decoder = p.Decoder()
        self.out: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self.out_bytes = 0
        self.domid: int | None = None
        #: domains this (privileged) connection made and nobody attached yet
        self.created: set[int] = set()
        self.want_write = False
        #: a reply someone waits for is queued (posted replies alone are not sent)
        self.flush_due = False
        self.dead = False
        #: the thread reading this socket (it alone closes it)
        self.reader: threading.Thread | None = None
        #: the request ring, once the client asked for one (MSG_RING_SETUP)
        self.ring: ServiceRing | None = None
        #: requests read but not handled: the connection is throttled
        self.pending: deque[p.Frame] = deque()
        #: its reader waits for the output to drain (it stopped reading)
        self.throttled = False
        #: notified (under the service lock) when the output drained, or it died
        self.drained: threading.Condition | None = None
        #: the client's end of its domain's memory socket (service/backing.py),
        #: kept until the connection goes (its bind reply may still be queued)
        self.memory_socket: socket.socket | None = None
        #: the hang-up events the main thread's epoll watches for it
        self.watch = _HANGUP

    def __repr__(self) -> str:
        return f"<conn {self.ident} d{self.domid}>"


_Handler = Callable[[Connection, Any], bytes]


class Server:
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
             "preempted_batches", "batch_yields", "teardown_yields"), 0,
        )
        #: connections per uid
        self._per_uid: dict[int, int] = {}
        #: the listener is off epoll until then (accept failed: back off)
        self._accept_again = 0.0
        self._accept_wait = ACCEPT_BACKOFF[0]
        #: called with the lock given up at every preemption point (tests)
        self.on_preempt: Callable[[str], None] | None = None
        #: seconds a connection's thread polls for the next request after one
        self.spin = spin
        self.bound: dict[int, Connection] = {}
        self.notifies: dict[int, dict[tuple[int, int], Notify]] = {}
        self.conns: dict[int, Connection] = {}
        #: socket fd -> its connection (the main thread's epoll: hang-ups, backlogs)
        self.by_fd: dict[int, Connection] = {}
        #: held while anything of the service is read or changed
        self.lock = threading.Lock()
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
        self.handlers: dict[int, tuple[_Handler, bool]] = {
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
                    xenstored_path, self.xs, self.lock, self.xs_domains, self._dispatch_async,
                    self.log, uid=self.identity.uid,
                )
            except BaseException:
                self.listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise

    # ------------------------------------------------------------ lifecycle
    def _privileged(self, domid: int) -> bool:
        """Dom0 (also the toolstack's own identity when no domain 0 exists)."""
        if domid == 0:
            return True
        d = self.hv.domains.get(domid)
        return d is not None and d.privileged

    @property
    def token(self) -> bytes:
        """The dom0 token: claims domid 0, reads STATS and debug keys."""
        return self.identity.token

    @property
    def wake_fd(self) -> int:
        """A non-blocking fd whose writes wake the loop (e.g. ``signal.set_wakeup_fd``)."""
        return self._wake_w

    def stop(self) -> None:
        """Ask the loop to return (thread- and signal-safe)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self, close: bool = True) -> None:
        """Run until :meth:`stop`; then close every connection (destroying their domains).

        This thread accepts connections (each gets a reader thread) and
        writes out what a connection could not take at once.

        Args:
            close: :meth:`close` at the end (False: the caller does).
        """
        poll = self.ep.poll
        listen_fd = self.listener.fileno()
        self._loop_done.clear()
        self._serving.set()
        try:
            while not self._stopping:
                timeout = -1.0
                if self._accept_again:  # backing off: take the listener back then
                    timeout = self._accept_again - time.monotonic()
                    if timeout <= 0:
                        self._accept_again = 0.0
                        self.ep.register(listen_fd, _EPOLLIN)
                        timeout = -1.0
                for fd, mask in poll(timeout):
                    if fd == listen_fd:
                        self._accept()
                    elif fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                    else:
                        with self.lock:
                            conn = self.by_fd.get(fd)
                            if conn is None or conn.dead:
                                continue
                            if mask & _EPOLLOUT:
                                self._flush(conn)
                                self._reap()
                                self.backing.flush()
                            if mask & _HANGUP and conn.throttled:
                                self._hangup_throttled(conn, mask)
                                continue
                        if mask & _HANGUP and conn.reader is not None:
                            # Its last requests and its hang-up are handled
                            # before anyone who connected after it is let in
                            # (a toolstack that saw a process die sees its
                            # domain gone) -- unless it is throttled: then
                            # its reader waits for it to read, not for us.
                            self._join_reader(conn)
        finally:
            self._serving.clear()
            self._loop_done.set()
            if close:
                self.close()

    def __enter__(self) -> Server:
        """``with Server(...) as srv:`` run ``srv.serve_forever`` in a thread; leaving the
        block stops the loop, waits for it to return and closes the service."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()  # first: a loop not started yet returns at once
        if self._serving.is_set():
            self._loop_done.wait()
        self.close()

    def _hangup_throttled(self, conn: Connection, mask: int) -> None:
        """A throttled connection hung up (caller holds the lock).

        Gone for good (HUP, ERR): nothing is left to wait for, it is closed.
        Only its writing side closed (RDHUP): it may still read what waits
        for it; epoll stops reporting that, and its reader goes on once the
        output drained (then reads the end of the stream).
        """
        if mask & (select.EPOLLHUP | select.EPOLLERR):
            self._schedule_close(conn)
            self._reap()
            self.backing.flush()
            return
        conn.watch = select.EPOLLHUP | select.EPOLLERR
        self.ep.modify(conn.fd, conn.watch | (_EPOLLOUT if conn.want_write else 0))

    def _join_reader(self, conn: Connection, timeout: float = 5.0) -> None:
        """Wait (without the lock) until ``conn``'s reader ends, or is throttled,
        or ``timeout`` passed: a reader stopped for its client never stalls this thread."""
        reader = conn.reader
        assert reader is not None
        deadline = time.monotonic() + timeout
        while reader.is_alive() and not conn.throttled:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            reader.join(min(left, 0.01))

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

    # ----------------------------------------------------------- sockets
    def _accept(self) -> None:
        """Accept one connection: admitted uids only, within the connection limits.

        A failing ``accept`` (EMFILE, ENFILE, ENOBUFS, ENOMEM) or thread start
        never ends the service: the listener leaves epoll for a while
        (doubling from 10 ms to 1 s), and connections wait in the backlog.
        """
        try:
            sock, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._accept_backoff(f"accept: {e}")
            return
        self._accept_wait = ACCEPT_BACKOFF[0]
        try:
            cred = peer_cred(sock)
        except OSError:  # pragma: no cover - a Unix socket always has one
            sock.close()
            return
        lim = self.limits
        why = ""
        if not self.identity.admits(cred):
            why, counter = "not admitted", "refused_uid"
        elif len(self.conns) >= (lim.conns_total or 0):
            why, counter = f"{lim.conns_total} connections in all", "refused_conns"
        elif self._per_uid.get(cred.uid, 0) >= (lim.conns_per_uid or 0):
            why, counter = f"{lim.conns_per_uid} connections of uid {cred.uid}", "refused_conns"
        if why:
            self.counters[counter] += 1
            self._warn(("uid", cred.uid), f"refused uid {cred.uid} (pid {cred.pid}): {why}")
            sock.close()
            return
        sock.setblocking(True)  # the reader blocks in recv; sends say MSG_DONTWAIT
        with self.lock:
            conn = Connection(sock, self._next_ident, cred)
            conn.drained = threading.Condition(self.lock)
            self._next_ident += 1
            self.conns[conn.ident] = conn
            self.by_fd[conn.fd] = conn
            self._per_uid[cred.uid] = self._per_uid.get(cred.uid, 0) + 1
            self.ep.register(conn.fd, _HANGUP)
            conn.reader = threading.Thread(
                target=self._read_loop, args=(conn,), name=f"xengrant-conn-{conn.ident}",
                daemon=True,
            )
        try:
            conn.reader.start()
        except RuntimeError as e:  # can't start new thread
            with self.lock:
                conn.reader = None
                self._schedule_close(conn)
                self._reap()
                self.backing.flush()
            self._accept_backoff(f"thread: {e}")

    def _accept_backoff(self, why: str) -> None:
        """Take the listener off epoll for a while (see :meth:`_accept`)."""
        self.counters["accept_errors"] += 1
        self._warn("accept", f"{why}; accepting again in {self._accept_wait * 1e3:.0f} ms")
        with contextlib.suppress(OSError):
            self.ep.unregister(self.listener.fileno())
        self._accept_again = time.monotonic() + self._accept_wait
        self._accept_wait = min(self._accept_wait * 2, ACCEPT_BACKOFF[1])

    def _read_loop(self, conn: Connection) -> None:
        """A connection's thread: read, handle under the lock, until the socket ends."""
        sock = conn.sock
        fd = conn.fd
        rbuf = memoryview(bytearray(_RECV))
        lock = self.lock
        recv_wait = _cext.recv_wait
        spin_ns = 0  # no request yet: nothing to expect soon
        high = self.limits.out_high
        try:
            while True:
                if conn.pending or conn.out_bytes > high:
                    with lock:  # it stopped reading: read none of its requests
                        self._throttle(conn)
                        if self._to_close:
                            self._reap()
                        self.backing.flush()
                        if conn.dead:
                            break
                ring = conn.ring
                try:
                    # A client that just got a reply often sends the next
                    # request at once (an unmap, then a map): poll for it a
                    # little before sleeping, so nobody has to wake this vCPU
                    # (recv_wait says how, and why it sleeps in poll()).
                    if ring is None:
                        n = recv_wait(fd, rbuf, spin_ns, -1)
                    else:  # the ring first, served in C; -2 when Python must
                        n = self._ring_wait(conn, ring, rbuf, spin_ns)
                except OSError:
                    n = 0
                except Exception as e:  # bogus ring indices (ValueError), MemoryError...
                    self._warn(conn.ident, f"{conn!r}: {e!r}; dropping it")
                    n = 0
                with lock:
                    if conn.dead:
                        break
                    if n:
                        if ring is not None:
                            self._serve_ring(conn, ring)
                        if n > 0 and not conn.dead:
                            self._on_data(conn, rbuf, n)
                        spin_ns = int(self.spin * 1e9)
                    else:
                        self._schedule_close(conn)
                    if self._to_close:
                        self._reap()
                    self.backing.flush()  # before the lock goes: freed frames remapped
                    if conn.dead:
                        break
        finally:
            sock.close()  # only this thread closes it: no recv on a reused fd
            if conn.memory_socket is not None:
                conn.memory_socket.close()
            with lock:  # nor unmaps the ring under a wait; stats read it under the lock
                ring, conn.ring = conn.ring, None
            if ring is not None:
                ring.close()

    def _throttle(self, conn: Connection) -> None:
        """A connection whose replies pile up (caller holds the lock).

        Its thread reads none of its requests while more than
        ``limits.out_high`` bytes wait for it, and goes on (with the requests
        it read already, :attr:`Connection.pending`) once they are below half
        that: the main thread writes them out as the socket takes them.
        """
        high = self.limits.out_high
        low = high // 2
        drained = conn.drained
        while not conn.dead:
            if conn.out_bytes > low and (conn.pending or conn.out_bytes > high):
                if conn.out and not conn.want_write:
                    self._flush(conn)  # what it has not been sent, posted replies too
                    continue
                if drained is None:  # pragma: no cover - a test's Connection
                    return
                if not conn.throttled:
                    conn.throttled = True
                    self.counters["throttled"] += 1
                self.backing.flush()
                self.backing.flush()  # before the lock goes (see Backing.flush)
                drained.wait()  # gives the lock up meanwhile
                continue
            conn.throttled = False
            if not conn.pending:
                return
            frames = conn.pending
            while frames and conn.out_bytes <= high and not conn.dead:
                f = frames.popleft()
                self._request(conn, f.type, f.flags, f.seq, f.payload, f.length, hold=True)
            if conn.flush_due and not conn.want_write and not conn.dead:
                self._flush(conn)
            if self._deliveries or self.xs.events:
                self._dispatch_async()

    def _on_data(self, conn: Connection, rbuf: memoryview, n: int) -> None:
        """Handle the ``n`` bytes just read into ``rbuf`` (caller holds the lock).

        Requests left once ``limits.out_high`` bytes of replies wait for the
        connection are kept in :attr:`Connection.pending` (:meth:`_throttle`).
        """
        dec = conn.decoder
        pos = first_op = 0
        high = self.limits.out_high
        if dec.idle and SERVE_FASTPATH and gnttab_map.FASTPATH and conn.domid is not None:
            pos, first_op = self._serve_fast(conn, rbuf, n)
        if dec.idle:
            # Whole messages are handled where they lie in the receive buffer
            # (their handlers are done with it before the next recv_into).
            unpack = p.HEADER.unpack_from
            limit = p.MAX_PAYLOAD
            while (
                n - pos >= p.HEADER_SIZE and not conn.dead
                and (first_op or conn.out_bytes <= high)
            ):
                length, mtype, flags, seq = unpack(rbuf, pos)
                start = pos + p.HEADER_SIZE
                if length > limit or n - start < length:
                    break
                pos = start + length
                self._request(
                    conn, mtype, flags, seq, rbuf[start:pos], length, hold=True, first_op=first_op
                )
                first_op = 0
        if pos < n and not conn.dead:
            frames = dec.feed(rbuf[pos:n])
            for i, frame in enumerate(frames):
                if conn.dead:
                    break
                if conn.out_bytes > high:
                    conn.pending.extend(frames[i:])
                    break
                self._request(
                    conn, frame.type, frame.flags, frame.seq, frame.payload, frame.length,
                    hold=True,
                )
        if conn.flush_due and not conn.want_write and not conn.dead:
            self._flush(conn)  # every reply this read produced, in one send
        if self._deliveries or self.xs.events:
            self._dispatch_async()

    def _ring_wait(
        self, conn: Connection, ring: ServiceRing, rbuf: memoryview, spin_ns: int
    ) -> int:
        """Wait for the socket or the ring; serve the ring's common case meanwhile.

        ``_cext.ring_serve_wait`` answers the ring's requests under the
        service lock as :meth:`_serve_ring` would, without coming back here,
        while the domain lives and the fast path may run.

        Returns:
            Bytes read (0: closed); -2: the ring has requests for
            :meth:`_serve_ring`.

        Raises:
            OSError: a failed ``recv``.
            ValueError: the ring's indices are bogus.
        """
        d, unmap_ok = self._ring_domain(conn)
        hv = self.hv
        n: int = _cext.ring_serve_wait(
            conn.fd, rbuf, spin_ns, ring.mem, ring.state, ring.svc_kick, ring.cli_kick,
            self.lock, conn, self._to_close, hv.mem, d, hv.domains, hv.machine.refcount,
            unmap_ok,
        )
        return n

    def _ring_domain(self, conn: Connection) -> tuple[DomainState | None, bool]:
        """The domain whose ring requests C may answer (None: none), and whether
        C may take its unmaps (:meth:`_serve_fast`'s conditions)."""
        domid = conn.domid
        d = None if domid is None else self.hv.domains.get(domid)
        if d is None or d.is_dying or not (SERVE_FASTPATH and gnttab_map.FASTPATH):
            return None, False
        return d, not self.notifies.get(d.domid)

    def _serve_ring(self, conn: Connection, ring: ServiceRing) -> None:
        """Answer the requests on ``conn``'s ring (caller holds the lock).

        :func:`_cext.ring_serve` answers on the ring those that succeed the
        common way (as :meth:`_serve_fast` does on the socket); each other
        one goes to :meth:`_request` as the socket message it stands for,
        its reply on the socket, and its ring response says so.  Bogus
        indices drop the connection (as a PV back end drops a front end
        whose ring overflows).
        """
        d, unmap_ok = self._ring_domain(conn)
        hv = self.hv
        try:
            while not conn.dead:
                if d is not None:
                    left = _cext.ring_serve(
                        ring.mem, ring.state, hv.mem, d, hv.domains, hv.machine.refcount,
                        unmap_ok, ring.cli_kick,
                    )
                    if not left:
                        break
                slot = _cext.ring_take(ring.mem, ring.state)
                if slot is None:
                    break
                seq, cmd, flags, payload = ring_request(slot)
                # sent with the next flush even if posted: the client waits for
                # it once the ring says it comes here (a posted failure is
                # raised by the call after the next map, as on the socket)
                flags &= ~p.F_POSTED
                self._request(conn, p.MSG_GNTTAB_OP, flags, seq, payload, len(payload), hold=True)
                _cext.ring_redirect(ring.mem, ring.state, seq, cmd, ring.cli_kick)
        except Exception as e:  # bogus indices (ValueError), or an op without its reply
            self._warn(conn.ident, f"{conn!r}: {e!r}; dropping it")
            self._schedule_close(conn)
            return
        if conn.flush_due and not conn.want_write and not conn.dead:
            self._flush(conn)

    def _serve_fast(self, conn: Connection, rbuf: memoryview, n: int) -> tuple[int, int]:
        """Answer the leading map/unmap messages of ``rbuf[:n]`` in C.

        :func:`_cext.serve_gnttab` takes them while their ops are the common
        success case, replies as :meth:`_gnttab_reply` would (a differential
        test holds it to that), and stops at the first message it does not
        take.  An unmap is taken only when the caller has no unmap notify
        (:meth:`_notify_before_unmap` must see it).  When it takes every
        message of the read, a reply is awaited and nothing but posted
        replies waits to be sent, C sends those and the new replies in one
        go, as :meth:`_flush` would; what the socket did not take is queued.

        Returns:
            ``(pos, first_op)``: where the messages left to :meth:`_request`
            start, and how many ops of the first of them already ran (0: none;
            else its ops from there on are left, as ``do_grant_table_op``
            would go on with them).
        """
        domid = conn.domid
        hv = self.hv
        d = None if domid is None else hv.domains.get(domid)
        if domid is None or d is None or d.is_dying:
            return 0, 0
        out = conn.out
        fd, held = -1, b""
        if not conn.want_write:  # else the main thread writes the backlog first
            if not out:
                fd = conn.fd
            elif len(out) == 1 and not out[0][1]:
                fd, held = conn.fd, out[0][0]
        try:
            pos, replies, answered, first_op, sent = _cext.serve_gnttab(
                hv.mem, rbuf, 0, n, d, hv.domains, hv.machine.refcount,
                not self.notifies.get(domid), fd, held,
            )
        except Exception as e:  # pragma: no cover - MemoryError and the like
            # an op may have run without its reply: the connection cannot go on
            self._warn(conn.ident, f"{conn!r}: GNTTAB_OP fast path failed: {e!r}; dropping it")
            self._schedule_close(conn)
            return n, 0
        if fd >= 0 and answered and pos == n:  # C sent (see serve_gnttab)
            if sent < 0:  # as _flush does when a send fails
                self._schedule_close(conn)
                return int(pos), 0
            if held:
                out.popleft()
                conn.out_bytes -= len(held)
            if sent < len(held) + len(replies):
                self._queue(conn, (held + replies)[sent:], (), 0, True)
        elif replies:
            # all posted: held for the next send, as _queue holds a posted reply
            self._queue(conn, replies, (), 0 if answered else p.F_POSTED, True)
        return int(pos), int(first_op)

    def _send(self, conn: Connection, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Queue ``data`` for ``conn`` and send what is queued (posted replies too)."""
        self._queue(conn, data, fds, 0, False)

    def _flush(self, conn: Connection) -> None:
        conn.flush_due = False
        out = conn.out
        sock = conn.sock
        try:
            while out:
                data, fds = out[0]
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    n = sock.sendmsg([data], anc, socket.MSG_DONTWAIT)
                else:
                    if len(out) > 1:
                        chunks = []
                        size = 0
                        while out and not out[0][1] and size < _RECV:
                            chunk = out.popleft()[0]
                            chunks.append(chunk)
                            size += len(chunk)
                        data = b"".join(chunks)
                        out.appendleft((data, ()))
                    n = sock.send(data, socket.MSG_DONTWAIT)
                conn.out_bytes -= n
                if n < len(data):
                    out[0] = (data[n:], ())
                    break
                out.popleft()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._schedule_close(conn)
            return
        want = bool(out)
        if want != conn.want_write:
            # the main thread writes the rest when the socket has room
            conn.want_write = want
            self.ep.modify(conn.fd, conn.watch | (_EPOLLOUT if want else 0))
        if conn.throttled and conn.out_bytes <= self.limits.out_high // 2:
            assert conn.drained is not None
            conn.drained.notify_all()

    def _schedule_close(self, conn: Connection) -> None:
        if not conn.dead:
            conn.dead = True
            self._to_close.append(conn)
            if conn.drained is not None:
                conn.drained.notify_all()  # a throttled reader: stop waiting

    def _reap(self) -> None:
        while self._to_close:
            conn = self._to_close.pop()
            if self.conns.pop(conn.ident, None) is not None:
                left = self._per_uid.get(conn.cred.uid, 1) - 1
                if left > 0:
                    self._per_uid[conn.cred.uid] = left
                else:
                    self._per_uid.pop(conn.cred.uid, None)
            self._warn.forget(conn.ident)
            if self.by_fd.pop(conn.fd, None) is not None:
                with contextlib.suppress(Exception):
                    self.ep.unregister(conn.fd)
            # wake its reader (it closes the socket): closing here could
            # let the fd be reused under a recv still running on it
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            if conn.reader is None:  # never served by a thread (a test's Server)
                conn.sock.close()
                if conn.memory_socket is not None:
                    conn.memory_socket.close()
                if conn.ring is not None:
                    conn.ring.close()
            self._xs_close(conn.ident)
            if conn.domid is not None:
                self._destroy(conn.domid)
            for domid in sorted(conn.created):
                if domid not in self.bound:
                    self._destroy(domid)
            conn.created.clear()
            self._dispatch_async()

    # ------------------------------------------------------------ requests
    def _handle(self, conn: Connection, frame: p.Frame) -> None:
        """Answer one decoded request (sent at once)."""
        self._request(conn, frame.type, frame.flags, frame.seq, frame.payload, frame.length)

    def _request(
        self,
        conn: Connection,
        mtype: int,
        flags: int,
        seq: int,
        payload: Payload | None,
        length: int,
        hold: bool = False,
        first_op: int = 0,
    ) -> None:
        """Answer one request: its reply, or an error reply, is queued for ``conn``.

        Args:
            conn: the connection it came on.
            mtype, flags, seq: its header.
            payload: its payload (None: oversized, skipped); a memoryview
                is only valid during this call.
            length: the payload length the header announced.
            hold: leave the reply queued; the caller flushes (once per read).
                A posted request's reply (``F_POSTED``) is queued without
                asking for a flush either way.
            first_op: a GNTTAB_OP whose ops before this one already ran
                (:meth:`_serve_fast`): run the rest.
        """
        domid = conn.domid
        if (
            mtype == p.MSG_GNTTAB_OP
            and domid is not None
            and (flags == 0 or flags == p.F_POSTED)
            and payload is not None
        ):
            # the hot path: no table lookup, the reply built in one piece
            try:
                reply = self._gnttab_reply(domid, payload, seq, first_op)
            except Exception as e:
                reply = self._error_reply(conn, mtype, seq, e)
            self._queue(conn, reply, (), flags, hold)
            return
        self._pending_fds = ()
        if mtype in p.ONE_WAY and not flags & ~p.F_POSTED and payload is not None:
            # one-way: never answered, not even with an error (nobody waits)
            if domid is not None and len(payload) == 4:
                (port,) = p.U32.unpack(payload)
                self._deliveries += self.ev.unmask(domid, port)
            return
        try:
            entry = self.handlers.get(mtype)
            if flags & ~p.F_POSTED or entry is None or payload is None:
                p.check_request(mtype, flags, payload, length)
                raise p.ProtocolError(errno.ENOSYS, f"request type {mtype} has no handler")
            handler, needs_domain = entry
            if needs_domain and domid is None:
                if conn.destroyed is not None:
                    raise HypercallError(
                        p.MSG_NAMES.get(mtype, str(mtype)).lower(), errno.ESRCH,
                        f"d{conn.destroyed} was destroyed by the toolstack",
                    )
                raise p.ProtocolError(errno.EPROTO, "no domain: CREATE or ATTACH first")
            if type(payload) is not bytes:
                payload = bytes(payload)
            body = handler(conn, payload)
            if len(body) > p.MAX_PAYLOAD:  # pragma: no cover - replies mirror bounded requests
                self._warn(conn.ident, f"{conn!r}: reply of {len(body)} bytes over the limit")
            reply = p.HEADER.pack(len(body), mtype, p.F_REPLY, seq) + body
        except Exception as e:
            reply = self._error_reply(conn, mtype, seq, e)
        fds, self._pending_fds = self._pending_fds, ()
        self._queue(conn, reply, fds, flags, hold)

    def _error_reply(self, conn: Connection, mtype: int, seq: int, e: Exception) -> bytes:
        """The error reply for a request whose handler raised ``e`` (logged if unexpected)."""
        if isinstance(e, p.ProtocolError):
            self._warn(conn.ident, f"{conn!r}: {p.MSG_NAMES.get(mtype, mtype)}: {e}")
            return p.encode_error(mtype, seq, e.errno, str(e))
        if isinstance(e, (XenStoreError, EvtchnError)):
            return p.encode_error(mtype, seq, e.errno or errno.EIO, e.detail)
        if isinstance(e, HypercallError):
            return p.encode_error(mtype, seq, e.errno or errno.EIO, str(e))
        # never let a request take the service down
        self._warn(
            conn.ident,
            f"{conn!r}: {p.MSG_NAMES.get(mtype, mtype)} failed:\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__))
        )
        return p.encode_error(mtype, seq, errno.EIO, f"{type(e).__name__}: {e}")

    def _queue(
        self, conn: Connection, reply: bytes, fds: tuple[int, ...], flags: int, hold: bool
    ) -> None:
        """Queue a reply; send now unless ``hold``; a posted one waits for the next send."""
        if conn.dead:
            return
        conn.out.append((reply, fds))
        conn.out_bytes += len(reply)
        if conn.out_bytes > self.limits.out_max:  # async messages piled on a throttled one
            self._warn(conn.ident, f"{conn!r}: {conn.out_bytes} bytes unread, dropping it")
            self.counters["dropped_unread"] += 1
            self._schedule_close(conn)
            return
        if flags == p.F_POSTED:
            return
        conn.flush_due = True
        if not hold and not conn.want_write:
            self._flush(conn)

    def _dispatch_async(self) -> None:
        """Send queued event-channel upcalls and watch events."""
        deliveries, self._deliveries = self._deliveries, []
        for domid, port in deliveries:
            conn = self.bound.get(domid)
            if conn is not None:
                self._send(conn, p.encode(p.MSG_EVENT, p.F_ASYNC, 0, p.U32.pack(port)))
        for ev in self.xs.drain_events():
            target = self.conns.get(ev.conn) if isinstance(ev.conn, int) else None
            if target is not None:
                # the XS_WATCH_EVENT's payload (its xsd_sockmsg header is always 15, 0, 0, len)
                payload = p.pack_strings(ev.path, ev.token)
                self._send(target, p.encode(p.MSG_WATCH_EVENT, p.F_ASYNC, 0, payload))
            elif self.xenstored is not None:
                self.xenstored.deliver(ev.conn, ev.path, ev.token)

    @staticmethod
    def _ok(body: bytes = b"") -> bytes:
        return p.STATUS.pack(0) + body

    def _dom(self, conn: Connection) -> int:
        assert conn.domid is not None
        return conn.domid

    def _delta(self, domid: int, gfns: Sequence[int] | None) -> bytes:
        """The caller's p2m entries for ``gfns`` as they are now (None: all of them).

        Each handler names the gfns its call can change, so the domain's p2m
        stays a plain dict the core (and its C fast paths) can use as is.
        The entries are looked up and packed by C loops (``map``, ``array``).
        """
        d = self.hv.domains.get(domid)
        if d is None or (gfns is not None and not gfns):
            return _NO_DELTA
        p2m = d.p2m
        if gfns is None:
            return p.pack_p2m(list(p2m), list(p2m.values()), full=True)
        return p.pack_p2m(gfns, list(map(p2m.get, gfns, repeat(p.P2M_GONE))))

    # ------------------------------------------------------------ domains
    def _ping(self, conn: Connection, payload: bytes) -> bytes:
        return self._ok(payload)

    def _new_domain(self, conn: Connection, payload: bytes, by_dom0: bool) -> tuple[int, bool]:
        """Create a domain from a CREATE or DOMCTL_CREATE payload.

        Who picks the domid (``XEN_DOMCTL_createdomain``): dom0 may name one;
        anyone else gets the next free one, handed out incrementally and
        reused only after the ids wrap (:meth:`Hypervisor._free_domid`, as
        ``do_domctl``'s ``rover`` does in xen/common/domctl.c), so a process
        cannot take the id of a domain that just died (and the grants meant
        for it).  Domid 0 takes the dom0 token and the service's uid, once.

        Raises:
            HypercallError: EPERM (a domid not to be had), EINVAL, ENOMEM.
        """
        head = payload[: p.CREATE_REQ.size]
        version, domid, flags, mgf, mmf, max_pages = p.unpack_exact(p.CREATE_REQ, head, "CREATE")
        extra = payload[p.CREATE_REQ.size :]
        if version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(errno.EPROTONOSUPPORT, f"protocol version {version}")
        if flags & ~p.DOMFLAG_PV:
            raise p.ProtocolError(errno.EINVAL, f"unknown domain flags {flags:#x}")
        if domid < -1 or mgf < -1 or mmf < -1 or max_pages < -1:
            raise p.ProtocolError(errno.EINVAL, "negative domain parameter")
        if extra and (by_dom0 or domid != 0 or len(extra) != p.SECRET_SIZE):
            raise p.ProtocolError(errno.EBADMSG, f"CREATE: {len(payload)} bytes")
        if domid == 0:
            if self.identity.dom0_claimed:
                raise HypercallError("createdomain", errno.EPERM, "dom0 was claimed already")
            if not self.identity.is_owner(conn.cred, extra):
                raise HypercallError(
                    "createdomain", errno.EPERM,
                    "dom0 takes the service's uid and its token",
                )
        elif domid != -1 and not by_dom0:
            raise HypercallError(
                "createdomain", errno.EPERM, f"d{conn.domid} may not choose a domid ({domid})"
            )
        pv = bool(flags & p.DOMFLAG_PV)
        max_pages, mgf, mmf = self.limits.domain(max_pages, mgf, mmf)
        new = self.hv.create_domain(
            None if domid == -1 else domid,
            pv=pv,
            max_grant_frames=mgf,
            max_maptrack_frames=mmf,
            max_pages=max_pages,
        )
        if new == 0:
            self.identity.dom0_claimed = True
        self.ev.add_domain(new)
        self.xs.make_domain_home(new)
        self.xs_domains.introduced.add(new)
        self.xs.introduce_domain(new)
        return new, pv

    def _bind(self, conn: Connection, domid: int) -> bytes:
        d = self.hv.domains[domid]
        conn.domid = domid
        self.bound[domid] = conn
        side = self.backing.open_side(domid)
        if conn.memory_socket is not None:
            conn.memory_socket.close()
        conn.memory_socket = side
        self._pending_fds = (side.fileno(),)
        self._deliveries += self.ev.redeliver(domid)
        body = p.DOMAIN_REPLY.pack(
            p.PROTOCOL_VERSION, domid, p.DOMFLAG_PV if d.pv else 0, self.xen.nr_frames
        )
        return self._ok(body + self._delta(domid, None))  # the p2m so far (PV: table frames)

    def _check_unbound(self, conn: Connection) -> None:
        if conn.domid is not None:
            raise p.ProtocolError(errno.EISCONN, f"already bound to d{conn.domid}")
        if conn.destroyed is not None:
            raise HypercallError(
                "connect", errno.ESRCH, f"d{conn.destroyed} was destroyed by the toolstack"
            )

    def _create(self, conn: Connection, payload: bytes) -> bytes:
        self._check_unbound(conn)
        domid, _pv = self._new_domain(conn, payload, False)
        return self._bind(conn, domid)

    def _attach(self, conn: Connection, payload: bytes) -> bytes:
        """ATTACH: take a domain dom0 made, with the secret DOMCTL_CREATE gave it."""
        self._check_unbound(conn)
        if len(payload) != p.ATTACH_REQ.size + p.SECRET_SIZE:
            raise p.ProtocolError(
                errno.EBADMSG,
                f"ATTACH: {len(payload)} bytes, want {p.ATTACH_REQ.size + p.SECRET_SIZE}",
            )
        version, domid = p.ATTACH_REQ.unpack_from(payload)
        if version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(errno.EPROTONOSUPPORT, f"protocol version {version}")
        if not self.identity.check_secret(domid, payload[p.ATTACH_REQ.size :]):
            # the same answer whether d<domid> exists or not: nothing to learn
            raise HypercallError("attach", errno.EACCES, f"d{domid}: not its secret")
        d = self.hv.domains.get(domid)
        if d is None or d.is_dying:  # pragma: no cover - the secret goes with the domain
            raise HypercallError("attach", errno.ESRCH, f"no domain {domid}")
        if domid in self.bound:  # pragma: no cover - the secret goes at the first attach
            raise HypercallError("attach", errno.EBUSY, f"d{domid} is attached already")
        self.identity.forget(domid)
        for other in self.conns.values():
            other.created.discard(domid)
        return self._bind(conn, domid)

    def _require_privileged(self, conn: Connection, op: str) -> None:
        if not self._privileged(self._dom(conn)):
            raise HypercallError(op, errno.EPERM, f"d{conn.domid} is not privileged")

    def _domctl_create(self, conn: Connection, payload: bytes) -> bytes:
        self._require_privileged(conn, "createdomain")
        domid, _pv = self._new_domain(conn, payload, True)
        conn.created.add(domid)
        return self._ok(p.DOMID.pack(domid) + self.identity.new_secret(domid))

    def _domctl_destroy(self, conn: Connection, payload: bytes) -> bytes:
        self._require_privileged(conn, "destroydomain")
        (domid,) = p.unpack_exact(p.DOMID, payload, "DOMCTL_DESTROY")
        d = self.hv.domains.get(domid)
        if d is None or d.is_dying:
            raise HypercallError("destroydomain", errno.ESRCH, f"no domain {domid}")
        self._destroy(domid)
        return self._ok()

    def _close_domain(self, conn: Connection, payload: bytes) -> bytes:
        """The client is leaving: destroy its domain now, as its disconnect would."""
        self._destroy(self._dom(conn))
        for domid in sorted(conn.created):
            if domid not in self.bound:
                self._destroy(domid)
        conn.created.clear()
        return self._ok()

    def _destroy(self, domid: int) -> None:
        """Kill a domain: notifies, mappings, ports, watches, xenstore home, @releaseDomain."""
        d = self.hv.domains.get(domid)
        conn = self.bound.pop(domid, None)
        self.identity.forget(domid)
        if conn is not None:
            conn.domid = None
            conn.destroyed = domid  # its next call hears why
            self._xs_close(conn.ident)
        if d is None or d.is_dying:
            return
        sends = self._fire_all_notifies(d)
        self.hv.kill_domain(domid)
        # domain_relinquish_resources is preemptible (-ERESTART): so is this
        budget = self.limits.preempt_teardown
        while not self.hv.relinquish_resources(d, budget):
            self._preempt("teardown")
        for port in sends:
            with contextlib.suppress(EvtchnError):
                self._deliveries += self.ev.send(domid, port)
        self._deliveries += self.ev.destroy_domain(domid)
        with contextlib.suppress(XenStoreError):
            self.xs.rm(0, f"/local/domain/{domid}")
        self.xs_domains.introduced.discard(domid)
        self.xs.release_domain(domid)
        self.backing.close_side(domid)
        self._dispatch_async()

    # ------------------------------------------------------------ memory
    def _gnttab_op(self, conn: Connection, payload: Payload) -> bytes:
        """GNTTAB_OP as a table handler: the reply's payload (``_request`` takes
        the hot path, :meth:`_gnttab_reply`, whenever it can)."""
        return self._gnttab_reply(self._dom(conn), payload, 0)[p.HEADER_SIZE :]

    def _gnttab_reply(self, domid: int, payload: Payload, seq: int, first_op: int = 0) -> bytes:
        """``HYPERVISOR_grant_table_op``: the whole reply message.

        ``payload`` is bytes or a writable view of the receive buffer: then
        the ops are the hypercall's ``uop`` in place, and its OUT fields are
        copied once, into the reply.  ``first_op`` > 0 (map or unmap only):
        the ops before it already ran (:meth:`_serve_fast`); the hypercall
        goes on from there, and the reply covers every op.

        Raises:
            ProtocolError: EBADMSG, no room for the command and count.
        """
        if len(payload) < p.GNTTAB_REQ.size:
            raise p.ProtocolError(errno.EBADMSG, "GNTTAB_OP: short header")
        cmd, count = p.GNTTAB_REQ.unpack_from(payload)
        if type(payload) is memoryview and not payload.readonly:
            uop = payload[p.GNTTAB_REQ.size :]
        else:
            uop = memoryview(bytearray(payload[p.GNTTAB_REQ.size :]))
        ops, left = uop, count
        if first_op:  # do_grant_table_op goes on with the ops left
            ops = uop[first_op * _ADDR_FIELDS[cmd][0] :]
            left = count - first_op
        notes = self.notifies.get(domid)
        fired: list[tuple[int, Notify]] = []
        if notes and cmd in (gt.GNTTABOP_unmap_grant_ref, gt.GNTTABOP_unmap_and_replace):
            fired = self._notify_before_unmap(domid, notes, ops, left)
        if count == 1 and cmd in _ONE_GFN and len(uop) >= 24:
            touched: list[int] | None = [_U64.unpack_from(uop)[0] >> 12]
        else:
            touched = _gfns_touched(cmd, uop, count)
        xen = self.xen
        before = xen.log_count
        if left > self.limits.preempt_ops and cmd in _PREEMPTIBLE:
            rc = self._preemptible_op(domid, cmd, ops, left)
        else:
            rc = self.hv.grant_table_op(domid, cmd, ops, left)
        tail = _NO_REASONS
        if xen.log_count != before:
            fresh = xen.debug_log[-min(xen.log_count - before, len(xen.debug_log)) :]
            tail = p.pack_reasons([r for dd, _op, _st, r in fresh if dd == domid])
        if fired:
            self._notify_after_unmap(domid, notes or {}, ops, fired)
        if touched is not None and len(touched) == 1:
            d = self.hv.domains.get(domid)
            gfn = touched[0]
            mfn, p2mt = p.P2M_GONE if d is None else d.p2m.get(gfn, p.P2M_GONE)
            delta = _ONE_DELTA.pack(1, gfn, mfn, p2mt)
        else:
            delta = self._delta(domid, touched)
        if cmd not in gt.GNTTABOP_STRUCTS:  # an unknown command: -ENOSYS and nothing else
            uop = uop[:0]
        size = len(uop)
        return b"".join((
            _GNTTAB_REPLY.pack(12 + size + len(delta) + len(tail), p.MSG_GNTTAB_OP, p.F_REPLY,
                               seq, 0, rc, size),
            uop, delta, tail,
        ))

    def _preemptible_op(self, domid: int, cmd: int, ops: memoryview, count: int) -> int:
        """A long batch, ``limits.preempt_ops`` ops at a time, the lock given up between.

        As ``do_grant_table_op``: between two ops it checks
        ``hypercall_preempt_check()`` and, if others wait, returns to the
        guest with a continuation for the ops left (xen/common/grant_table.c).
        What others do meanwhile is seen by the ops after, as in Xen.
        """
        size = _OP_SIZE[cmd]
        if len(ops) < size * count:  # -EFAULT, as the whole call would
            return self.hv.grant_table_op(domid, cmd, ops, count)
        step = self.limits.preempt_ops
        self.counters["preempted_batches"] += 1
        done = 0
        while True:
            k = min(step, count - done)
            rc = self.hv.grant_table_op(domid, cmd, ops[done * size : (done + k) * size], k)
            done += k
            if rc < 0 or done >= count:
                return rc
            self._preempt("batch")

    def _preempt(self, kind: str) -> None:
        """Give the service lock up for a moment (the caller holds it; it is held again
        on return): a preemption point of a long batch or a domain's teardown.

        Python's lock is not fair (the releaser may take it straight back), so
        the thread pauses :data:`PREEMPT_PAUSE` seconds with it released: a
        thread waiting for the lock has been woken and takes it meanwhile.
        """
        self.counters[f"{kind}_yields"] += 1
        self.backing.flush()  # frames freed so far remapped before anyone else runs
        self.lock.release()
        try:
            if self.on_preempt is not None:
                self.on_preempt(kind)
            else:
                time.sleep(PREEMPT_PAUSE)
        finally:
            self.lock.acquire()

    def _populate(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        gfns = p.unpack_i64s(payload, "POPULATE")
        done = self.hv.populate_physmap(domid, gfns)
        return self._ok(p.U32.pack(len(done)) + p.pack_i64s(done) + self._delta(domid, done))

    def _decrease(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        gfns = p.unpack_i64s(payload, "DECREASE")
        n = self.hv.decrease_reservation(domid, gfns)
        return self._ok(p.U32.pack(n) + self._delta(domid, gfns[: n + 1]))

    def _add_to_physmap(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        space, idx, gpfn = p.unpack_exact(p.ADD_TO_PHYSMAP_REQ, payload, "ADD_TO_PHYSMAP")
        g = self.hv.domains[domid].gt
        # the frame's previous gfn loses it (gnttab_map_frame moves, not copies)
        frames = g.status_gfn if idx & XENMAPIDX_grant_table_status else g.shared_gfn
        i = idx & ~XENMAPIDX_grant_table_status
        touched = [gpfn] + ([frames[i]] if 0 <= i < len(frames) else [])
        rc = self.hv.add_to_physmap(domid, space, idx, gpfn)
        return self._ok(p.I32.pack(rc) + self._delta(domid, touched))

    def _translate(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        if len(payload) < 4:
            raise p.ProtocolError(errno.EBADMSG, "TRANSLATE: short")
        (writable,) = p.U32.unpack_from(payload)
        gfns = p.unpack_i64s(payload[4:], "TRANSLATE")
        mfns = self.hv.translate(domid, gfns, bool(writable))
        p2m = self.hv.domains[domid].p2m
        body = b"".join(p.TRANSLATE_ENTRY.pack(m, p2m[g][1]) for g, m in zip(gfns, mfns))
        return self._ok(body + self._delta(domid, gfns))

    def _ring_setup(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_RING_SETUP``: make the connection's request ring (service/ring.py).

        The reply brings the page and the two eventfds (SCM_RIGHTS); the
        connection's thread serves the ring from its next wait on.
        """
        if payload:
            raise p.ProtocolError(errno.EBADMSG, "RING_SETUP: no payload expected")
        if conn.ring is not None:
            raise HypercallError("ring_setup", errno.EEXIST, "this connection has its ring")
        try:
            conn.ring = ServiceRing()
        except OSError as e:
            raise HypercallError("ring_setup", e.errno or errno.ENOMEM, str(e)) from None
        self._pending_fds = conn.ring.fds()
        return self._ok()

    # ------------------------------------------------------ memory files
    def _reach(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_REACH``: the files backing gfns of the caller (Backing.reach)."""
        if len(payload) < 4:
            raise p.ProtocolError(errno.EBADMSG, "REACH: short")
        (writable,) = p.U32.unpack_from(payload)
        gfns = p.unpack_i64s(payload[4:], "REACH")
        d = self.hv.domains[self._dom(conn)]
        return self._ok(p.U32.pack(self.backing.reach(self.hv.domains, d, gfns, bool(writable))))

    def _grant_prepare(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_GRANT_PREPARE``: pages about to be granted get files of their own."""
        if len(payload) < 4:
            raise p.ProtocolError(errno.EBADMSG, "GRANT_PREPARE: short")
        (grantee,) = p.U32.unpack_from(payload)
        gfns = p.unpack_i64s(payload[4:], "GRANT_PREPARE")
        d = self.hv.domains[self._dom(conn)]
        return self._ok(p.U32.pack(self.backing.prepare_grant(d, gfns, grantee)))

    def _grant_end(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_GRANT_END``: pages whose grant ended move off files a peer holds."""
        gfns = p.unpack_i64s(payload, "GRANT_END")
        d = self.hv.domains[self._dom(conn)]
        return self._ok(p.U32.pack(self.backing.end_grant(d, gfns)))

    def _memory_overflow(self, domid: int) -> None:
        """A domain's memory socket is full (it stopped reading): drop its connection."""
        conn = self.bound.get(domid)
        if conn is not None:
            self.log(f"{conn!r}: memory socket full, dropping it")
            self._schedule_close(conn)

    # ------------------------------------------------------- unmap notify
    def _notify_set(self, conn: Connection, payload: bytes) -> bytes:
        """``IOCTL_GNTDEV/GNTALLOC_SET_UNMAP_NOTIFY`` (drivers/xen/gntdev.c, gntalloc.c)."""
        domid = self._dom(conn)
        kind, key, offset, action, port = p.unpack_exact(
            p.NOTIFY_SET_REQ, payload, "UNMAP_NOTIFY_SET"
        )
        if action & ~(UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT):
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"action {action:#x}")
        if offset >= PAGE_SIZE:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"offset {offset}")
        if action & UNMAP_NOTIFY_SEND_EVENT:
            ports = self.ev.domains.get(domid)
            c = ports.ports.get(port) if ports is not None else None
            if c is None or c.state not in (ECS_UNBOUND, ECS_INTERDOMAIN):
                raise HypercallError("set_unmap_notify", errno.EINVAL, f"port {port} unbound")
        d = self.hv.domains[domid]
        note = Notify(kind, key, offset, action, port)
        if kind == p.NOTIFY_GNTDEV:
            m = d.maptrack.lookup(key)
            if m is None or not m.flags:
                raise HypercallError("set_unmap_notify", errno.ENOENT, f"no mapping {key}")
            if action & UNMAP_NOTIFY_CLEAR_BYTE and m.flags & gt.GNTMAP_readonly:
                raise HypercallError("set_unmap_notify", errno.EINVAL, "read-only mapping")
        elif kind == p.NOTIFY_GNTALLOC:
            note.mfn = self._granted_mfn(d, key)
        else:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"kind {kind}")
        self.notifies.setdefault(domid, {})[(kind, key)] = note
        return self._ok()

    def _granted_mfn(self, d: DomainState, ref: int) -> int:
        g = d.gt
        if not 0 <= ref < g.nr_grant_entries:
            raise HypercallError("set_unmap_notify", errno.ENOENT, f"ref {ref}")
        mem = self.hv.mem
        off = g.entry_offset(ref)
        flags = int.from_bytes(mem[off : off + 2], "little")
        if flags & gt.GTF_type_mask != gt.GTF_permit_access:
            raise HypercallError("set_unmap_notify", errno.ENOENT, f"ref {ref} not granted")
        if g.version == 1:
            frame = int.from_bytes(mem[off + 4 : off + 8], "little")
        else:
            frame = int.from_bytes(mem[off + 8 : off + 16], "little")
        ent = d.p2m.get(frame)
        if ent is None or ent[1] != P2M_RAM_RW:
            raise HypercallError("set_unmap_notify", errno.ENOENT, f"ref {ref}: no page")
        return ent[0]

    def _notify_fire(self, conn: Connection, payload: bytes) -> bytes:
        """gntalloc's ``__del_gref``: the sharer lets a page go."""
        domid = self._dom(conn)
        kind, key = p.unpack_exact(p.NOTIFY_FIRE_REQ, payload, "UNMAP_NOTIFY_FIRE")
        notes = self.notifies.get(domid, {})
        note = notes.get((kind, key)) if kind == p.NOTIFY_GNTALLOC else None
        if note is None:
            raise HypercallError("unmap_notify", errno.ENOENT, f"no notify for {kind}/{key}")
        del notes[(kind, key)]
        if not notes:
            self.notifies.pop(domid, None)
        self._clear_byte(domid, note)
        self._notify_send(domid, note)
        return self._ok()

    def _clear_byte(self, domid: int, note: Notify) -> None:
        if not note.action & UNMAP_NOTIFY_CLEAR_BYTE:
            return
        mfn = note.mfn
        if note.kind == p.NOTIFY_GNTDEV:
            d = self.hv.domains.get(domid)
            m = d.maptrack.lookup(note.key) if d is not None else None
            if m is None or not m.flags or m.flags & gt.GNTMAP_readonly:
                return
            mfn = m.mfn
        elif self.hv.machine.owner[mfn] != domid:
            return
        self.hv.mem[mfn * PAGE_SIZE + note.offset] = 0

    def _notify_send(self, domid: int, note: Notify) -> None:
        if note.action & UNMAP_NOTIFY_SEND_EVENT:
            with contextlib.suppress(EvtchnError):
                self._deliveries += self.ev.send(domid, note.port)

    def _notify_before_unmap(
        self, domid: int, notes: dict[tuple[int, int], Notify], uop: memoryview, count: int
    ) -> list[tuple[int, Notify]]:
        """gntdev's ``unmap_grant_pages``: clear the byte while still mapped."""
        fired = []
        n = min(max(count, 0), len(uop) // _UNMAP_SIZE)
        for i in range(n):
            (handle,) = _UNMAP_HANDLE.unpack_from(uop, i * _UNMAP_SIZE + _UNMAP_HANDLE_OFF)
            note = notes.get((p.NOTIFY_GNTDEV, handle))
            if note is not None:
                self._clear_byte(domid, note)
                fired.append((i, note))
        return fired

    def _notify_after_unmap(
        self,
        domid: int,
        notes: dict[tuple[int, int], Notify],
        uop: memoryview,
        fired: list[tuple[int, Notify]],
    ) -> None:
        """... then send the event once the page is unmapped."""
        for i, note in fired:
            (st,) = _UNMAP_STATUS.unpack_from(uop, i * _UNMAP_SIZE + _UNMAP_STATUS_OFF)
            if st != gt.GNTST_okay:
                continue
            notes.pop((note.kind, note.key), None)
            self._notify_send(domid, note)
        if not notes:
            self.notifies.pop(domid, None)

    def _fire_all_notifies(self, d: DomainState) -> list[int]:
        """A dying domain's files close: clear every byte now, return the ports to notify."""
        notes = self.notifies.pop(d.domid, {})
        ports = []
        for note in notes.values():
            self._clear_byte(d.domid, note)
            if note.action & UNMAP_NOTIFY_SEND_EVENT:
                ports.append(note.port)
        return ports

    # ----------------------------------------------------- event channels
    def _ev_alloc_unbound(self, conn: Connection, payload: bytes) -> bytes:
        dom, remote = p.unpack_exact(p.TWO_U32, payload, "EVTCHN_ALLOC_UNBOUND")
        port = self.ev.alloc_unbound(self._dom(conn), dom, remote)
        return self._ok(p.U32.pack(port))

    def _ev_bind_interdomain(self, conn: Connection, payload: bytes) -> bytes:
        remote, rport = p.unpack_exact(p.TWO_U32, payload, "EVTCHN_BIND_INTERDOMAIN")
        port, deliveries = self.ev.bind_interdomain(self._dom(conn), remote, rport)
        self._deliveries += deliveries
        return self._ok(p.U32.pack(port))

    def _ev_send(self, conn: Connection, payload: bytes) -> bytes:
        (port,) = p.unpack_exact(p.U32, payload, "EVTCHN_SEND")
        self._deliveries += self.ev.send(self._dom(conn), port)
        return self._ok()

    def _ev_close(self, conn: Connection, payload: bytes) -> bytes:
        (port,) = p.unpack_exact(p.U32, payload, "EVTCHN_CLOSE")
        domid = self._dom(conn)
        self.ev.close(domid, port)
        notes = self.notifies.get(domid)
        if notes:  # the evtchn reference gntdev/gntalloc held is dropped with the notify
            for key, note in list(notes.items()):
                if note.action & UNMAP_NOTIFY_SEND_EVENT and note.port == port:
                    note.action &= ~UNMAP_NOTIFY_SEND_EVENT
                    if not note.action:
                        del notes[key]
        return self._ok()

    def _ev_status(self, conn: Connection, payload: bytes) -> bytes:
        dom, port = p.unpack_exact(p.TWO_U32, payload, "EVTCHN_STATUS")
        state, rdom, rport = self.ev.status(self._dom(conn), dom, port)
        return self._ok(p.EVTCHN_STATUS_REPLY.pack(state, rdom, rport))

    # ------------------------------------------------------------ xenstore
    def _xs_session(self, conn: Connection) -> Session:
        """The connection's xs_wire session (made on its first xenstore request)."""
        sess = self.xs_sessions.get(conn.ident)
        if sess is None or sess.domid != conn.domid:
            if sess is not None:
                sess.close()
            sess = Session(self.xs, self._dom(conn), conn.ident, domains=self.xs_domains)
            self.xs_sessions[conn.ident] = sess
        return sess

    def _xs_close(self, ident: int) -> None:
        """A connection or its domain went: its watches and transactions go."""
        sess = self.xs_sessions.pop(ident, None)
        if sess is not None:
            sess.close()
        self.xs.release_conn(ident)

    def _xs_wire(self, conn: Connection, payload: bytes) -> bytes:
        """XS_WIRE: one xs_wire message in, xenstored's reply message out."""
        if len(payload) < xsw.HEADER_SIZE:
            raise p.ProtocolError(errno.EPROTO, f"XS_WIRE: {len(payload)} bytes, no xsd_sockmsg")
        mtype, req_id, tx_id, length = xsw.HEADER.unpack_from(payload)
        if length > xsw.XENSTORE_PAYLOAD_MAX or length != len(payload) - xsw.HEADER_SIZE:
            # xenstored drops such a connection; this one carries more than
            # xenstore, so only the message is refused
            raise p.ProtocolError(errno.EPROTO, f"XS_WIRE: len {length} with "
                                  f"{len(payload) - xsw.HEADER_SIZE} bytes of payload")
        msg = xsw.Message(mtype, req_id, tx_id, payload[xsw.HEADER_SIZE :])
        return self._ok(self._xs_session(conn).handle(msg))

    def _xs_call(self, conn: Connection, xs_type: int, payload: bytes) -> bytes:
        """MSG_XS_READ ...: the payload alone, run by the same session."""
        if len(payload) > xsw.XENSTORE_PAYLOAD_MAX:
            raise XenStoreError(errno.E2BIG, f"{len(payload)} bytes")
        reply = self._xs_session(conn).handle(xsw.Message(xs_type, 0, 0, payload))
        rtype = xsw.HEADER.unpack_from(reply)[0]
        body = reply[xsw.HEADER_SIZE :]
        if rtype == xsw.XS_ERROR:
            raise XenStoreError(xsw.errno_of(body), f"XS_{xsw.XS_NAMES[xs_type]}")
        return self._ok(body)

    def _xs_read(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_READ, payload)

    def _xs_write(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_WRITE, payload)

    def _xs_mkdir(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_MKDIR, payload)

    def _xs_rm(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_RM, payload)

    def _xs_directory(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_DIRECTORY, payload)

    def _xs_get_perms(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_GET_PERMS, payload)

    def _xs_set_perms(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_SET_PERMS, payload)

    def _xs_watch(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_WATCH, payload)

    def _xs_unwatch(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_UNWATCH, payload)

    def _xs_get_domain_path(self, conn: Connection, payload: bytes) -> bytes:
        return self._xs_call(conn, xsw.XS_GET_DOMAIN_PATH, payload)

    # ------------------------------------------------------------ inspect
    def snapshot(self) -> dict[str, Any]:
        """Counts and tables, JSON-ready (what STATS answers)."""
        doms: dict[str, Any] = {}
        for d in self.hv.iter_domains():
            doms[str(d.domid)] = {
                "pv": d.pv,
                "dying": d.is_dying,
                "privileged": d.privileged,
                "attached": d.domid in self.bound,
                "tot_pages": d.tot_pages,
                "p2m": len(d.p2m),
                "nr_grant_frames": d.gt.nr_grant_frames,
                "version": d.gt.version,
                "active": {str(r): a.pin for r, a in sorted(d.gt.active.items())},
                "maptrack_in_use": d.maptrack.in_use,
                "ring": self._ring_snapshot(d.domid),
            }
        return {
            "nr_frames": self.hv.machine.nr_frames,
            "free_frames": self.hv.machine.free_frames,
            "domains": doms,
            "evtchn": {str(k): v for k, v in self.ev.snapshot().items()},
            "xenstore": self.xs.dump(),
            "xenstore_nodes": self.xs.nodes,
            "xenstore_watches": len(self.xs.watches),
            "notifies": sum(len(v) for v in self.notifies.values()),
            "memory": self.backing.snapshot(),
            "connections": len(self.conns),
            "unread_bytes_max": max((c.out_bytes for c in self.conns.values()), default=0),
            "pending_requests": sum(len(c.pending) for c in self.conns.values()),
            "counters": {**self.counters, "log_lines_suppressed": self._warn.suppressed},
        }

    def _ring_snapshot(self, domid: int) -> dict[str, int] | None:
        """The indices of the request ring of ``domid``'s connection (None: it has none).

        ``req_cons`` and ``rsp_prod_pvt`` are the service's own; the rest are
        read from the shared page (the producer and event indices).
        """
        conn = self.bound.get(domid)
        ring = None if conn is None else conn.ring
        if ring is None or ring.mem.closed:
            return None
        req_prod, req_event, rsp_prod, rsp_event = RING_INDICES.unpack_from(ring.mem)
        req_cons, rsp_pvt = struct.unpack_from("<II", ring.state)
        return {"req_prod": req_prod, "req_event": req_event, "req_cons": req_cons,
                "rsp_prod": rsp_prod, "rsp_prod_pvt": rsp_pvt, "rsp_event": rsp_event}

    def _require_toolstack(self, conn: Connection, token: bytes, op: str) -> None:
        """dom0's connection, or an unbound one of the service's uid with the dom0 token.

        Raises:
            HypercallError: EPERM otherwise (as ``XEN_SYSCTL_*`` answers a domU).
        """
        if conn.domid is not None:
            if token or not self._privileged(conn.domid):
                raise HypercallError(op, errno.EPERM, f"d{conn.domid} is not privileged")
        elif not self.identity.is_owner(conn.cred, token):
            raise HypercallError(op, errno.EPERM, "dom0 or the service's token only")

    def _stats(self, conn: Connection, payload: bytes) -> bytes:
        """STATS (dom0's): :meth:`snapshot`, at most :data:`protocol.MAX_PAYLOAD`.

        Too big, the xenstore tree and the pin tables give way to their
        counts, then domains are left out; ``"truncated"`` says which.
        """
        self._require_toolstack(conn, payload, "stats")
        snap = self.snapshot()
        limit = p.MAX_PAYLOAD - 4
        body = json.dumps(snap, sort_keys=True).encode()
        if len(body) <= limit:
            return self._ok(body)
        snap["xenstore"] = {}
        for dom in snap["domains"].values():
            dom["active"] = len(dom["active"])
        snap["truncated"] = {"xenstore": "left out (its node count is xenstore_nodes)",
                             "active": "counts instead of tables"}
        body = json.dumps(snap, sort_keys=True).encode()
        doms = snap["domains"]
        while len(body) > limit and doms:
            keep = sorted(doms, key=int)[: len(doms) // 2]
            left = len(doms) - len(keep)
            snap["domains"] = doms = {k: doms[k] for k in keep}
            snap["truncated"]["domains"] = f"{left} more left out"
            body = json.dumps(snap, sort_keys=True).encode()
        return self._ok(body)

    def _debug_key(self, conn: Connection, payload: bytes) -> bytes:
        """Xen's debug keys (dom0's): 'g' grant tables (pinned entries), 'G' every
        valid entry, 'e' event channels, 'x' the xenstore tree.

        The text stops at :data:`protocol.MAX_PAYLOAD`, with a ``[truncated``
        line saying how much was left out.
        """
        self._require_toolstack(conn, payload[1:], "debug_key")
        key = payload[:1].decode("ascii", "replace")
        if key in ("g", "G"):
            text = dump_all(self.hv, all_entries=key == "G")
        elif key == "e":
            lines = []
            for domid, ports in self.ev.snapshot().items():
                for port, state, rdom, rport in ports:
                    kind = {ECS_UNBOUND: "unbound", ECS_INTERDOMAIN: "interdomain"}.get(
                        state, str(state)
                    )
                    lines.append(f"d{domid} port {port}: {kind} d{rdom} port {rport}")
            text = "\n".join(lines) or "(no event channels)"
        elif key == "x":
            text = "\n".join(
                f"{path} = {value!r} ({','.join(perms)})"
                for path, (value, perms) in self.xs.dump().items()
            )
        else:
            raise p.ProtocolError(errno.EINVAL, f"unknown debug key {key!r}")
        return self._ok(truncate(text.encode(), p.MAX_PAYLOAD - 4))


def truncate(text: bytes, limit: int) -> bytes:
    """``text``, cut at a line end to fit ``limit`` bytes with a marker line saying
    how many bytes were left out."""
    if len(text) <= limit:
        return text
    cut = text.rfind(b"\n", 0, limit - 80)
    cut = cut if cut >= 0 else limit - 80
    return text[:cut] + f"\n[truncated: {len(text) - cut} more bytes]".encode()


#: Where each batched op keeps the addresses whose gfns it maps or unmaps:
#: ``(op size, offsets of u64 addresses)``; gnttab_transfer's ``mfn`` is a gfn.
_ADDR_FIELDS = {
    gt.GNTTABOP_map_grant_ref: (32, (0,)),
    gt.GNTTABOP_unmap_grant_ref: (24, (0,)),
    gt.GNTTABOP_unmap_and_replace: (24, (0, 8)),
    gt.GNTTABOP_transfer: (24, (0,)),
}
_ADDR_SHIFT = {gt.GNTTABOP_transfer: 0}
#: Ops that never change the caller's p2m.
_NO_P2M = frozenset(
    {
        gt.GNTTABOP_copy,
        gt.GNTTABOP_query_size,
        gt.GNTTABOP_get_version,
        gt.GNTTABOP_get_status_frames,
        gt.GNTTABOP_swap_grant_ref,
        gt.GNTTABOP_dump_table,
        gt.GNTTABOP_cache_flush,
    }
)
#: Batches Xen preempts with a continuation (``do_grant_table_op``).
_PREEMPTIBLE = frozenset({
    gt.GNTTABOP_map_grant_ref, gt.GNTTABOP_unmap_grant_ref, gt.GNTTABOP_unmap_and_replace,
    gt.GNTTABOP_copy, gt.GNTTABOP_transfer, gt.GNTTABOP_swap_grant_ref,
})
_OP_SIZE = {cmd: ctypes.sizeof(st) for cmd, st in gt.GNTTABOP_STRUCTS.items()}
#: Ops that may change any gfn of the caller (its table frames): the whole p2m goes back.
_ANY_P2M = frozenset({gt.GNTTABOP_setup_table, gt.GNTTABOP_set_version})
_U64 = struct.Struct("<Q")
#: ops whose one op changes at most the gfn of its host_addr (u64 at offset 0)
_ONE_GFN = (gt.GNTTABOP_map_grant_ref, gt.GNTTABOP_unmap_grant_ref)
#: A GNTTAB_OP reply's header and head: length, type, flags, seq; status, the
#: hypercall's rc, the length of the ops.
_GNTTAB_REPLY = struct.Struct("<IHHIiiI")
#: A p2m delta of one entry: count, gfn, mfn, type (:func:`protocol.pack_p2m`).
_ONE_DELTA = struct.Struct("<Iqqq")


def _gfns_touched(cmd: int, uop: memoryview, count: int) -> list[int] | None:
    """The caller's gfns a GNTTABOP can change; None when any may (setup_table,
    set_version, unknown commands): the reply then carries the whole p2m.

    The addresses are read as a strided ``u64`` view and shifted by a C loop.
    """
    if cmd in _NO_P2M or (cmd not in _ANY_P2M and cmd not in _ADDR_FIELDS):
        return []  # an unknown command changes nothing: -ENOSYS, no p2m
    fields = _ADDR_FIELDS.get(cmd)
    if fields is None:
        return None
    size, offsets = fields
    shift = _ADDR_SHIFT.get(cmd, 12)
    n = min(max(count, 0), len(uop) // size)
    if n == 1:
        return [_U64.unpack_from(uop, off)[0] >> shift for off in offsets]
    if not n:
        return []
    if not _LITTLE:  # pragma: no cover - the ops are little-endian
        return [_U64.unpack_from(uop, i * size + off)[0] >> shift
                for i in range(n) for off in offsets]
    words = uop[: n * size].cast("Q")
    step = size // 8
    out: list[int] = []
    for off in offsets:
        column = words[off // 8 :: step]
        out += map(rshift, column, repeat(shift)) if shift else column.tolist()
    return out


#: the service's lines (client misbehaviour, refusals, handler failures): rate-limited per
#: connection by RateLimitedLog before they get here; ``xengrant hypervisor`` prints them
_logger = logging.getLogger("xengrant.service")


def _stderr(text: str) -> None:
    """The default ``log``: the ``xengrant.service`` logger, at WARNING."""
    _logger.warning("%s", text)


def _listen(path: str, shared: bool = False) -> socket.socket:
    """Bind and listen at ``path`` (mode 0600; 0666 when ``shared``: other uids
    are admitted, by SO_PEERCRED), replacing a stale socket file.

    Raises:
        OSError: EADDRINUSE if something answers there.
    """
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            probe.close()
            raise OSError(errno.EADDRINUSE, f"a service already listens at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if shared:
        os.chmod(path, 0o666)
    sock.listen(64)
    sock.setblocking(False)
    return sock


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

