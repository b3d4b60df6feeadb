"""A domain process's side of the service: the same guest API over a socket.

:func:`connect` creates (or attaches to) a domain in a running ``xengrant
hypervisor`` and returns a :class:`RemoteDomain`: a
:class:`~xengrant.guest.domain.Domain` whose hypercalls go to the service --
one message per call, so a batch of map/unmap/copy ops is one round trip --
plus a xenstore handle (:attr:`RemoteDomain.xs`) and event channels
(:attr:`RemoteDomain.evtchn`).

Memory never crosses the socket.  The service sends the memfds backing the
frames this domain may reach (its own, and foreign ones it maps, see
:mod:`xengrant.service.memview`), with SCM_RIGHTS; :class:`RemoteHypercalls`
keeps a mirror of the domain's p2m (every hypercall reply carries the
changes) and maps frames itself: its own RAM and grant-table frames as views
of its range of machine memory, foreign frames it mapped with
``GNTTABOP_map_grant_ref`` too, or as a fresh ``mmap`` of exactly those
frames (``PROT_READ`` for a read-only grant).  A write by one process is
seen by the other with no copy.

Reading the socket: whichever thread waits (for a reply, an event or a
watch) reads and sorts what arrives, the others wait on a condition; an
asyncio waiter reads from the event loop (``add_reader``).  A process that
dies closes its socket, and the service destroys its domain.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import errno
import itertools
import json
import math
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from operator import itemgetter
from typing import Any, Optional

from .. import _cext
from ..abi import grant_table as gt
from ..abi.gntalloc import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from ..emu.domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW
from ..errors import BatchError, HypercallError, XenError
from ..guest.domain import Domain
from ..guest.gnttab import map_ops_at_holes
from ..guest.ops import (
    MAP_OP,
    map_results,
    pack_map_ops,
    pack_unmap_ops,
    unmap_statuses,
)
from ..guest.share import Mapping, Share
from ..hypercall import check_rc
from ..portable import CopySegment, EmulatedGntshr, EmulatedGnttab, GrantRef
from . import protocol as p
from .errors import ServiceError as ServiceError
from .evtclient import EventChannelClient as EventChannelClient
from .memview import ClientMemory
from .paths import check_server, default_socket_path, read_token, token_path
from .ring import ClientRing
from .ring import response_payload as ring_response_payload
from .ring import response_seq as ring_response_seq
from .stats_types import ServiceStats
from .xsclient import XenStoreClient as XenStoreClient
from .xsclient import XenStoreWatch as XenStoreWatch

PAGE_SIZE = 4096
_OP_SIZES = {cmd: ctypes.sizeof(st) for cmd, st in gt.GNTTABOP_STRUCTS.items()}
_ONE_OP = frozenset(
    {
        gt.GNTTABOP_setup_table,
        gt.GNTTABOP_query_size,
        gt.GNTTABOP_get_status_frames,
        gt.GNTTABOP_set_version,
        gt.GNTTABOP_get_version,
    }
)
#: Ops whose batches may be split across messages (Xen preempts them too).
_SPLITTABLE = frozenset(
    {
        gt.GNTTABOP_map_grant_ref,
        gt.GNTTABOP_unmap_grant_ref,
        gt.GNTTABOP_unmap_and_replace,
        gt.GNTTABOP_copy,
        gt.GNTTABOP_transfer,
        gt.GNTTABOP_swap_grant_ref,
    }
)
_BATCH_BYTES = p.MAX_PAYLOAD - p.GNTTAB_REQ.size
_GFNS_PER_MSG = (p.MAX_PAYLOAD - 8) // 8
_RECV = 1 << 18
_FOREIGN = (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO)
#: A GNTTAB_OP reply's head: status, the hypercall's rc, the length of the ops.
_GNTTAB_HEAD = struct.Struct("<iiI")
_first = itemgetter(0)
_second = itemgetter(1)


def _wait_ms(timeout: float | None) -> int:
    """A timeout in seconds as ``_cext.recv_wait`` takes it: ms, rounded up (-1: forever)."""
    return -1 if timeout is None else math.ceil(max(timeout, 0) * 1000)


class Channel:
    """One connection to the service: requests, replies, events, watch events.

    Posted requests (:meth:`post`): the request is sent at once, flagged
    ``F_POSTED``, and nobody waits for its reply; the service sends that
    reply with the next one, so it never wakes this process on its own.
    Whichever thread reads the socket runs the request's ``on_reply`` as
    soon as the reply is read, in stream order: always before the reply of
    any later request is handed out.  A failure it reports (an exception it
    returns or raises) is kept in :attr:`deferred`: the next :meth:`call` or
    :meth:`post` raises it before sending anything, and :meth:`sync` waits
    for every posted reply, then raises it.

    Waiting for a reply: the thread that reads polls the socket for up to
    :attr:`spin` seconds before it sleeps -- the reply to a hypercall is due
    within microseconds, and a sleeping vCPU of a virtual machine takes tens
    of microseconds to wake (a real hypercall keeps its vCPU busy too).
    Sleeping is a ``poll`` for input, which a peer reading our request does
    not wake (a bare ``recv`` would be woken for nothing).

    Args:
        path: the socket path (default: :func:`default_socket_path`).
        timeout: seconds to wait for each reply (None: forever).
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
        self.timeout = timeout
        #: seconds a reply is polled for before sleeping (0: sleep at once)
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
        self._decoder = p.Decoder(max_payload=8 * p.MAX_PAYLOAD)
        self._rbuf = memoryview(bytearray(_RECV))
        self._send_lock = threading.Lock()
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._leader = False
        self._waiting = 0
        self._replies: dict[int, p.Frame] = {}
        #: requests whose waiter gave up (a timeout, a signal): their replies are dropped
        self._abandoned: set[int] = set()
        #: what to run on the reply of a request if its waiter gives up (see _abandon)
        self._late: dict[int, OnReply] = {}
        #: grant mappings whose map was given up and done after all: (gfn, handle,
        #: domid, ref), for the domain's gnttab to unmap
        self.orphans: list[tuple[int, int, int, int]] = []
        #: posted requests not answered yet: seq -> what to run on the reply
        #: (gfn, on_reply) for a posted one-op unmap (see post_unmap_one)
        self._posted: dict[int, OnReply | tuple[int, OnReply]] = {}
        #: failures posted requests reported, not raised yet (oldest first)
        self.deferred: deque[BaseException] = deque()
        self.events: deque[int] = deque()
        self.watch_events: deque[tuple[str, str]] = deque()
        self._seq = itertools.count(1)
        self._eof = False
        #: read with recvmsg (SCM_RIGHTS) until the memfd came; recv_into after
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
        #: the p2m mirror and where the holes go, for ring responses a
        #: drain reads (:meth:`drain_ring`); set by the domain
        self.ring_p2m: dict[int, Any] | None = None
        self.ring_holes: Callable[[list[int]], None] | None = None
        #: messages sent so far (every hypercall, xenstore or evtchn call is one)
        self.sent = 0

    # -------------------------------------------------------------- sending
    def send(
        self,
        mtype: int,
        payload: bytes = b"",
        flags: int = 0,
        on_reply: OnReply | None = None,
        tail: bytes | bytearray | memoryview = b"",
    ) -> int:
        """Send a request (``payload`` then ``tail``); returns its sequence number.

        Args:
            mtype: ``MSG_*``.
            payload: the payload (or its head, when ``tail`` is given).
            flags: 0, or ``F_POSTED``.
            on_reply: for a posted request: run with the reply's payload when
                it is read (see the class docstring).
            tail: more payload, sent without being copied first.

        Raises:
            ServiceError: EPIPE, the connection is gone.
        """
        seq = next(self._seq) & 0xFFFFFFFF
        size = len(payload) + len(tail)
        head = p.HEADER.pack(size, mtype, flags, seq)
        if on_reply is not None:
            with self._mu:
                self._posted[seq] = on_reply
                self._sock_posted.add(seq)
        try:
            with self._send_lock:
                if size <= _GATHER:
                    self.sock.sendall(head + payload + tail if tail else head + payload)
                else:
                    _sendv(self.sock, head, payload, tail)
                self.sent += 1
        except OSError as e:
            if on_reply is not None:
                with self._mu:
                    self._posted.pop(seq, None)
                    self._sock_posted.discard(seq)
            raise ServiceError(errno.EPIPE, f"service connection lost: {e}") from None
        return seq

    def request(
        self,
        mtype: int,
        payload: bytes = b"",
        tail: bytes | bytearray | memoryview = b"",
        on_late: OnReply | None = None,
    ) -> bytes:
        """Send a request and wait for its reply; the reply's whole payload.

        ``on_late``, if given, runs on the reply should the wait be given up
        (a timeout, a signal), as a posted request's ``on_reply`` would.

        Returns:
            The payload: an ``i32`` status (0 or -errno), then the body.

        Raises:
            ServiceError: the connection closed or timed out.
            Exception: a failure a posted request reported (see :attr:`deferred`);
                nothing is sent then.
        """
        if self.deferred:
            self.raise_deferred()
        seq = self.send(mtype, payload, tail=tail)
        if on_late is not None:
            self._late[seq] = on_late
        reply = self._wait_alone(seq)
        if reply is None:
            reply = self.wait_reply(seq).payload
        if on_late is not None:
            self._late.pop(seq, None)
        if self._posted and self.ring is not None:
            # the ring's responses to posted unmaps came before this reply,
            # as their socket replies would have (the service serves the ring first)
            self.drain_ring(wait=False)
        if reply is None or len(reply) < 4:
            raise ServiceError(errno.EBADMSG, "reply without a status")
        return reply

    def call(self, mtype: int, payload: bytes = b"") -> tuple[int, bytes]:
        """Send a request and wait for its reply.

        Returns:
            ``(status, body)``: status is 0 or a negative errno.

        Raises:
            ServiceError: the connection closed or timed out.
            Exception: a failure a posted request reported (see :attr:`deferred`).
        """
        return p.split_status(self.request(mtype, payload))

    def call_ok(self, mtype: int, payload: bytes = b"", op: str = "") -> bytes:
        """:meth:`call`, raising for a negative status.

        Raises:
            HypercallError: the service answered -errno (with its explanation).
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
        if self.deferred:
            self.raise_deferred()
        return self.send(mtype, payload, p.F_POSTED, on_reply, tail)

    def raise_deferred(self) -> None:
        """Raise the oldest failure a posted request reported (the others stay queued).

        Raises:
            Exception: that failure, if there is one.
        """
        with self._mu:
            err = self.deferred.popleft() if self.deferred else None
        if err is not None:
            raise err

    def sync(self) -> None:
        """Wait until every posted request has been answered; raise what they reported.

        Replies come in request order, so this sends a PING and waits for it.

        Raises:
            ServiceError: the connection closed.
            Exception: the oldest failure a posted request reported.
        """
        if self._posted:
            self.wait_reply(self.send(p.MSG_PING))
            self.drain_ring()
        self.raise_deferred()

    # ------------------------------------------------------------ receiving
    def _read(
        self, timeout: float | None, nonblocking: bool = False, spin: float = 0.0
    ) -> list[p.Frame]:
        """Read once (we are the leader) and decode; [] on timeout.

        Args:
            timeout: seconds to wait (None: forever).
            nonblocking: only what is there already.
            spin: seconds to poll without sleeping first (a reply due soon).
        """
        sock = self.sock
        buf = self._rbuf
        anc: list[tuple[int, int, bytes]] = []
        n = -1
        try:
            if not nonblocking and not self.want_fds:
                # spin, then poll() and recv, in C without the GIL (see recv_wait)
                n = _cext.recv_wait(self._fileno, buf, int(spin * 1e9), _wait_ms(timeout))
                if n < 0:
                    return []
            else:
                # poll first: its wait ignores the peer reading our request (a
                # write-space wake-up), which would wake a recv() for nothing
                poll_ms = None if timeout is None else max(timeout, 0) * 1000
                if not nonblocking and not self._poller.poll(poll_ms):
                    return []
                flags = socket.MSG_DONTWAIT if nonblocking else 0
                if self.want_fds:
                    n, anc, _flags, _addr = sock.recvmsg_into([buf], _ANCBUF, flags)
                else:
                    n = sock.recv_into(buf, 0, flags)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            n = 0
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)
        if not n:
            self._eof = True
            return []
        return self._decoder.feed(buf[:n])

    def _dispatch(self, frames: list[p.Frame]) -> None:
        """Sort frames (caller holds ``_mu``), finish posted requests, wake every waiter."""
        for fr in frames:
            flags = fr.flags
            if flags & p.F_REPLY:
                entry = self._posted.pop(fr.seq, None)
                if entry is None:
                    if fr.seq in self._abandoned:
                        self._abandoned.discard(fr.seq)
                    else:
                        self._replies[fr.seq] = fr
                    continue
                self._sock_posted.discard(fr.seq)
                # (gfn, on_reply): a one-op unmap (see post_unmap_one)
                done = entry[1] if isinstance(entry, tuple) else entry
                try:
                    err = done(fr.payload or b"")
                except Exception as e:
                    err = e
                if err is not None:
                    self.deferred.append(err)
            elif flags & p.F_ASYNC:
                pl = fr.payload or b""
                if fr.type == p.MSG_EVENT and len(pl) == 4:
                    self.events.append(p.U32.unpack(pl)[0])
                elif fr.type == p.MSG_WATCH_EVENT:
                    parts = p.split_strings(pl)
                    if len(parts) >= 2:
                        self.watch_events.append((parts[0].decode(), parts[1].decode()))
        if self._waiting:
            self._cv.notify_all()
        if self._async_waiters:
            waiters, self._async_waiters = self._async_waiters, []
            for loop, fut in waiters:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, fut)

    def _lead(self, timeout: float | None, spin: float = 0.0) -> bool:
        """Read as leader (``_leader`` already set); False if nothing came."""
        frames: list[p.Frame] = []
        try:
            frames = self._read(timeout, spin=spin)
        finally:
            with self._mu:
                self._leader = False
                self._dispatch(frames)
        return bool(frames) or self._eof

    def _follow(self, remaining: float | None) -> None:
        """Wait (caller holds ``_mu``) for the leader to sort what it read."""
        self._waiting += 1
        try:
            self._cv.wait(remaining)
        finally:
            self._waiting -= 1

    def _claim(self, seq: int) -> bool:
        """Become the reader for one C read of the reply to ``seq`` (see :meth:`_wait_alone`).

        Returns:
            False if this is not the common case: another thread reads the
            socket, it closed, the memfd has not come yet, a message is
            held half-decoded, or the reply came already (read by another
            thread between the send and this call).
        """
        with self._mu:
            if (self._leader or self._eof or self.want_fds or not self._decoder.idle
                    or seq in self._replies):
                return False
            self._leader = True
            return True

    def _settle(self, seq: int, end: int, start: int, length: int, skip: int = 0,
                want: bool = True) -> bytes | None:
        """Give up the reader role after a C read of ``buf[:end]`` (:meth:`_claim`).

        Decodes and dispatches, in stream order, the messages before the
        reply (from ``skip``: C did those before it) and after it, and wakes
        whoever follows.

        Args:
            seq: the request.
            end, start, length: as ``_cext.recv_reply`` returns them.
            skip: where the messages C left start.
            want: whether the reply's payload is wanted.

        Returns:
            The reply's payload if wanted and it came; else None.

        Raises:
            ServiceError: the service closed the connection, or the channel
                timeout passed.
        """
        buf = self._rbuf
        frames: list[p.Frame] = []
        reply = None
        try:
            feed = self._decoder.feed
            if start >= 0:
                if start - p.HEADER_SIZE > skip:
                    frames = feed(buf[skip : start - p.HEADER_SIZE])
                if want:
                    reply = bytes(buf[start : start + length])
                if end > start + length:
                    frames += feed(buf[start + length : end])
            elif end > skip:
                frames = feed(buf[skip:end])
            if start == -2:
                self._eof = True
        finally:
            with self._mu:
                self._leader = False
                if frames or self._waiting or self._async_waiters:  # else nothing to do
                    self._dispatch(frames)
        if start == -2:
            raise ServiceError(errno.ECONNRESET, "the service closed the connection")
        if start == -3:
            self._abandon(seq)
            raise ServiceError(errno.ETIMEDOUT, f"no reply to request {seq}")
        return reply

    def _abandon(self, seq: int) -> None:
        """Nobody waits for the reply to ``seq`` any more.

        Its reply is dropped, now or when it comes; or, if the caller left
        something to run on it (``_late[seq]``: a map's, to undo it), that
        runs then, as a posted request's ``on_reply`` does.
        """
        late = self._late.pop(seq, None)
        with self._mu:
            fr = self._replies.pop(seq, None)
            if fr is None:
                if late is not None:
                    self._posted[seq] = late
                elif seq not in self._posted:
                    self._abandoned.add(seq)
        if fr is not None and late is not None:
            self._run_late(late, fr.payload or b"")

    def _run_late(self, late: OnReply, payload: bytes) -> None:
        """Run a given-up request's ``late`` on its reply; keep what it reports."""
        try:
            err = late(payload)
        except Exception as e:
            err = e
        if err is not None:
            with self._mu:
                self.deferred.append(err)

    def _wait_alone(self, seq: int) -> bytes | None:
        """The payload of the reply to ``seq``, read by one C call while nobody else reads.

        The common case of :meth:`wait_reply`: no other thread is reading
        the socket (threads that wait for one that reads follow this call
        instead, as they would follow :meth:`_lead`), nothing is held
        half-decoded.  ``_cext.recv_reply`` reads
        until the reply is in the receive buffer; the messages before it
        (posted replies, events) are decoded and dispatched first, as
        :meth:`_dispatch` keeps stream order.

        Returns:
            The payload; None if this is not the common case, or the reply
            did not fit the buffer (:meth:`wait_reply` goes on then).

        Raises:
            ServiceError: the service closed the connection, or the channel
                timeout passed.
        """
        if not self._claim(seq):
            return None
        try:
            got = _cext.recv_reply(
                self._fileno, self._rbuf, seq, int(self.spin * 1e9), _wait_ms(self.timeout)
            )
        except OSError:
            got = (0, -2, 0)
        except BaseException:
            self._settle(seq, 0, -1, 0)
            self._abandon(seq)
            raise
        end, start, length = got[:3]
        if start == -5:  # a signal handler raised after buf[:end] came: keep it, then raise
            self._settle(seq, end, -1, 0)
            self._abandon(seq)
            raise got[3]
        return self._settle(seq, end, start, length)

    def map_one(
        self, domid: int, ref: int, gfn: int, flags: int, p2m: dict[int, Any],
        on_late: OnReply | None = None,
    ) -> tuple[int, int, int, bytes | None, list[int]] | None:
        """The one-page lane: a ``GNTTABOP_map_grant_ref`` of one op, in one C call.

        ``_cext.map_one`` sends the request, reads up to its reply, and does
        the replies of posted one-op unmaps before it (entries ``(gfn,
        on_reply)`` in the posted table: see :meth:`post_unmap_one`) as
        their ``on_reply`` would; the rest is settled as :meth:`request`
        settles it.

        Args:
            domid, ref: the grant.
            gfn: the hole that takes it (``host_addr`` is ``gfn << 12``).
            flags: the op's ``GNTMAP_*`` flags.
            p2m: the p2m mirror (a success sets ``p2m[gfn]``).
            on_late: run on the reply if the wait is given up (see :meth:`request`).

        Returns:
            ``(handle, mfn, p2mt, None, freed)`` when the reply is a success
            (``p2m`` has it already); ``(-1, 0, 0, payload, freed)`` for any
            other reply, to be finished as :meth:`request`'s;
            ``freed``: holes of posted unmaps done here.  None if this is
            not the common case (nothing sent: use :meth:`request`).

        Raises:
            ServiceError: the connection closed or timed out.
            Exception: a failure a posted request reported; nothing is sent.
        """
        if self.deferred:
            self.raise_deferred()
        if self.ring is not None and not self._sock_posted:
            got = self._ring_map_one(self.ring, domid, ref, gfn, flags, p2m, on_late)
            if got is not None:
                return got
        seq = next(self._seq) & 0xFFFFFFFF
        if not self._claim(seq):  # claimed before the send: no other reader takes the reply
            return None
        if on_late is not None:
            self._late[seq] = on_late
        try:
            return self._map_one_socket(seq, domid, ref, gfn, flags, p2m)
        finally:
            self._late.pop(seq, None)  # answered, or given up (then _abandon took it)

    def _map_one_socket(
        self, seq: int, domid: int, ref: int, gfn: int, flags: int, p2m: dict[int, Any]
    ) -> tuple[int, int, int, bytes | None, list[int]] | None:
        """:meth:`map_one` on the socket, ``seq`` claimed (:meth:`_claim`)."""
        freed: list[int] = []
        try:
            got = _cext.map_one(
                self._fileno, self._send_lock, self._rbuf, seq, gfn, flags, ref, domid,
                int(self.spin * 1e9), _wait_ms(self.timeout), self._posted, p2m, freed,
            )
        except OSError as e:  # nothing sent
            self._settle(seq, 0, -1, 0)
            raise ServiceError(errno.EPIPE, f"service connection lost: {e}") from None
        except BaseException:
            self._settle(seq, 0, -1, 0)
            self._abandon(seq)
            raise
        if got is None:
            self._settle(seq, 0, -1, 0)
            return None
        self.sent += 1
        if got[4] == -5:  # a signal handler raised after buf[:end] came: keep it, then raise
            self._settle(seq, got[3], -1, 0)
            self._abandon(seq)
            raise got[7]
        if self._sock_posted:  # C did the posted unmaps it read: they are answered
            self._sock_posted.intersection_update(self._posted)
        handle, mfn, p2mt, end, start, length, skip = got
        reply = self._settle(seq, end, start, length, skip, handle < 0)
        if handle >= 0:
            return handle, mfn, p2mt, None, freed
        if reply is None:  # it did not fit the buffer
            reply = self.wait_reply(seq).payload or b""
        return -1, 0, 0, reply, freed

    def _ring_map_one(
        self, ring: ClientRing, domid: int, ref: int, gfn: int, flags: int, p2m: dict[int, Any],
        on_late: OnReply | None = None,
    ) -> tuple[int, int, int, bytes | None, list[int]] | None:
        """:meth:`map_one` on the request ring (service/ring.py): one C call, and
        no system call while the service polls.

        Responses to posted one-op unmaps before its own are done as
        :meth:`map_one` does them on the socket.  The socket is not read
        here (its messages are for whoever reads it), only watched for a
        hang-up.

        Returns:
            As :meth:`map_one`; None if the ring cannot take it now (another
            thread consumes its responses; the ring is full; a value does
            not fit): nothing was sent.

        Raises:
            ServiceError: the connection closed, timed out, or the service's
                ring response is not one it sends.
        """
        if not self._ring_rx.acquire(blocking=False):
            return None
        freed: list[int] = []
        later: list[Any] = []
        seq = next(self._seq) & 0xFFFFFFFF
        if on_late is not None:
            self._late[seq] = on_late
        try:
            st, handle, mfn, p2mt = _cext.ring_map_one(
                ring.mem, ring.state, self._send_lock, ring.kick, seq, gfn, flags, ref, domid,
                int(self.spin * 1e9), _wait_ms(self.timeout), self._posted, p2m, freed, later,
                ring.wait, self._fileno,
            )
        except BaseException:  # a signal handler raised while it waited
            self._give_holes(freed)  # posted unmaps it did on the way
            self._abandon(seq)  # an answer on the socket is dropped (the ring's is ignored)
            raise
        finally:
            self._ring_rx.release()
        if later:
            self._ring_later(later)
        if st == 0:
            self._late.pop(seq, None)
            self.sent += 1
            return handle, mfn, p2mt, None, freed
        self._give_holes(freed)
        if st == 5:  # nothing sent
            self._late.pop(seq, None)
            return None
        self.sent += 1
        if st == 1:  # refused, or not the common case: the reply comes on the socket
            try:
                return -1, 0, 0, self.wait_reply(seq).payload or b"", []
            finally:
                self._late.pop(seq, None)  # (a wait given up: _abandon took it already)
        if st == -3:
            self._abandon(seq)  # the late answer runs _late[seq], or is dropped
            raise ServiceError(errno.ETIMEDOUT, f"no reply to request {seq}")
        self._late.pop(seq, None)
        if st == -2:
            raise ServiceError(errno.ECONNRESET, "the service closed the connection")
        raise ServiceError(errno.EBADMSG, f"ring: a response the service does not send ({st})")

    def _ring_later(self, later: list[Any]) -> None:
        """What ring_collect left for Python: seqs of posted requests answered on the
        socket (wait for their replies, so their outcome is known before this call
        returns), and the response slots of given-up maps (run their ``late``)."""
        waits = [x for x in later if isinstance(x, int)]
        for slot in later:
            if isinstance(slot, bytes):
                seq = ring_response_seq(slot)
                with self._mu:
                    late = self._posted.pop(seq, None)
                if late is not None and not isinstance(late, tuple):
                    self._run_late(late, ring_response_payload(slot))
        if waits:
            self.wait_posted(waits)

    def _give_holes(self, freed: list[int]) -> None:
        """Holes of posted unmaps a ring read finished, back to the domain."""
        if freed and self.ring_holes is not None:
            self.ring_holes(freed)

    def drain_ring(self, wait: bool = True) -> None:
        """Do the ring responses that came (posted one-op unmaps): holes back, p2m updated.

        Args:
            wait: if another thread is consuming the ring's responses, wait
                for it (else leave them to it).

        Raises:
            ServiceError: the service's ring indices are bogus.
        """
        p2m = self.ring_p2m
        if self.ring is None or p2m is None or not self._ring_rx.acquire(blocking=wait):
            return
        freed: list[int] = []
        later: list[Any] = []
        try:
            ring = self.ring
            st = 3
            if ring is not None:
                st = _cext.ring_collect(ring.mem, ring.state, self._posted, p2m, freed, later)
        finally:
            self._ring_rx.release()
        self._give_holes(freed)
        if later:  # (seqs answered on the socket: their replies come with dispatch)
            self._ring_later([x for x in later if isinstance(x, bytes)])
        if st == -4:
            raise ServiceError(errno.EBADMSG, "ring: the service's rsp_prod is bogus")

    def post_unmap_one(self, gfn: int, handle: int, on_reply: OnReply) -> bool:
        """Post a ``GNTTABOP_unmap_grant_ref`` of one op (``host_addr`` ``gfn << 12``).

        As :meth:`post`, with the posted entry ``(gfn, on_reply)``: its
        reply, when it has a success's shape, is done by the next
        :meth:`map_one` (``gfn`` leaves its p2m and comes back as a hole).

        Args:
            gfn: the hole the grant is mapped at.
            handle: the map's handle.
            on_reply: run with the reply's payload when Python reads it
                instead (any reply that is not a success's, or one read by
                a wait other than :meth:`map_one`).

        Returns:
            False if ``gfn`` or ``handle`` does not fit the op (nothing sent).

        Raises:
            ServiceError: the connection is gone.
            Exception: an earlier posted request's failure; nothing is sent.
        """
        if self.deferred:
            self.raise_deferred()
        seq = next(self._seq) & 0xFFFFFFFF
        ring = self.ring
        on_ring = ring is not None and not self._sock_posted
        with self._mu:
            self._posted[seq] = (gfn, on_reply)
            if not on_ring:
                self._sock_posted.add(seq)
        if ring is not None and on_ring:
            args = (ring.mem, ring.state, self._send_lock, ring.kick, seq, gfn, handle)
            sent = _cext.ring_post_unmap(*args)
            if sent < 0:  # full: take the responses waiting there, then try again
                self.drain_ring(wait=False)
                sent = _cext.ring_post_unmap(*args)
            if sent > 0:
                self.sent += 1
                return True
            with self._mu:
                if sent == 0:
                    self._posted.pop(seq, None)
                    return False
                self._sock_posted.add(seq)  # still full: on the socket
        try:
            if _cext.send_unmap_one(self._fileno, self._send_lock, seq, gfn, handle):
                self.sent += 1
                return True
            err: OSError | None = None
        except OSError as e:
            err = e
        with self._mu:
            self._posted.pop(seq, None)
            self._sock_posted.discard(seq)
        if err is not None:
            raise ServiceError(errno.EPIPE, f"service connection lost: {err}") from None
        return False

    def wait_reply(self, seq: int) -> p.Frame:
        """The reply to request ``seq``.

        Raises:
            ServiceError: the service closed the connection, or the channel
                timeout passed.
        """
        try:
            fr: p.Frame = self._await(
                lambda: self._replies.pop(seq, None), self.timeout, self.spin, f"request {seq}"
            )
        except BaseException:
            self._abandon(seq)
            raise
        return fr

    def wait_posted(self, seqs: list[int]) -> None:
        """Wait until the replies to posted requests ``seqs`` have been read and done.

        Raises:
            ServiceError: the service closed the connection, or the channel
                timeout passed.
        """
        posted = self._posted
        self._await(
            lambda: not any(s in posted for s in seqs) or None, self.timeout, self.spin,
            f"requests {seqs}",
        )

    def _await(
        self, done: Callable[[], Any], timeout: float | None, spin: float, what: str | None
    ) -> Any:
        """Read (or follow the reader) until ``done()`` (called holding ``_mu``) is not None.

        Args:
            done: what is waited for, None until it is there.
            timeout: seconds (None: forever).
            spin: seconds the reader polls before it sleeps (0 for events).
            what: the reply waited for, named in the timeout's error; None:
                a timeout returns None instead.

        Raises:
            ServiceError: the service closed the connection, or ``timeout``
                passed (when ``what`` is given).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = None
        while True:
            with self._mu:
                got = done()
                if got is not None:
                    return got
                if self._eof:
                    raise ServiceError(errno.ECONNRESET, "the service closed the connection")
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if what is None:
                            return None
                        raise ServiceError(errno.ETIMEDOUT, f"no reply to {what}")
                if self._leader:
                    self._follow(remaining)
                    continue
                self._leader = True
            self._lead(remaining, spin)

    def _take(self, queue: deque[Any], match: Any) -> Any:
        """The first item of ``queue`` equal to ``match`` (caller holds ``_mu``); None if
        there is none yet.

        Raises:
            ServiceError: none, and none can come: the connection closed.
        """
        item = _take(queue, match)
        if item is None and self._eof:
            raise ServiceError(errno.ECONNRESET, "the service closed the connection")
        return item

    def wait_for(self, queue: deque[Any], match: Any, timeout: float | None) -> Any:
        """Take the first item of ``queue`` equal to ``match`` (None: any).

        Returns:
            The item, or None when ``timeout`` passes first.

        Raises:
            ServiceError: the connection closed.
        """
        return self._await(lambda: _take(queue, match), timeout, 0.0, None)

    async def wait_for_async(self, queue: deque[Any], match: Any, timeout: float | None) -> Any:
        """asyncio twin of :meth:`wait_for`: reads from the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._mu:
                item = self._take(queue, match)
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
                    item = _take(queue, match)
                return item

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._mu:
            if not any(lp is loop for lp, _ in self._async_waiters) or self._eof or self._leader:
                # Nobody here waits, or a thread is reading: stop watching the
                # socket (it stays readable until that thread reads, and the
                # loop would spin on it).  The thread wakes our waiters when it
                # sorts what it read (_dispatch), and they watch it again.
                self._reader_loops.discard(loop)
                loop.remove_reader(self._fileno)
                return
            self._leader = True
        frames: list[p.Frame] = []
        try:
            while True:
                got = self._read(None, nonblocking=True)
                if not got:
                    break
                frames += got
        finally:
            with self._mu:
                self._leader = False
                self._dispatch(frames)
            if self._eof:
                self._reader_loops.discard(loop)
                loop.remove_reader(self._fileno)

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
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        with self._ring_rx:  # no thread in a ring call (they end: the socket is shut)
            ring, self.ring = self.ring, None
        if ring is not None:
            with contextlib.suppress(BufferError):  # a thread still posting: left to the GC
                ring.close()


_ANCBUF = socket.CMSG_SPACE(4 * struct.calcsize("i"))
#: Up to this many payload bytes a request is joined into one buffer; larger
#: ones go out with sendmsg, uncopied.
_GATHER = 1 << 14
#: What a posted request runs on its reply: the failure to report, or None.
OnReply = Callable[[bytes], Optional[BaseException]]


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


# --------------------------------------------------------------- hypercalls
class RemoteHypercalls:
    """:class:`~xengrant.hypercall.Hypercalls` of a domain in the service.

    Args:
        channel: a connection bound to the domain.
        domid: the domain.
        fd: the domain's memory socket (service/memview.py).
        nr_frames: machine frames in it.
    """

    def __init__(self, channel: Channel, domid: int, fd: int, nr_frames: int) -> None:
        self.channel = channel
        self.domid = domid
        self.nr_frames = nr_frames
        #: the frames this process may reach, placed where machine memory would be
        self.memory = ClientMemory(fd, nr_frames)
        self._mmap = self.memory.mm
        #: the domain's p2m as the service last told us: gfn -> (mfn, type)
        self.p2m: dict[int, tuple[int, int]] = {}
        #: run on the reply of a map hypercall whose caller gave up (set by the gnttab)
        self.late_map: OnReply | None = None
        #: Xen's debug reasons for the ops that failed in the last call.
        self.last_reasons: list[str] = []
        self._closed = False

    def _apply_delta(self, body: bytes | memoryview, pos: int) -> int:
        """Apply the p2m entries at ``body[pos:]`` to the mirror; the position after them.

        One C loop (``_cext.p2m_apply``) over the columns of
        :func:`~xengrant.service.protocol.pack_p2m`: set each entry, or pop
        the gfns that hold nothing now.

        Raises:
            ServiceError: EBADMSG, the delta is truncated (nothing applied).
        """
        try:
            end: int = _cext.p2m_apply(self.p2m, body, pos)
        except ValueError as e:
            raise ServiceError(errno.EBADMSG, str(e)) from None
        return end

    def _nbytes(self, cmd: int, uop: memoryview, count: int) -> tuple[int, int | None]:
        """``(bytes of uop the call reads, op size or None for an unknown cmd)``."""
        size = _OP_SIZES.get(cmd)
        if size is None or count < 0 or count > 0x7FFFFFFF:
            return 0, size
        if cmd in _ONE_OP:
            return min(len(uop), size), size
        return min(len(uop), size * count), size

    def grant_table_op(self, cmd: int, uop: memoryview, count: int) -> int:
        """``HYPERVISOR_grant_table_op`` in the service; OUT fields come back into ``uop``."""
        nbytes, size = self._nbytes(cmd, uop, count)
        if cmd in _SPLITTABLE and size is not None and nbytes > _BATCH_BYTES:
            per = _BATCH_BYTES // size
            done = 0
            while done < count:
                n = min(per, count - done)
                rc = self._gnttab(cmd, uop[done * size : (done + n) * size], n)
                if rc < 0:
                    return rc
                done += n
            return 0
        return self._gnttab(cmd, uop[:nbytes], count)

    def _gnttab(self, cmd: int, uop: memoryview, count: int) -> int:
        late = self.late_map if cmd == gt.GNTTABOP_map_grant_ref else None
        body = self.channel.request(
            p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(cmd, count), uop, on_late=late
        )
        return self._finish(body, uop)

    def _finish(self, body: bytes, uop: memoryview) -> int:
        """Take a GNTTAB_OP reply: OUT fields into ``uop``, p2m entries, reasons.

        Returns:
            The hypercall's return.

        Raises:
            HypercallError: the service refused the request (-errno).
            ServiceError: EBADMSG, a reply too short to be one.
        """
        if len(body) < _GNTTAB_HEAD.size:
            status = p.I32.unpack_from(body)[0] if len(body) >= 4 else -errno.EBADMSG
            if status >= 0:
                raise ServiceError(errno.EBADMSG, "short GNTTAB_OP reply")
            raise HypercallError("grant_table_op", -status, body[4:].decode("utf-8", "replace"))
        status, rc, n = _GNTTAB_HEAD.unpack_from(body)
        if status < 0:
            raise HypercallError("grant_table_op", -status, body[4:].decode("utf-8", "replace"))
        if n:
            uop[:n] = memoryview(body)[12 : 12 + n]
        pos = self._apply_delta(body, 12 + n)
        self.last_reasons = p.unpack_reasons(body, pos) if len(body) - pos > 2 else []
        return int(rc)

    def post_grant_table_op(
        self,
        cmd: int,
        uop: memoryview,
        count: int,
        done: Callable[[int], BaseException | None],
    ) -> None:
        """``HYPERVISOR_grant_table_op`` without waiting for it (``F_POSTED``).

        The service runs it before any later request of this domain.  When its
        reply is read (at the latest with the next reply), the OUT fields go
        into ``uop``, the p2m mirror is updated, and ``done(rc)`` runs; the
        failure it returns (or raises) surfaces from the next call
        (:attr:`Channel.deferred`).

        Raises:
            ServiceError: the connection is gone.
            Exception: an earlier posted call's failure; nothing is sent.
        """
        nbytes, size = self._nbytes(cmd, uop, count)
        if cmd in _SPLITTABLE and size is not None and nbytes > _BATCH_BYTES:
            raise ValueError(f"post_grant_table_op: {nbytes} bytes of ops is over one message")
        ops = uop[:nbytes]

        def on_reply(body: bytes) -> BaseException | None:
            return done(self._finish(body, ops))

        self.channel.post(p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(cmd, count), on_reply, ops)

    def populate_physmap(self, gfns: Sequence[int]) -> list[int]:
        """``XENMEM_populate_physmap`` in the service."""
        done: list[int] = []
        for i in range(0, len(gfns), _GFNS_PER_MSG) or [0]:
            chunk = list(gfns[i : i + _GFNS_PER_MSG])
            body = self.channel.call_ok(p.MSG_POPULATE, p.pack_i64s(chunk), "populate_physmap")
            (n,) = p.U32.unpack_from(body)
            got = list(struct.unpack_from(f"<{n}q", body, 4))
            self._apply_delta(body, 4 + 8 * n)
            done += got
            if n < len(chunk):
                break
        return done

    def decrease_reservation(self, gfns: Sequence[int]) -> int:
        """``XENMEM_decrease_reservation`` in the service."""
        total = 0
        for i in range(0, len(gfns), _GFNS_PER_MSG) or [0]:
            chunk = list(gfns[i : i + _GFNS_PER_MSG])
            body = self.channel.call_ok(
                p.MSG_DECREASE, p.pack_i64s(chunk), "decrease_reservation"
            )
            (n,) = p.U32.unpack_from(body)
            self._apply_delta(body, 4)
            total += n
            if n < len(chunk):
                break
        return total

    def add_to_physmap(self, space: int, idx: int, gpfn: int) -> int:
        """``XENMEM_add_to_physmap`` in the service."""
        body = self.channel.call_ok(
            p.MSG_ADD_TO_PHYSMAP,
            p.ADD_TO_PHYSMAP_REQ.pack(space, idx & 0xFFFFFFFFFFFFFFFF, gpfn),
            "add_to_physmap",
        )
        (rc,) = p.I32.unpack_from(body)
        self._apply_delta(body, 4)
        return int(rc)

    def translate(self, gfns: Sequence[int], writable: bool) -> list[tuple[int, int]]:
        """Ask the service for ``(mfn, type)`` of each gfn (refreshing the mirror).

        Raises:
            HypercallError: EFAULT, as the domain's MMU would fault.
        """
        body = self.channel.call_ok(
            p.MSG_TRANSLATE, p.U32.pack(int(writable)) + p.pack_i64s(list(gfns)), "access"
        )
        size = p.TRANSLATE_ENTRY.size
        out = [p.TRANSLATE_ENTRY.unpack_from(body, i * size) for i in range(len(gfns))]
        self._apply_delta(body, len(gfns) * size)
        return [(int(m), int(t)) for m, t in out]

    def map_gfns(self, gfns: Sequence[int], writable: bool) -> Any:
        """A FrameView of the domain's frames, mapped in this process.

        The frames' files are placed in this process's range of machine
        memory (asked for once, :meth:`reach`): contiguous frames are a view
        of that range; a read-only view of foreign frames, or frames that are
        not contiguous, is a new ``mmap`` of exactly those frames
        (``PROT_READ`` unless ``writable``).

        Raises:
            HypercallError: EFAULT for a gfn with nothing mapped, or a
                writable view of a read-only grant mapping; EACCES for a
                foreign frame whose file holds pages not granted to us.
        """
        n = len(gfns)
        if n == 0:
            raise ValueError("no frames to view")
        mem = self.memory
        if writable:
            # the common case at C speed: every gfn in the mirror, none a
            # read-only grant mapping (an int: the first that is not)
            got = _cext.translate(self.p2m, list(gfns), P2M_GRANT_MAP_RO)
            if not isinstance(got, int):
                mem.ensure(got, gfns, True, self.reach)
                return mem.view(got, False)
        ents: list[Any] = list(map(self.p2m.get, gfns))
        types = set(map(_second, ents)) if None not in ents else {-1}
        if -1 in types or (writable and P2M_GRANT_MAP_RO in types):
            ents = self.translate(gfns, writable)  # refreshes the mirror; EFAULT as the MMU
            types = set(map(_second, ents))
        mfns: list[int] = list(map(_first, ents))
        mem.ensure(mfns, gfns, writable, self.reach)
        if not writable and not types.isdisjoint(_FOREIGN):
            # a read-only grant: a mapping of its own, PROT_READ (a store
            # faults even through ctypes)
            return mem.fresh_view(mfns, True)
        return mem.view(mfns, not writable)

    def reach(self, gfns: Sequence[int], writable: bool) -> int:
        """``MSG_REACH``: ask for the files backing ``gfns`` (they come on the memory socket).

        Returns:
            How many files the service sent.

        Raises:
            HypercallError: EACCES, EFAULT (see ``Backing.reach``).
        """
        sent = 0
        for i in range(0, len(gfns), _GFNS_PER_MSG):
            chunk = list(gfns[i : i + _GFNS_PER_MSG])
            body = self.channel.call_ok(
                p.MSG_REACH, p.U32.pack(int(writable)) + p.pack_i64s(chunk), "map"
            )
            sent += p.U32.unpack_from(body)[0]
        return sent

    def prepare_grant(self, gfns: Sequence[int], grantee: int) -> None:
        """Before granting RAM pages: each gets a file of its own (``MSG_GRANT_PREPARE``),
        so that the grantee can map it without reaching its neighbours.

        Raises:
            HypercallError: EINVAL (not our RAM), ENOMEM.
        """
        self.channel.call_ok(
            p.MSG_GRANT_PREPARE, p.U32.pack(grantee & 0xFFFFFFFF) + p.pack_i64s(list(gfns)),
            "grant_access",
        )
        self.memory.drain()

    def end_grant(self, gfns: Sequence[int]) -> None:
        """After ending access to RAM pages we keep: those a peer could still reach
        move to fresh files (``MSG_GRANT_END``).

        Raises:
            HypercallError: EINVAL (not our RAM).
        """
        self.channel.call_ok(p.MSG_GRANT_END, p.pack_i64s(list(gfns)), "end_access")
        self.memory.drain()

    def close(self) -> None:
        """Let go of machine memory (views still alive keep their mappings)."""
        if self._closed:
            return
        self._closed = True
        self.memory.close()


# ---------------------------------------------------------- portable layer
class _NotifyingShareOwner:
    """A share's owner that fires its gntalloc unmap notification first."""

    def __init__(self, inner: Any, gntshr: RemoteGntshr, ref: int) -> None:
        self.inner = inner
        self.gntshr = gntshr
        self.ref = ref

    def _fire(self) -> None:
        if self.ref >= 0:
            ref, self.ref = self.ref, -1
            self.gntshr._fire_notify(ref)

    def _try_unshare(self, share: Share, release_refs: bool) -> None:
        self._fire()
        self.inner._try_unshare(share, release_refs)

    def _abandon_share(self, share: Share) -> None:
        with contextlib.suppress(Exception):
            self._fire()
        self.inner._abandon_share(share)


class RemoteGntshr(EmulatedGntshr):
    """:class:`~xengrant.portable.Gntshr` plus gntalloc's unmap notification."""

    def share_page_notify(
        self, domid: int, writable: bool = True, notify_offset: int = -1, notify_port: int = -1
    ) -> Share:
        """``xengntshr_share_page_notify``: one page; when it is unshared (or this
        process dies) the byte at ``notify_offset`` is cleared and/or an event
        sent on ``notify_port`` (-1: none).

        Raises:
            HypercallError: EINVAL (bad offset or unbound port); nothing stays shared.
        """
        share = self.share_pages(domid, 1, writable)
        action = (UNMAP_NOTIFY_CLEAR_BYTE if notify_offset >= 0 else 0) | (
            UNMAP_NOTIFY_SEND_EVENT if notify_port >= 0 else 0
        )
        if action:
            try:
                self._set(share.refs[0], max(notify_offset, 0), action, max(notify_port, 0))
            except BaseException:
                self.unshare(share)
                raise
            share._owner = _NotifyingShareOwner(share._owner, self, share.refs[0])
        return share

    def _set(self, ref: int, offset: int, action: int, port: int) -> None:
        if not 0 <= offset < PAGE_SIZE:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"offset {offset}")
        hc = self.domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        hc.channel.call_ok(
            p.MSG_UNMAP_NOTIFY_SET,
            p.NOTIFY_SET_REQ.pack(p.NOTIFY_GNTALLOC, ref, offset, action, port),
            "set_unmap_notify",
        )

    def _fire_notify(self, ref: int) -> None:
        hc = self.domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        hc.channel.call_ok(
            p.MSG_UNMAP_NOTIFY_FIRE, p.NOTIFY_FIRE_REQ.pack(p.NOTIFY_GNTALLOC, ref), "unmap_notify"
        )

    def unshare(self, share: Share) -> None:
        """Stop sharing (firing the page's unmap notification first, if any)."""
        owner = share._owner
        if isinstance(owner, _NotifyingShareOwner):
            owner._fire()
            share._owner = owner.inner
        super().unshare(share)


