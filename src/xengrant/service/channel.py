"""One connection of a domain process to the service: requests, replies, events.

What is in flight is kept by :class:`~xengrant.service.calls.Calls` (sans-IO:
one record per request waited for, one entry per posted request); this
module does the I/O around it.

**One reader.**  Whoever waits (a thread for a reply, an event or a watch
event; an asyncio loop through ``add_reader``) reads the socket when nobody
else does, feeds what came to the records, and wakes everybody; the others
are parked on a condition (threads) or a future (asyncio) meanwhile.  The
request ring (:mod:`xengrant.service.ring`) is consumed under a lock of its
own (``_ring_rx``): its responses are not on the socket.

**The ring** is the one fast path: a one-op ``GNTTABOP_map_grant_ref``
(:meth:`Channel.map_one`) and a posted one-op ``GNTTABOP_unmap_grant_ref``
(:meth:`Channel.post_unmap_one`) go there when it can take them; anything
else, and those too when it cannot, is a message on the socket.

**A call is never given up** (a vCPU in a hypercall stays there until it
returns; real Xen has no way to abandon one):

- a signal handler that raises while a call waits (Ctrl-C) does not end the
  wait: its exception is raised once the reply is in, the call's effects
  done (:meth:`Channel.held_signals` lets a caller finish the reply first);
- a service that does not answer within the connection's ``timeout`` is
  dead to this process: the connection is shut (the service destroys the
  domain, as when its process dies) and every call, waiting or later, fails
  with ``ServiceError(ETIMEDOUT)``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .. import _cext
from ..errors import HypercallError
from . import frontring
from . import protocol as p
from .calls import Call, Calls, OnReply
from .errors import ServiceError
from .frontring import RingFront, wait_ms
from .paths import check_server, default_socket_path
from .ring import ClientRing

_RECV = 1 << 18
_ANCBUF = socket.CMSG_SPACE(4 * struct.calcsize("i"))
#: Up to this many payload bytes a request is joined into one buffer; larger
#: ones go out with sendmsg, uncopied.
_GATHER = 1 << 14
#: only the main thread runs signal handlers
_MAIN_IDENT = threading.main_thread().ident
_T = TypeVar("_T")

#: the client side of the service's connections: why one died (WARNING), closes (DEBUG)
logger = logging.getLogger("xengrant.service.client")

class Channel(RingFront):
    """One connection to the service.

    Posted requests (:meth:`post`): sent at once, flagged ``F_POSTED``, not
    waited for; the service sends the reply with the next one.  Whoever reads
    it runs the request's ``on_reply`` in stream order (before any later
    reply is handed out); a failure it reports is kept in :attr:`deferred`
    and raised by the next :meth:`request` or :meth:`post` before it sends
    anything, and by :meth:`sync`.

    Waiting: the reader polls the socket for up to :attr:`spin` seconds
    before it sleeps (a hypercall's reply is due within microseconds; a
    sleeping vCPU takes tens of them to wake).

    Args:
        path: the socket path (default: :func:`default_socket_path`).
        timeout: seconds the service has to answer each call (None:
            forever); past it the connection is closed (see the module).
        spin: seconds to poll for a reply before sleeping (default
            :attr:`SPIN`; 0: sleep at once).

    Raises:
        OSError: the service is not there (ENOENT, ECONNREFUSED);
            PermissionError if another uid serves the socket
            (:func:`~xengrant.service.paths.check_server`).
    """

    #: Seconds a thread waiting for a reply polls the socket before it sleeps.
    SPIN = 200e-6

    def __init__(
        self, path: str | None = None, timeout: float | None = None, spin: float | None = None
    ) -> None:
        self.path = path or default_socket_path()
        self._timeout_ms = -1
        self._spin_ns = 0
        self.timeout = timeout
        self.spin = self.SPIN if spin is None else spin
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(self.path)
            check_server(self.sock, self.path)  # before anything (a token) is sent
        except BaseException:
            self.sock.close()
            raise
        self._fileno = self.sock.fileno()
        self._poller = select.poll()
        self._poller.register(self._fileno, select.POLLIN)
        self._rbuf = memoryview(bytearray(_RECV))
        #: bytes read into ``_rbuf`` and not sorted yet (``_cext.recv_fill``
        #: counts them in the same C call as it reads them)
        self._fill = array.array("q", [0])
        self._send_lock = threading.Lock()
        #: one-way frames to go out in front of the next message (owe)
        self._owed: list[bytes] = []
        #: guards :attr:`calls` and the reader role
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        #: somebody reads the socket (one at a time)
        self._reading = False
        #: what a signal handler raised during the last read (recv_fill)
        self._sig: BaseException | None = None
        self._parked = 0
        #: the requests in flight and what came (sans-IO)
        self.calls = Calls()
        #: read with recvmsg (SCM_RIGHTS) until the memfd came; recv after
        self.want_fds = True
        self._fds: list[int] = []
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._reader_loops: set[asyncio.AbstractEventLoop] = set()
        self.closed = False
        #: the request ring (service/ring.py), once set up
        self.ring: ClientRing | None = None
        #: held by whoever consumes the ring's responses
        self._ring_rx = threading.Lock()
        #: posted requests sent on the socket, not answered yet: while there
        #: is one, nothing goes on the ring (it could overtake them)
        self._sock_posted: set[int] = set()
        #: the p2m mirror and where the holes go, for the ring's posted
        #: unmaps a collect finishes; set by the domain
        self.ring_p2m: dict[int, Any] | None = None
        self.ring_holes: Callable[[list[int]], None] | None = None
        #: signals held for callers that finish a reply first (held_signals)
        self._holding = 0
        self._held: list[BaseException] = []
        #: messages sent so far (every hypercall, xenstore or evtchn call is one)
        self.sent = 0

    @property
    def timeout(self) -> float | None:
        """Seconds the service has to answer each call (None: forever)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value
        self._timeout_ms = wait_ms(value)

    @property
    def spin(self) -> float:
        """Seconds a reader polls for a reply before it sleeps (0: sleep at once)."""
        return self._spin

    @spin.setter
    def spin(self, value: float) -> None:
        self._spin = value
        self._spin_ns = int(value * 1e9)

    # ----------------------------------------------- what Calls keeps, by name
    @property
    def events(self) -> deque[int]:
        """Event-channel ports that fired (see :class:`Calls`)."""
        return self.calls.events

    @property
    def watch_events(self) -> deque[tuple[str, str]]:
        """Xenstore watch events ``(path, token)`` (see :class:`Calls`)."""
        return self.calls.watch_events

    @property
    def deferred(self) -> deque[BaseException]:
        """Failures posted requests reported, not raised yet."""
        return self.calls.deferred

    # -------------------------------------------------------------- sending
    def _write(self, head: bytes, payload: bytes, tail: bytes | bytearray | memoryview) -> None:
        size = len(payload) + len(tail)
        try:
            with self._send_lock:
                if self._owed:  # one-way messages owed go first, in the same send
                    head = b"".join(self._owed) + head
                    self._owed.clear()
                if size <= _GATHER:
                    self.sock.sendall(head + payload + tail if tail else head + payload)
                else:
                    _sendv(self.sock, head, payload, tail)
                self.sent += 1
        except OSError as e:
            raise self._fail(ServiceError(errno.EPIPE, f"service connection lost: {e}")) from None

    def owe(self, frame: bytes) -> None:
        """Keep a one-way message (a whole frame) to go out in front of the next
        one sent on the connection, in the same system call, or with
        :meth:`send_owed` (the event-channel client's unmasks:
        :meth:`~xengrant.service.EventChannelClient.unmask`)."""
        with self._send_lock:
            self._owed.append(frame)

    def disown(self, frame: bytes) -> None:
        """Drop what :meth:`owe` kept of ``frame`` (not sent yet)."""
        with self._send_lock:
            self._owed[:] = [f for f in self._owed if f != frame]

    def send_owed(self) -> None:
        """Send the one-way messages :meth:`owe` kept, if any, now.

        Raises:
            ServiceError: EPIPE, the connection is gone.
        """
        if not self._owed:
            return
        try:
            with self._send_lock:
                if self._owed:
                    self.sock.sendall(b"".join(self._owed))
                    self._owed.clear()
        except OSError as e:
            raise self._fail(ServiceError(errno.EPIPE, f"service connection lost: {e}")) from None

    def send(self, mtype: int, payload: bytes = b"") -> None:
        """Send a one-way message (nothing answers it, e.g. ``MSG_EVTCHN_UNMASK``).

        Raises:
            ServiceError: EPIPE, the connection is gone.
        """
        if self.calls.error is not None:
            raise self.calls.error
        self._write(p.HEADER.pack(len(payload), mtype, 0, 0), payload, b"")

    def request(
        self, mtype: int, payload: bytes = b"", tail: bytes | bytearray | memoryview = b""
    ) -> bytes:
        """Send a request and wait for its reply (``payload`` then ``tail``, uncopied).

        Returns:
            The reply's payload: an ``i32`` status (0 or -errno), then the body.

        Raises:
            ServiceError: the connection failed, or the service did not answer
                within :attr:`timeout` (the connection is closed then).
            Exception: a failure a posted request reported (see :attr:`deferred`);
                nothing is sent then.
            BaseException: what a signal handler raised while it waited, once
                the reply is in (unless :meth:`held_signals` holds it).
        """
        calls = self.calls
        if calls.deferred:
            self.raise_deferred()
        if calls.error is not None:
            raise calls.error
        seq = calls.next_seq()
        c = calls.waiting[seq] = Call(seq, mtype)  # (atomic under the GIL)
        try:
            self._write(p.HEADER.pack(len(payload) + len(tail), mtype, 0, seq), payload, tail)
        except BaseException:
            calls.waiting.pop(seq, None)
            raise
        reply = self._wait_call(c)
        if self.calls.posted and self.ring is not None:
            # the ring's responses to posted unmaps came before this reply,
            # as their socket replies would have (the service serves the ring first)
            self.drain_ring(wait=False)
        if len(reply) < 4:
            raise self._fail(ServiceError(errno.EBADMSG, "reply without a status"))
        return reply

    def call(self, mtype: int, payload: bytes = b"") -> tuple[int, bytes]:
        """:meth:`request`, split: ``(status, body)``, status 0 or a negative errno.

        Raises:
            ServiceError, Exception: as :meth:`request`.
        """
        return p.split_status(self.request(mtype, payload))

    def call_ok(self, mtype: int, payload: bytes = b"", op: str = "") -> bytes:
        """:meth:`call`, raising for a negative status.

        Raises:
            HypercallError: the service answered -errno (with its explanation).
            ServiceError: as :meth:`request`.
        """
        status, body = self.call(mtype, payload)
        if status < 0:
            raise HypercallError(
                op or p.MSG_NAMES.get(mtype, str(mtype)).lower(),
                -status,
                body.decode("utf-8", "replace"),
            )
        return body

    def post(
        self,
        mtype: int,
        payload: bytes,
        on_reply: OnReply,
        tail: bytes | bytearray | memoryview = b"",
    ) -> int:
        """Send a request flagged ``F_POSTED`` and return at once.

        Args:
            mtype: ``MSG_*``.
            payload: the payload (or its head, with ``tail``).
            on_reply: run with the reply's payload (status first) when a
                reader reads it, before any later reply is handed out; what
                it returns or raises (an exception) goes to :attr:`deferred`.
            tail: more payload, sent without being copied first.

        Returns:
            The request's sequence number.

        Raises:
            ServiceError: the connection is gone.
            Exception: an earlier posted request's failure; nothing is sent.
        """
        if self.calls.deferred:
            self.raise_deferred()
        if self.calls.error is not None:
            raise self.calls.error
        with self._mu:
            seq = self.calls.post(on_reply)
            self._sock_posted.add(seq)
        size = len(payload) + len(tail)
        try:
            self._write(p.HEADER.pack(size, mtype, p.F_POSTED, seq), payload, tail)
        except BaseException:
            with self._mu:
                self.calls.unsent(seq)
                self._sock_posted.discard(seq)
            raise
        return seq

    def raise_deferred(self) -> None:
        """Raise the oldest failure a posted request reported (the others stay queued).

        Raises:
            Exception: that failure, if there is one.
        """
        with self._mu:
            err = self.calls.deferred.popleft() if self.calls.deferred else None
        if err is not None:
            raise err

    def sync(self) -> None:
        """Wait until every posted request has been answered; raise what they reported.

        Replies come in request order, so this sends a PING and waits for it.

        Raises:
            ServiceError: the connection failed.
            Exception: the oldest failure a posted request reported.
        """
        if self.calls.posted:
            self.request(p.MSG_PING)
            self.drain_ring()
        self.raise_deferred()

    # -------------------------------------------------------------- signals
    def hold_signals(self) -> list[BaseException] | None:
        """Start holding what a signal handler raises during a wait (instead of
        raising it once the reply is in): the caller finishes the reply first,
        then :meth:`release_signals` and raises the first one.

        Returns:
            The list the exceptions go to; None if this is not the main thread
            (only it runs signal handlers) or an outer caller holds already
            (then its list takes them).
        """
        if self._holding or threading.get_ident() != _MAIN_IDENT:
            return None
        held: list[BaseException] = []
        self._held, self._holding = held, 1
        return held

    def release_signals(self, held: list[BaseException] | None) -> None:
        """End what :meth:`hold_signals` started (nothing if it returned None)."""
        if held is not None:
            self._held, self._holding = [], 0

    @contextlib.contextmanager
    def held_signals(self) -> Iterator[list[BaseException]]:
        """:meth:`hold_signals` as a block: leaving the outermost raises the first
        exception held (chained to the block's own, if it raised one).

        Yields:
            The exceptions held so far (an outer block's list when nested).

        Raises:
            BaseException: the first exception held, when the outermost block ends.
        """
        held = self.hold_signals()
        if held is None:
            yield self._held if self._holding else []
            return
        try:
            yield held
        except BaseException as e:
            if held:
                raise held[0] from e
            raise
        finally:
            self.release_signals(held)
        if held:
            raise held[0]

    def _signalled(self, got: BaseException | None) -> None:
        """After a wait: raise what a signal handler raised in it, or hold it."""
        if got is None:
            return
        if self._holding:
            self._held.append(got)
            return
        raise got

    # ------------------------------------------------------------- reading
    def _recv(self, timeout: float | None, nonblocking: bool, spin: float) -> int:
        """Read once into ``_rbuf`` at ``_fill`` and count it there (we are the reader).

        In C (:data:`~xengrant.service.frontring.C_PATHS`; after the memory
        socket came) the read and the count are one call,
        ``_cext.recv_fill``: a signal handler that raises once it returned
        cannot lose the bytes.  In Python they are two steps: a signal
        handler's exception between them (the bytes may be lost) fails the
        connection (see :meth:`_interrupted`) rather than leaving the stream
        out of step.

        Returns:
            The bytes read; 0 if the connection closed; -1 if none came.
        """
        if not nonblocking and not self.want_fds and frontring.C_PATHS:
            # spin, then poll() and recv, in C without the GIL; a signal
            # handler's exception comes back with the bytes, not instead
            n: int
            try:
                n, self._sig = _cext.recv_fill(self._fileno, self._rbuf, self._fill,
                                               int(spin * 1e9), wait_ms(timeout))
            except OSError:  # (ECONNRESET): as closed
                return 0
            return n
        poll_ms = None if timeout is None else max(timeout, 0) * 1000
        if not nonblocking and not self._poller.poll(poll_ms):  # (a signal: nothing read)
            return -1
        fill = self._fill[0]
        buf = self._rbuf[fill:]
        anc: list[tuple[int, int, bytes]] = []
        try:
            if self.want_fds:
                n, anc, _flags, _addr = self.sock.recvmsg_into([buf], _ANCBUF, socket.MSG_DONTWAIT)
            else:
                n = self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            self._fill[0] = fill + n
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError:
            return 0
        except BaseException as e:  # a signal handler's, between the read and its count
            self._interrupted(e, "read")
            raise
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)
        return n

    def _read(self, timeout: float | None, spin: float, nonblocking: bool = False) -> int:
        """Read once as the reader (``_reading`` set), sort it, give the role up, wake
        all; then raise what a signal handler raised meanwhile (the bytes are kept).

        Bytes read before and not sorted yet (a signal handler raised right
        after the read) are sorted first, without a read."""
        n = -1
        try:
            n = self._fill[0] or self._recv(timeout, nonblocking, spin)
        finally:
            with self._mu:
                self._reading = False
                self._sort(n == 0)
                if self._parked or self._async_waiters:
                    self._wake()
        sig, self._sig = self._sig, None
        if sig is not None:
            raise sig
        return n

    def _sort(self, closed: bool) -> None:
        """Feed the bytes read (``_rbuf[:_fill]``) to :attr:`calls` (caller holds ``_mu``).

        A signal handler's exception in the middle (the bytes are taken, not
        all sorted) fails the connection (:meth:`_interrupted`): the stream
        would be out of step.
        """
        fill = self._fill[0]
        if fill:
            try:
                self._fill[0] = 0
                self.calls.feed(self._rbuf[:fill])
            except BaseException as e:
                self._interrupted(e, "sorted", locked=True)
                raise
        elif closed:
            self.calls.feed(b"")

    def _interrupted(self, e: BaseException, where: str, locked: bool = False) -> None:
        """A signal handler's exception ``e`` came where what the service sent could be
        lost (between a read and its count, or while it was sorted): the
        connection fails cleanly (every call in flight and later fails with
        ``ServiceError(EPROTO)``; the service destroys the domain) instead of
        going on out of step."""
        what = "read" if where == "read" else "sorted what it read"
        err = ServiceError(
            errno.EPROTO, f"{e!r} interrupted the client while it {what} from the service: "
            "what the service sent may be lost, so the connection is closed and the domain "
            "destroyed")
        if locked:
            if self._fail_locked(err):
                self._shut(err)
        else:
            self._fail(err)

    def _wake(self) -> None:
        """Wake the parked threads and asyncio waiters (caller holds ``_mu``)."""
        if self._parked:
            self._cv.notify_all()
        if self._async_waiters:
            waiters, self._async_waiters = self._async_waiters, []
            for loop, fut in waiters:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, fut)

    def _await(
        self, done: Callable[[], _T | None], deadline: float | None, spin: float
    ) -> _T | None:
        """Read (or park while another reads) until ``done()`` (called holding ``_mu``)
        is not None; None once ``deadline`` (``time.monotonic``) passed."""
        while True:
            with self._mu:
                got = done()
                if got is not None:
                    return got
                remaining = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                if self._reading:
                    self._parked += 1
                    try:
                        self._cv.wait(remaining)
                    finally:
                        self._parked -= 1
                    continue
                self._reading = True
            self._read(remaining, spin)

    def _wait_call(self, c: Call) -> bytes:
        """The reply to ``c``, however long the channel's timeout allows.

        Raises:
            ServiceError: the connection failed, or ETIMEDOUT (it is closed then).
            BaseException: a signal handler's, once the reply is in (see the module).
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        signalled: BaseException | None = None
        while True:
            try:
                reply = self._await(lambda: self.calls.take(c), deadline, self.spin)
            except ServiceError as e:
                if signalled is not None:  # no reply will come: the signal's, on top
                    raise signalled from e
                raise
            except BaseException as e:  # a signal handler raised: the reply is still due
                signalled = signalled or e
                continue
            if reply is None:
                raise self._fail(ServiceError(
                    errno.ETIMEDOUT,
                    f"the service did not answer {c!r} within {self.timeout} s: "
                    "the connection is closed and the domain destroyed",
                ))
            self._signalled(signalled)
            return reply

    def wait_for(self, queue: deque[Any], match: Any, timeout: float | None) -> Any:
        """Take the first item of ``queue`` (:attr:`events`) equal to ``match`` (None: any).

        Returns:
            The item, or None when ``timeout`` passes first.

        Raises:
            ServiceError: the connection failed.
        """
        return self.wait_take(lambda: _take(queue, match), timeout)

    def wait_take(self, take: Callable[[], _T | None], timeout: float | None) -> _T | None:
        """Read until ``take()`` (called holding the channel's lock, after each
        read) returns an item: the xenstore client takes its watch events from
        its codec this way.

        Returns:
            The item, or None when ``timeout`` passes first.

        Raises:
            ServiceError: the connection failed.
        """
        if timeout is not None and timeout <= 0:
            return self.poll_take(take)
        deadline = None if timeout is None else time.monotonic() + timeout
        got: _T | None = self._await(lambda: self._take(take), deadline, 0.0)
        return got

    def poll_take(self, take: Callable[[], _T | None]) -> _T | None:
        """A zero timeout: ``take()``, then, if it found nothing and nobody else
        reads, one non-blocking read of what the socket holds now and
        ``take()`` again -- it looks, it never waits (as ``xenevtchn_pending``
        on the non-blocking ``/dev/xen/evtchn`` reads what is queued).

        Returns:
            The item, or None.

        Raises:
            ServiceError: the connection failed.
        """
        with self._mu:
            item = self._take(take)
            if item is not None or self._reading:  # a reader: it sorts what comes
                return item
            self._reading = True
        self._read(0.0, 0.0, nonblocking=True)
        with self._mu:
            return self._take(take)

    def _take(self, take: Callable[[], _T | None]) -> _T | None:
        """``take()`` (caller holds ``_mu``); None if there is nothing yet.

        Raises:
            ServiceError: nothing, and nothing can come: the connection failed.
        """
        item = take()
        if item is None and self.calls.error is not None:
            raise self.calls.error
        return item

    async def wait_for_async(self, queue: deque[Any], match: Any, timeout: float | None) -> Any:
        """asyncio twin of :meth:`wait_for`: the loop reads when no thread does."""
        return await self.wait_take_async(lambda: _take(queue, match), timeout)

    async def wait_take_async(
        self, take: Callable[[], _T | None], timeout: float | None
    ) -> _T | None:
        """asyncio twin of :meth:`wait_take`: the loop reads when no thread does."""
        if timeout is not None and timeout <= 0:
            return self.poll_take(take)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._mu:
                item = self._take(take)
                if item is not None:
                    return item
                fut: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, fut))
            if loop not in self._reader_loops:
                self._reader_loops.add(loop)
                loop.add_reader(self._fileno, self._on_readable, loop)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                with self._mu:
                    return take()

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._mu:
            if (not any(lp is loop for lp, _ in self._async_waiters)
                    or self.calls.error is not None or self._reading):
                # Nobody here waits, or a thread reads: stop watching the
                # socket (it stays readable until that thread reads, and the
                # loop would spin on it).  The thread wakes our waiters when
                # it fed what it read, and they watch it again.
                self._reader_loops.discard(loop)
                loop.remove_reader(self._fileno)
                return
            self._reading = True
        self._read(None, 0.0, nonblocking=True)
        if self.calls.error is not None:
            self._reader_loops.discard(loop)
            loop.remove_reader(self._fileno)

    def wait_posted(self, seqs: list[int]) -> None:
        """Wait until the replies to posted requests ``seqs`` have been read and done.

        Raises:
            ServiceError: the connection failed, or timed out (then closed).
        """
        posted = self.calls.posted
        deadline = None if self.timeout is None else time.monotonic() + self.timeout

        def done() -> bool | None:
            if self.calls.error is not None:
                raise self.calls.error
            return not any(s in posted for s in seqs) or None

        if self._await(done, deadline, self.spin) is None:
            raise self._fail(ServiceError(errno.ETIMEDOUT, f"no reply to posted {seqs}"))

    # -------------------------------------------------------------- closing
    def _fail(self, err: ServiceError) -> ServiceError:
        """The connection is dead: every call fails with ``err``; the socket is shut
        (the service destroys the domain).  Returns ``err``, for the caller to raise."""
        with self._mu:
            first = self._fail_locked(err)
        if first:
            self._shut(err)
        return self.calls.error or err

    def _fail_locked(self, err: ServiceError) -> bool:
        """:meth:`_fail`'s part under ``_mu`` (the caller holds it): whether it is the first."""
        first = self.calls.error is None
        self.calls.fail(err)
        self._sock_posted.clear()
        self._wake()
        return first

    def _shut(self, err: ServiceError) -> None:
        """:meth:`_fail`'s end: shut the socket, say why once."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.closed:
            logger.debug("service connection closed (fd %d)", self._fileno)
        else:
            logger.warning("service connection failed: %s (errno %s); its domain goes",
                           err.strerror or err, err.errno)

    def take_fds(self) -> list[int]:
        """File descriptors received so far (the memfd), handed over once."""
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        """Close the socket (the service then destroys the bound domain)."""
        if self.closed:
            return
        self.closed = True
        for loop in list(self._reader_loops):
            with contextlib.suppress(Exception):
                loop.remove_reader(self._fileno)
        self._reader_loops.clear()
        self._fail(ServiceError(errno.ECONNRESET, "the connection is closed"))
        self.sock.close()
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        with self._ring_rx:  # no thread in a ring call (they end: the socket is shut)
            ring, self.ring = self.ring, None
        if ring is not None:
            with contextlib.suppress(BufferError):  # a thread still posting: left to the GC
                ring.close()


def _sendv(sock: socket.socket, *parts: bytes | bytearray | memoryview) -> None:
    """``sendall`` of several buffers, with one ``sendmsg`` when it takes them all."""
    total = sum(map(len, parts))
    if total <= _GATHER or len(parts) > 64:  # 64: far below IOV_MAX
        sock.sendall(b"".join(parts))
        return
    n = sock.sendmsg(parts)
    if n == total:
        return
    for part in parts:  # a partial send (a signal, a full buffer): finish in order
        size = len(part)
        if n >= size:
            n -= size
            continue
        sock.sendall(memoryview(part)[n:])
        n = 0


def _take(queue: deque[Any], match: Any) -> Any:
    if not queue:
        return None
    if match is None:
        return queue.popleft()
    for i, item in enumerate(queue):
        if item == match:
            del queue[i]
            return item
    return None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
