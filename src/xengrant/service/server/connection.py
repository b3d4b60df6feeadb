"""A client connection and its I/O: the reader thread, the output queue, the
throttle of a client that stops reading, and the close.

Each connection has a thread of its own, blocked in ``poll`` + ``recv_into``
on its socket (or on its request ring, :mod:`.request_ring`); what it reads it
handles under the service lock (:mod:`.dispatch`).  Replies are queued and
sent in one ``send`` per read; a reply to a posted request (``F_POSTED``)
waits for the next one.  A client whose replies pile up is throttled: its
thread reads none of its requests until the socket took them.
"""

from __future__ import annotations

import array
import contextlib
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Union

from ... import _cext
from .. import protocol as p
from ..paths import Cred
from ..ring import ServiceRing
from .base import ServerBase

#: Seconds a connection's thread polls for the next request after answering one.
DEFAULT_SPIN = 100e-6
#: The receive buffer of a connection's thread (one read).
_RECV = 1 << 18
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
#: the peer hung up (or the socket failed): what the main thread watches for
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
#: a request's payload: bytes, or a writable view of the receive buffer
Payload = Union[bytes, memoryview]


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
        #: descriptors made only to be sent (the client's end of its memory
        #: socket, its ring's page) -> what closes them: once the reply that
        #: carries them is sent (SCM_RIGHTS has passed them on) or the
        #: connection goes, the service holds them no more (limits.FDS_PER_CONN)
        self.handover: dict[int, Callable[[], None]] = {}
        #: the hang-up events the main thread's epoll watches for it
        self.watch = _HANGUP

    def __repr__(self) -> str:
        return f"<conn {self.ident} d{self.domid}>"


class ConnectionIO(ServerBase):
    """A connection's reader thread, output queue, throttle and close."""

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
            with lock:  # nor unmaps the ring under a wait; stats read it under the lock
                ring, conn.ring = conn.ring, None
                _close_handover(conn)
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
                    # passed on with the first byte: what was made to be sent goes
                    for fd in fds:
                        done = conn.handover.pop(fd, None)
                        if done is not None:
                            done()
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
                _close_handover(conn)
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


def _close_handover(conn: Connection) -> None:
    """Close what ``conn`` was to send and never did (caller holds the lock)."""
    handover, conn.handover = conn.handover, {}
    for done in handover.values():
        with contextlib.suppress(OSError):
            done()