class RemoteGnttab(EmulatedGnttab):
    """:class:`~xengrant.portable.Gnttab` with posted unmaps, one-message copies and
    gntdev's unmap notify.

    Mapping and unmapping work as gntdev's ``IOCTL_GNTDEV_MAP_GRANT_REF`` +
    ``mmap`` and ``munmap``: one ``GNTTABOP_map_grant_ref`` for the whole
    batch, all or nothing.  :meth:`Mapping.unmap` of a mapping made here
    *posts* its ``GNTTABOP_unmap_grant_ref`` (see :meth:`_unmap`): it returns
    without waiting for the service, as ``xengnttab_unmap`` reports only
    ``munmap``'s result on Linux.
    """

    #: largest number of segments copied in one hypercall (bounce pages kept)
    COPY_BATCH = 256

    def __init__(self, domain: Domain) -> None:
        super().__init__(domain)
        self._bounces: Any = None
        hc = domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        self._hc = hc
        hc.late_map = partial(self._late_map, None)  # for every map hypercall

    # ------------------------------------------------------------ mapping
    def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> Mapping:
        """Map one grant.

        Raises:
            GrantError: with Xen's GNTST code.
            ValueError: a domid or ref that does not fit the op.
        """
        return self._map([domid], [ref], writable)

    def map_grant_refs(self, grants: Sequence[tuple[int, int]], writable: bool = True) -> Mapping:
        """Map ``(domid, ref)`` pairs into one contiguous buffer, all or nothing.

        Raises:
            GrantError: a single grant failed (its GNTST code).
            BatchError: some of several failed (each entry's status); none stays mapped.
            ValueError: no grants, or one that does not fit the op.
        """
        return self._map([d for d, _ in grants], [r for _, r in grants], writable)

    def map_domain_grant_refs(
        self, domid: int, refs: Sequence[int], writable: bool = True
    ) -> Mapping:
        """Map several grants of one domain contiguously, all or nothing.

        Raises:
            GrantError, BatchError, ValueError: as :meth:`map_grant_refs`.
        """
        return self._map([domid] * len(refs), list(refs), writable)

    def _map(self, domids: list[int], refs: list[int], writable: bool) -> Mapping:
        """One ``GNTTABOP_map_grant_ref`` over fresh holes, then a view of them.

        As gntdev's ``gntdev_map_grant_pages``: if any op fails, the others
        are unmapped again and the holes given back (``GrantTable.map_grants``
        has the same contract, and packs its ops with the same
        :func:`~xengrant.guest.gnttab.map_ops_at_holes`).  One grant takes
        the channel's one-page lane when it is open (:meth:`_map_one`).

        Raises:
            GrantError: one grant, failed (Xen's GNTST code and debug reason).
            BatchError: several, some failed.
            ValueError: no grants, or a domid/ref that does not fit the op.
        """
        if self._hc.channel.orphans:
            self._unmap_orphans()
        if len(refs) == 1:
            mapping = self._map_one(domids[0], refs[0], writable)
            if mapping is not None:
                return mapping
        return self._map_ops(domids, refs, writable)

    def _map_ops(self, domids: list[int], refs: list[int], writable: bool) -> Mapping:
        """:meth:`_map` by ``grant_table_op`` (any batch; one op when the lane is not open)."""
        gfns, buf = map_ops_at_holes(self.domain, domids, refs, writable)
        rc = self._hc.grant_table_op(gt.GNTTABOP_map_grant_ref, memoryview(buf), len(gfns))
        return self._mapped(domids, refs, writable, gfns, buf, rc)

    def _map_one(self, domid: int, ref: int, writable: bool) -> Mapping | None:
        """One grant through the channel's one-page lane (:meth:`Channel.map_one`).

        Returns:
            The mapping; None if the lane is not open (nothing done).

        Raises:
            GrantError: Xen's GNTST code.
            ServiceError: the connection closed or timed out.
        """
        hc = self._hc
        domain = self.domain
        gfn = domain.get_pages(1)[0]
        flags = gt.GNTMAP_host_map | (0 if writable else gt.GNTMAP_readonly)
        late = partial(self._late_map, [gfn])
        try:
            got = hc.channel.map_one(domid, ref, gfn, flags, hc.p2m, late)
        except ServiceError as e:
            if e.errno == errno.EPIPE:  # nothing was sent
                domain.put_pages([gfn])
            # else (a timeout): the service may map it yet, so the hole stays
            # taken -- never a gfn mapped twice; its late reply gives it back
            # (_late_map)
            raise
        except XenError:  # an earlier posted request's failure, raised before sending
            domain.put_pages([gfn])
            raise
        if got is None:
            domain.put_pages([gfn])
            return None
        handle, mfn, p2mt, body, freed = got
        if freed:
            domain.put_pages(freed)
        if body is None:  # a success, in the p2m mirror already
            hc.last_reasons = []
            if p2mt == P2M_GRANT_MAP_RW:
                mem = hc.memory
                if mem.reach[mfn] == 2 and not mem.pending():
                    view = _cext.borrow(hc._mmap, mfn * PAGE_SIZE, PAGE_SIZE, not writable)
                else:
                    view = self._view([gfn], [handle], writable)
            else:
                view = self._view([gfn], [handle], writable)
            return Mapping(self, [domid], [ref], writable, view, [handle], resource=[gfn])
        buf = pack_map_ops([gfn], flags, [ref], [domid])
        rc = hc._finish(body, memoryview(buf))
        return self._mapped([domid], [ref], writable, [gfn], buf, rc)

    def _mapped(
        self,
        domids: list[int],
        refs: list[int],
        writable: bool,
        gfns: list[int],
        buf: bytearray,
        rc: int,
    ) -> Mapping:
        """The end of :meth:`_map`: the hypercall returned ``rc``; ``buf`` has the ops' results.

        Raises:
            GrantError, BatchError: as :meth:`_map` (the holes given back).
        """
        domain = self.domain
        if rc < 0:
            domain.put_pages(gfns)
            check_rc("map_grant_ref", rc)
        n = len(gfns)
        statuses, handles = map_results(buf, n)
        if any(statuses):
            # the grant table's rollback: the same hypercalls, through this domain's service
            domain.grant_table._map_failed(domids, refs, gfns, statuses, handles)
        view = self._view(gfns, handles, writable)
        return Mapping(self, domids, refs, writable, view, handles, resource=gfns)

    def _view(self, gfns: list[int], handles: list[int], writable: bool) -> Any:
        """The view of grants just mapped at ``gfns``; if this process may not reach
        them (the service refused their files), they are unmapped again and the
        refusal raised.

        Raises:
            HypercallError: EACCES (a file holding pages not granted to us), EFAULT.
        """
        try:
            return self._hc.map_gfns(gfns, writable)
        except HypercallError:
            buf = pack_unmap_ops(gfns, handles)
            with contextlib.suppress(XenError):
                self._hc.grant_table_op(gt.GNTTABOP_unmap_grant_ref, memoryview(buf), len(gfns))
                self.domain.put_pages(
                    [g for g, st in zip(gfns, unmap_statuses(buf, len(gfns))) if not st]
                )
            raise

    def _unmap(self, mapping: Mapping) -> None:
        """Unmap a mapping made here: ``GNTTABOP_unmap_grant_ref``, posted.

        The contract (``Mapping.unmap`` of this domain's gnttab):

        - Its memory goes at once (the view is closed); the op is sent at
          once, flagged ``F_POSTED``, and not waited for.  The service runs
          it before any later request of this domain, so a peer this domain
          signals afterwards through the service (event channel, xenstore)
          sees the grant unmapped.  A signal that does not go through the
          service (a pipe, a store to a shared ring) can overtake it: call
          :meth:`sync` first.
        - Its reply comes with the next reply on this connection (the
          service holds it until then, so it wakes nobody).  The holes go
          back to the domain when it is read, and only those whose op
          succeeded.
        - A failure (any op status other than GNTST_okay, or a refused
          hypercall) is not lost: the next call on the connection raises it
          as a :class:`~xengrant.errors.BatchError` (op ``unmap_grant_ref``,
          the GNTST codes) before sending anything, as do :meth:`sync` and
          ``RemoteDomain.close``.  Linux's gntdev behaves alike but only
          WARNs: ``xengnttab_unmap`` returns ``munmap``'s result alone
          (``__unmap_grant_pages_done``).

        Raises:
            BufferError: views of ``mapping.mem`` are alive; nothing is unmapped.
            BatchError: an earlier posted unmap failed (this mapping stays mapped).
            ServiceError: the connection is gone (the mapping stays unreleased).
        """
        ch = self._hc.channel
        if ch.deferred:
            ch.raise_deferred()
        mapping._release_memory()
        gfns: list[int] = mapping.resource
        handles = mapping.handles
        assert handles is not None
        if len(gfns) == 1:
            # the one-page lane: a success's reply is done in C by the next map
            on_reply = partial(self._one_unmapped, gfns, handles, mapping.domids, mapping.refs)
            if ch.post_unmap_one(gfns[0], handles[0], on_reply):
                mapping.released = True
                return
        buf = pack_unmap_ops(gfns, handles)
        self._hc.post_grant_table_op(
            gt.GNTTABOP_unmap_grant_ref,
            memoryview(buf),
            len(gfns),
            partial(self._unmapped, gfns, mapping.domids, mapping.refs, buf),
        )
        mapping.released = True

    def _one_unmapped(
        self, gfns: list[int], handles: list[int], domids: list[int], refs: list[int], body: bytes
    ) -> BaseException | None:
        """A posted one-op unmap's reply, when Python reads it (else ``_cext.map_one`` does)."""
        buf = pack_unmap_ops(gfns, handles)
        return self._unmapped(gfns, domids, refs, buf, self._hc._finish(body, memoryview(buf)))

    def _unmapped(
        self, gfns: list[int], domids: list[int], refs: list[int], buf: bytearray, rc: int
    ) -> BaseException | None:
        """A posted unmap's outcome: the holes whose op succeeded go back.

        Returns:
            None, or the failure the next call raises (:attr:`Channel.deferred`).
        """
        if rc < 0:
            return HypercallError("unmap_grant_ref", -rc, f"posted unmap of refs {refs}")
        statuses = unmap_statuses(buf, len(gfns))
        domain = self.domain
        if not any(statuses):
            domain.put_pages(gfns)
            return None
        # a gfn whose unmap failed may still hold the page: not a hole again
        domain.put_pages([g for g, st in zip(gfns, statuses) if st == gt.GNTST_okay])
        failed = [(domids[i], refs[i]) for i, st in enumerate(statuses) if st]
        return BatchError(
            "unmap_grant_ref",
            statuses,
            f"posted unmap of (domid, ref) {failed}, reported with a later reply",
        )

    def _orphan(self, retry: Callable[[], bool]) -> None:
        """A mapping whose views outlived it: unmap it once they are gone."""
        self.domain.grant_table._orphan(retry)

    def sync(self) -> None:
        """Wait until the service has done every posted unmap; raise a failure one reported.

        Raises:
            BatchError, HypercallError: the oldest posted unmap that failed.
            ServiceError: the connection closed.
        """
        ch = self._hc.channel
        ch.sync()  # (a given-up map's late reply is read by then)
        if ch.orphans:
            self._unmap_orphans()
            ch.sync()

    def _unmap_orphans(self) -> None:
        """Unmap what maps given up left mapped after all (:meth:`_late_map`), posted."""
        ch = self._hc.channel
        orphans, ch.orphans = ch.orphans, []
        gfns = [o[0] for o in orphans]
        domids, refs = [o[2] for o in orphans], [o[3] for o in orphans]
        buf = pack_unmap_ops(gfns, [o[1] for o in orphans])
        self._hc.post_grant_table_op(
            gt.GNTTABOP_unmap_grant_ref, memoryview(buf), len(gfns),
            partial(self._unmapped, gfns, domids, refs, buf),
        )

    def _late_map(self, gfns: list[int] | None, body: bytes) -> BaseException | None:
        """The reply to a ``GNTTABOP_map_grant_ref`` whose caller gave up (a timeout,
        a signal).

        Each op that mapped is unmapped with the next map or sync (its hole
        comes back then); each that failed gives its hole back now.  Runs
        where posted replies run (the channel's reader, holding its lock):
        nothing is sent here.

        Args:
            gfns: the holes the ops took, if the caller knows them (a
                refused hypercall gives them all back); None: only what the
                reply's ops say is done.
            body: the reply's payload.
        """
        if gfns is not None:
            n = len(gfns)
        else:  # as many as the reply carries
            n = 0
            if len(body) >= _GNTTAB_HEAD.size:
                status, _rc, size = _GNTTAB_HEAD.unpack_from(body)
                if status >= 0 and size <= len(body):
                    n = size // MAP_OP.size
        buf = bytearray(n * MAP_OP.size)
        try:
            rc = self._hc._finish(body, memoryview(buf))
        except HypercallError:  # refused whole: nothing ran
            if gfns is not None:
                self.domain.put_pages(gfns)
            return None
        except XenError:
            return None  # unreadable: the holes stay taken, as when nothing is known
        if rc < 0:
            return None  # stopped partway: which ops ran is not known
        statuses, handles = map_results(buf, n)
        ch = self._hc.channel
        for i, (st, handle) in enumerate(zip(statuses, handles)):
            host_addr, _flags, ref, dom = MAP_OP.unpack_from(buf, i * MAP_OP.size)[:4]
            if st == gt.GNTST_okay:
                ch.orphans.append((host_addr >> 12, handle, dom, ref))
            else:
                self.domain.put_pages([host_addr >> 12])
        return None

    def map_grant_ref_notify(
        self,
        domid: int,
        ref: int,
        notify_offset: int = -1,
        notify_port: int = -1,
        writable: bool = True,
    ) -> Mapping:
        """``xengnttab_map_grant_ref_notify``: map one grant; when it is unmapped
        (or this process dies) the byte at ``notify_offset`` is cleared and/or an
        event sent on ``notify_port`` (-1: none).

        Raises:
            GrantError: the map failed.
            HypercallError: the notify could not be set (nothing stays mapped).
        """
        mapping = self.map_grant_ref(domid, ref, writable)
        if notify_offset >= 0 or notify_port >= 0:
            try:
                self.set_unmap_notify(
                    mapping,
                    max(notify_offset, 0),
                    notify_port if notify_port >= 0 else None,
                    clear_byte=notify_offset >= 0,
                )
            except BaseException:
                mapping.unmap()
                raise
        return mapping

    def set_unmap_notify(
        self, mapping: Mapping, offset: int, port: int | None = None, clear_byte: bool = True
    ) -> None:
        """``IOCTL_GNTDEV_SET_UNMAP_NOTIFY`` on a mapping.

        Args:
            mapping: a mapping made by this domain.
            offset: byte offset in ``mapping.mem`` to clear.
            port: event channel to notify, or None.
            clear_byte: clear the byte (a read-only mapping refuses: EINVAL).

        Raises:
            HypercallError: EINVAL (bad offset, port or action), ENOENT.
        """
        if mapping.released or mapping.handles is None:
            raise HypercallError("set_unmap_notify", errno.ENOENT, "mapping is unmapped")
        if not 0 <= offset < len(mapping.handles) * PAGE_SIZE:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"offset {offset}")
        action = (UNMAP_NOTIFY_CLEAR_BYTE if clear_byte else 0) | (
            UNMAP_NOTIFY_SEND_EVENT if port is not None else 0
        )
        if not action:
            raise HypercallError("set_unmap_notify", errno.EINVAL, "nothing to do")
        hc = self.domain.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        handle = mapping.handles[offset // PAGE_SIZE]
        hc.channel.call_ok(
            p.MSG_UNMAP_NOTIFY_SET,
            p.NOTIFY_SET_REQ.pack(p.NOTIFY_GNTDEV, handle, offset % PAGE_SIZE, action, port or 0),
            "set_unmap_notify",
        )

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy between grants and local buffers: one hypercall per 256 segments.

        Returns:
            The statuses, also stored in each segment.

        Raises:
            ValueError: a segment with no grant side or longer than a page.
        """
        for seg in segments:
            if not 0 <= seg.len <= PAGE_SIZE:
                raise ValueError(f"grant_copy: len {seg.len} is not within a page")
            if not (isinstance(seg.source, GrantRef) or isinstance(seg.dest, GrantRef)):
                raise ValueError("grant_copy: at least one side must be a GrantRef")
        out: list[int] = []
        for i in range(0, len(segments), self.COPY_BATCH):
            out += self._copy_batch(segments[i : i + self.COPY_BATCH])
        return out

    def _copy_batch(self, segments: Sequence[CopySegment]) -> list[int]:
        n = len(segments)
        if not n:
            return []
        if self._bounces is None or len(self._bounces.gfns) < n:
            if self._bounces is not None:
                self._bounces.free()
                self._bounces = None
            self._bounces = self.domain.alloc_pages(max(n, 16))
        bounce = self._bounces
        ops = (gt.gnttab_copy * n)()
        for i, seg in enumerate(segments):
            o = ops[i]
            o.len = seg.len
            gfn = bounce.gfns[i]
            base = i * PAGE_SIZE
            if isinstance(seg.source, GrantRef):
                o.source.u.ref, o.source.domid = seg.source.ref, seg.source.domid
                o.source.offset = seg.source.offset
                o.flags |= gt.GNTCOPY_source_gref
            else:
                data = memoryview(seg.source).cast("B")[: seg.len]
                bounce.mem[base : base + seg.len] = data
                o.source.u.gmfn, o.source.domid, o.source.offset = gfn, gt.DOMID_SELF, 0
            if isinstance(seg.dest, GrantRef):
                o.dest.u.ref, o.dest.domid = seg.dest.ref, seg.dest.domid
                o.dest.offset = seg.dest.offset
                o.flags |= gt.GNTCOPY_dest_gref
            else:
                o.dest.u.gmfn, o.dest.domid, o.dest.offset = gfn, gt.DOMID_SELF, 0
        self.domain.grant_table_op(gt.GNTTABOP_copy, ops, n)
        out = []
        for i, seg in enumerate(segments):
            seg.status = int(ops[i].status)
            if seg.status == gt.GNTST_okay and not isinstance(seg.dest, GrantRef):
                dest = memoryview(seg.dest).cast("B")
                dest[: seg.len] = bounce.mem[i * PAGE_SIZE : i * PAGE_SIZE + seg.len]
            out.append(seg.status)
        return out

    def close(self) -> None:
        """Free the bounce pages."""
        super().close()
        if self._bounces is not None:
            self._bounces.free()
            self._bounces = None


# ------------------------------------------------------------------- domain
class RemoteDomain(Domain):
    """A :class:`~xengrant.guest.domain.Domain` living in the service.

    Attributes:
        xs: its xenstore connection.
        evtchn: its event channels.
        channel: the socket to the service.
    """

    def __init__(self, hypercalls: RemoteHypercalls, *, pv: bool = False) -> None:
        super().__init__(hypercalls, pv=pv)
        self.channel = hypercalls.channel
        self.xs = XenStoreClient(self.channel, self.domid)
        self.evtchn = EventChannelClient(self.channel, self.domid)
        self._remote_gntshr: RemoteGntshr | None = None
        self._remote_gnttab: RemoteGnttab | None = None
        self.closed = False
        #: attach secrets of the domains this one created (:meth:`domain_secret`)
        self.secrets: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"<RemoteDomain d{self.domid}{' pv' if self.pv else ''} at {self.channel.path}>"

    @property
    def gntshr(self) -> RemoteGntshr:
        """Portable sharing interface (libxengntshr), with unmap notification."""
        if self._remote_gntshr is None:
            self._remote_gntshr = RemoteGntshr(self)
        return self._remote_gntshr

    @property
    def gnttab(self) -> RemoteGnttab:
        """Portable mapping interface (libxengnttab), with unmap notification."""
        if self._remote_gnttab is None:
            self._remote_gnttab = RemoteGnttab(self)
        return self._remote_gnttab

    # ----------------------------------------------------------- toolstack
    def create_domain(
        self,
        domid: int | None = None,
        *,
        pv: bool = False,
        max_grant_frames: int | None = None,
        max_maptrack_frames: int | None = None,
        max_pages: int | None = None,
    ) -> int:
        """``XEN_DOMCTL_createdomain`` (dom0 only): a domain another process attaches to.

        The process attaching needs the domain's secret
        (:meth:`domain_secret`): ``connect(path, domid, secret=...)``.  The
        domain is destroyed if this connection closes before anyone attaches.

        Raises:
            HypercallError: EPERM (not privileged), EEXIST, EINVAL, ENOMEM.
        """
        body = self.channel.call_ok(
            p.MSG_DOMCTL_CREATE,
            _create_payload(domid, pv, max_grant_frames, max_maptrack_frames, max_pages),
            "createdomain",
        )
        got = int(p.DOMID.unpack_from(body)[0])
        self.secrets[got] = bytes(body[p.DOMID.size : p.DOMID.size + p.SECRET_SIZE])
        return got

    def domain_secret(self, domid: int) -> bytes:
        """The secret that attaches to ``domid``, made by :meth:`create_domain`.

        Raises:
            KeyError: this domain did not create ``domid``.
        """
        return self.secrets[domid]

    def destroy_domain(self, domid: int) -> None:
        """``XEN_DOMCTL_destroydomain`` (dom0 only).

        Raises:
            HypercallError: EPERM, ESRCH.
        """
        self.channel.call_ok(p.MSG_DOMCTL_DESTROY, p.DOMID.pack(domid), "destroydomain")

    def sync(self) -> None:
        """Wait until the service has done every posted request (``gnttab`` unmaps).

        Raises:
            BatchError, HypercallError: the oldest posted unmap that failed.
            ServiceError: the connection closed.
        """
        if self._remote_gnttab is not None:  # it also unmaps what maps given up left
            self._remote_gnttab.sync()
        else:
            self.channel.sync()

    # ------------------------------------------------------------- closing
    def close(self) -> None:
        """Leave: the service destroys this domain (as if the process died).

        Raises:
            BatchError, HypercallError: a posted unmap failed and nothing
                raised it yet (the domain is gone all the same).
        """
        if self.closed:
            return
        self.closed = True
        channel = self.channel
        if not channel.closed:
            # destroy now and wait for it, so that whoever looks next sees it
            # gone; its reply comes after every posted one
            with contextlib.suppress(ServiceError):
                channel.wait_reply(channel.send(p.MSG_CLOSE))
        late = list(channel.deferred)
        channel.deferred.clear()
        channel.close()
        hc = self.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        hc.close()
        if late:
            raise late[0]

    def __enter__(self) -> RemoteDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_payload(
    domid: int | None,
    pv: bool,
    max_grant_frames: int | None,
    max_maptrack_frames: int | None,
    max_pages: int | None,
) -> bytes:
    return p.CREATE_REQ.pack(
        p.PROTOCOL_VERSION,
        -1 if domid is None else domid,
        p.DOMFLAG_PV if pv else 0,
        -1 if max_grant_frames is None else max_grant_frames,
        -1 if max_maptrack_frames is None else max_maptrack_frames,
        -1 if max_pages is None else max_pages,
    )


def connect(
    path: str | None = None,
    domid: int | None = None,
    *,
    pv: bool = False,
    max_grant_frames: int | None = None,
    max_maptrack_frames: int | None = None,
    max_pages: int | None = None,
    timeout: float | None = None,
    spin: float | None = None,
    ring: bool | None = None,
    secret: bytes | None = None,
) -> RemoteDomain:
    """Join a running ``xengrant hypervisor`` as a domain.

    Args:
        path: the socket (default: ``$XENGRANT_SOCKET``, then
            ``$XDG_RUNTIME_DIR/xengrant.sock``, then
            ``<tmp>/xengrant-<uid>/xengrant.sock``).
        domid: None for a new domain with the next free id; 0 to become dom0
            (the service's uid, with the token it wrote beside its socket);
            another id to attach to the domain dom0 created with it.
        secret: the attach secret dom0 got for ``domid``
            (:meth:`RemoteDomain.domain_secret`); for dom0, the token
            (default: read from :func:`~xengrant.service.paths.token_path`).
        pv: create a PV domain.
        max_grant_frames, max_maptrack_frames, max_pages: limits of a new domain.
        timeout: seconds to wait for each reply (None: forever).
        spin: seconds a caller polls for its reply before sleeping
            (default :attr:`Channel.SPIN`; 0: sleep at once).
        ring: one-op maps and unmaps on a request ring shared with the
            service (service/ring.py) instead of the socket; None: yes,
            unless ``$XENGRANT_RING`` is ``0``.

    Returns:
        The domain; ``close()`` it (or exit) and the service destroys it.

    Raises:
        OSError: nothing listens at ``path``; PermissionError: another uid
            serves it, or the token file is not private.
        ValueError: a domid to attach to without its secret.
        HypercallError: EPERM (dom0 not to be had), EACCES (not the
            domain's secret), EINVAL, ENOMEM.
    """
    if domid not in (None, 0) and secret is None:
        raise ValueError(f"attaching to d{domid} takes the secret dom0 got for it")
    channel = Channel(path, timeout, spin)
    try:
        if domid is None or domid == 0:
            payload = _create_payload(domid, pv, max_grant_frames, max_maptrack_frames, max_pages)
            if domid == 0:
                payload += secret if secret is not None else read_token(token_path(channel.path))
            status, body = channel.call(p.MSG_CREATE, payload)
        else:
            assert secret is not None
            status, body = channel.call(
                p.MSG_ATTACH, p.ATTACH_REQ.pack(p.PROTOCOL_VERSION, domid) + secret
            )
        if status < 0:
            raise HypercallError("connect", -status, body.decode("utf-8", "replace"))
        _version, got, flags, nr_frames = p.DOMAIN_REPLY.unpack_from(body)
        fds = channel.take_fds()
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ServiceError(errno.EBADMSG, f"expected the memory socket, got {len(fds)} fds")
        hc = RemoteHypercalls(channel, got, fds[0], nr_frames)
        hc._apply_delta(body, p.DOMAIN_REPLY.size)
        if ring if ring is not None else os.environ.get("XENGRANT_RING", "1") != "0":
            channel.ring = _setup_ring(channel)
        channel.want_fds = False  # nothing else brings descriptors: plain recv_into
        domain = RemoteDomain(hc, pv=bool(flags & p.DOMFLAG_PV))
        channel.ring_p2m, channel.ring_holes = hc.p2m, domain.put_pages
        return domain
    except BaseException:
        channel.close()
        raise


def _setup_ring(channel: Channel) -> ClientRing | None:
    """Ask for the connection's request ring (``MSG_RING_SETUP``).

    Returns:
        The ring; None if the service has none to give (an older service,
        or it could not make one): everything stays on the socket then.
    """
    status, _body = channel.call(p.MSG_RING_SETUP)
    fds = channel.take_fds()
    if status == 0 and len(fds) == 3:
        try:
            return ClientRing(*fds)
        except OSError:
            fds = fds[1:]  # ClientRing closed the memfd
    for fd in fds:
        os.close(fd)
    return None


# ------------------------------------------------------------ observation
def _token(channel: Channel, token: bytes | None) -> bytes:
    return token if token is not None else read_token(token_path(channel.path))


def stats(
    path: str | None = None, timeout: float | None = 10.0, token: bytes | None = None
) -> ServiceStats:
    """The service's tables and counts (free frames, domains, pins, ports, xenstore).

    The toolstack's view: it takes the dom0 token (default: read from
    beside the socket, which only the service's uid can).  At most 1 MiB:
    a ``"truncated"`` key says what was left out.

    Raises:
        OSError: nothing listens at ``path``; PermissionError: no token to read.
        HypercallError: EPERM, not the service's token or uid.
    """
    channel = Channel(path, timeout)
    try:
        body = channel.call_ok(p.MSG_STATS, _token(channel, token), "stats")
        result: ServiceStats = json.loads(body)
        return result
    finally:
        channel.close()


def debug_key(
    key: str, path: str | None = None, timeout: float | None = 10.0, token: bytes | None = None
) -> str:
    """Press a Xen debug key on the service: ``g``/``G`` grant tables, ``e``, ``x``.

    Takes the dom0 token as :func:`stats` does; the text is cut at 1 MiB
    (a ``[truncated`` line says so).

    Raises:
        OSError: nothing listens at ``path``.
        HypercallError: EINVAL for an unknown key, EPERM without the token.
    """
    channel = Channel(path, timeout)
    try:
        payload = key.encode()[:1] + _token(channel, token)
        return channel.call_ok(p.MSG_DEBUG_KEY, payload, "debug_key").decode()
    finally:
        channel.close()


def ping(path: str | None = None, timeout: float | None = 10.0) -> bool:
    """True if a service answers at ``path``."""
    try:
        channel = Channel(path, timeout)
    except OSError:
        return False
    try:
        return channel.call(p.MSG_PING, b"ping")[0] == 0
    except ServiceError:
        return False
    finally:
        channel.close()
