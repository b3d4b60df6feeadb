"""The front end of a connection's request ring: the one fast path for one page.

:class:`RingFront` is the part of :class:`~xengrant.service.channel.Channel`
that puts one-op ``GNTTABOP_map_grant_ref`` and posted one-op
``GNTTABOP_unmap_grant_ref`` requests on the ring
(:mod:`xengrant.service.ring`) and consumes its responses.  Whether an op
goes on the ring is decided here, in :meth:`RingFront.map_one` and
:meth:`RingFront.post_unmap_one`: an op of one page, when the ring can take
it (none of this connection's posted requests waits on the socket, nobody
else consumes the ring, it is not full, the values fit the op); anything
else is a plain request on the socket.

The ring's I/O (write a request; copy the responses out, waiting for one)
is C (``_cext.ring_post_map``, ``ring_post_unmap``, ``ring_collect``,
``ring_map_one``) or the same in Python (:mod:`xengrant.service.ringio`):
:data:`C_PATHS` decides which, here and for the socket read
(:mod:`xengrant.service.channel`), and nowhere else.  Either returns the
response slots it read, raw; what they mean is decided here, in Python
(:func:`decide`): a map done (its p2m entry), a posted unmap done (its
entry popped, its gfn out of the p2m mirror and back as a hole), a reply
coming on the socket, or a response the service never sends, which fails
the connection (``EBADMSG``).
"""

from __future__ import annotations

import errno
import math
import struct
import threading
from collections.abc import Callable
from typing import Any

from .. import _cext
from ..emu.batch import FASTPATH_DEFAULT
from . import protocol as p
from . import ringio
from .calls import Call, Calls, OnReply
from .errors import ServiceError
from .ring import RING_SLOT, RSP_DONE, RSP_SOCKET, ClientRing

#: Whether the client's C paths run: the ring's I/O (``_cext``, else
#: :mod:`~xengrant.service.ringio`) and the socket read
#: (``_cext.recv_fill``, else ``recv_into``).  The one switch;
#: ``XENGRANT_FASTPATH=0`` starts it off, as it does the hypervisor's C runs.
C_PATHS = FASTPATH_DEFAULT

#: ``map_one``'s result: handle, mfn, p2m type, the socket reply's payload
#: (None: a success done on the ring, in the p2m mirror already).
MapOne = tuple[int, int, int, "bytes | None"]

_MAP = 0  # GNTTABOP_map_grant_ref
_UNMAP = 1  # GNTTABOP_unmap_grant_ref


def wait_ms(timeout: float | None) -> int:
    """A timeout in seconds as ``_cext`` waits take it: ms, rounded up (-1: forever)."""
    return -1 if timeout is None else math.ceil(max(timeout, 0) * 1000)


def ring_io() -> Any:
    """The ring's I/O that runs: ``_cext`` or :mod:`~xengrant.service.ringio`
    (:data:`C_PATHS`; both are :class:`~xengrant.service.ringio.RingIO`)."""
    return _cext if C_PATHS else ringio


#: A response slot, every field :func:`decide` reads: id, cmd, kind; the op's
#: ``host_addr`` (at 8); at op+16 a u16, at op+18 an i16 (a map's status),
#: at op+20 a u32 (a map's handle; its low half an unmap's status); the p2m
#: entry (mfn, type) at 40.
_SLOT = struct.Struct("<IHhQ8xHhI8xqq8x")
assert _SLOT.size == RING_SLOT

#: :func:`decide`'s result: the map's response (``(handle, mfn, p2mt)`` done
#: on the ring, ``RSP_SOCKET``, or None), the posted unmaps done (``(seq,
#: gfn)``), the seqs whose replies come on the socket.
Decided = tuple["tuple[int, int, int] | int | None", "list[tuple[int, int]]", "list[int]"]


def decide(rsps: bytes, seq: int, posted: dict[int, Any]) -> Decided:
    """What the response slots ``rsps`` (as the ring's I/O read them) mean.

    Pure: nothing changes here (:meth:`RingFront._take_rsps` does it), so a
    signal handler that raises in the middle loses nothing.

    Args:
        rsps: 64-byte response slots, in ring order.
        seq: the map waited for (-1: none).
        posted: the connection's posted requests (``Calls.posted``); a
            one-op unmap on the ring has the entry ``(gfn, on_reply)``.

    Returns:
        ``(mine, done, waits)``: the response to the map waited for
        (``(handle, mfn, p2mt)`` done on the ring, ``RSP_SOCKET``: its reply
        comes on the socket, or None: not among them); ``(seq, gfn)`` of the
        posted unmaps that succeeded on the ring; the seqs of posted
        requests whose replies come on the socket.

    Raises:
        ServiceError: EBADMSG, a response the service never sends (an unknown
            kind; a map done that failed or has no frame; an unmap done for
            no posted one-op unmap, of another gfn, twice, or that failed; a
            response to nothing the client asked for).
    """
    mine: tuple[int, int, int] | int | None = None
    done: list[tuple[int, int]] = []
    waits: list[int] = []
    for rid, cmd, kind, host, _w16, status, w32, mfn, p2mt in _SLOT.iter_unpack(rsps):
        if kind == RSP_DONE:
            if rid == seq:
                if cmd == _MAP and status == 0 and mfn >= 0:
                    mine = (w32, mfn, p2mt)
                    continue
            elif cmd == _UNMAP and not w32 & 0xFFFF:  # its status (op+20) is GNTST_okay
                entry = posted.get(rid)
                if (entry.__class__ is tuple and host >> 12 == entry[0]
                        and not (done and any(rid == s for s, _g in done))):
                    done.append((rid, entry[0]))
                    continue
        elif kind == RSP_SOCKET:
            if rid == seq:
                mine = RSP_SOCKET
            elif rid in posted:  # else its reply came on the socket already
                waits.append(rid)
            continue
        raise ServiceError(
            errno.EBADMSG, f"ring: a response the service does not send (id {rid}, cmd {cmd}, "
            f"kind {kind})")
    return mine, done, waits


class RingFront:
    """The ring's front end, a part of :class:`~xengrant.service.channel.Channel`
    (which sets these attributes and provides the methods named below).

    Attributes:
        ring: the request ring, once set up (None: everything on the socket).
        ring_p2m: the p2m mirror, for the ring's posted unmaps done on a drain.
        ring_holes: where their holes go back (the domain's ``put_pages``).
    """

    ring: ClientRing | None
    ring_p2m: dict[int, Any] | None
    ring_holes: Callable[[list[int]], None] | None
    calls: Calls
    timeout: float | None
    spin: float
    _spin_ns: int
    _timeout_ms: int
    sent: int
    _mu: threading.Lock
    _ring_rx: threading.Lock
    _send_lock: threading.Lock
    _sock_posted: set[int]
    _fileno: int

    def raise_deferred(self) -> None:  # pragma: no cover - the Channel's
        raise NotImplementedError

    def wait_posted(self, seqs: list[int]) -> None:  # pragma: no cover - the Channel's
        raise NotImplementedError

    def _wait_call(self, c: Call) -> bytes:  # pragma: no cover - the Channel's
        raise NotImplementedError

    def _signalled(self, got: BaseException | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _fail(self, err: ServiceError) -> ServiceError:  # pragma: no cover - the Channel's
        raise NotImplementedError

    def map_one(self, domid: int, ref: int, gfn: int, flags: int, p2m: dict[int, Any]
                ) -> MapOne | None:
        """A ``GNTTABOP_map_grant_ref`` of one op on the request ring, in one I/O call.

        The ring's I/O (:func:`ring_io`) posts the request and waits for its
        response (spinning, then asleep until the service kicks), and hands
        back every response it consumed on the way; :func:`decide` says
        what they mean and :meth:`_apply` does it (posted one-op unmaps
        done: see :meth:`post_unmap_one`; this map's p2m entry).

        Args:
            domid, ref: the grant.
            gfn: the hole that takes it (``host_addr`` is ``gfn << 12``).
            flags: the op's ``GNTMAP_*`` flags.
            p2m: the p2m mirror (a success sets ``p2m[gfn]``).

        Returns:
            ``(handle, mfn, p2mt, None)`` for a success done on the ring;
            ``(-1, 0, 0, payload)`` when the service answered on the socket
            (finish it as a ``MSG_GNTTAB_OP`` reply).  The holes of posted
            unmaps finished on the way go back to the domain (:attr:`ring_holes`).
            None if the ring cannot
            take it (none; another thread consumes it; it is full; a posted
            request waits on the socket; a value does not fit): nothing sent.

        Raises:
            ServiceError: the connection failed or timed out, or the
                service's ring response is not one it sends.
            Exception: a failure a posted request reported; nothing is sent.
            BaseException: what a signal handler raised while it waited,
                once the response is in; one that interrupts the ring's I/O
                in Python (not C) after the request went out fails the
                connection (its outcome is unknown) and is raised.
        """
        ring = self.ring
        if ring is None or (self._sock_posted and self._socket_posted()):
            return None
        calls = self.calls
        if calls.deferred:
            self.raise_deferred()
        if not self._ring_rx.acquire(blocking=False):
            return None
        # its record: the reply may come on the socket (a dict insert is atomic
        # under the GIL; Calls.fail copies before it iterates)
        seq = calls.next_seq()
        c = calls.waiting[seq] = Call(seq, p.MSG_GNTTAB_OP)
        state = ring.state
        before = state[0]  # req_prod_pvt's low byte: whether the request went out
        try:
            if calls.error is not None:
                raise calls.error
            # (a signal handler that raises while it waits does not end the
            # wait: its exception comes back with the responses, as signalled)
            st, rsps, signalled = ring_io().ring_map_one(
                ring.mem, state, self._send_lock, ring.kick, seq, gfn, flags, ref, domid,
                self._spin_ns, self._timeout_ms, ring.wait, self._fileno,
            )
            # _take_rsps, inline (the one-page path): decide, then do it
            while True:
                try:
                    mine, done, waits = decide(rsps, seq, calls.posted)
                    if done:
                        self._done(done, p2m)
                    if mine.__class__ is tuple:
                        p2m[gfn] = mine[1:]
                    break
                except ServiceError as e:
                    raise self._fail(e) from None
                except BaseException as e:  # a signal handler's: finish, raise it after
                    signalled = signalled or e
        except BaseException as e:
            calls.waiting.pop(seq, None)
            self._ring_rx.release()
            if state[0] != before and not isinstance(e, ServiceError):
                # sent, and its outcome lost: the connection cannot go on
                self._fail(ServiceError(
                    errno.ECANCELED, f"a map on the ring was interrupted ({e!r}) before its "
                    "response was taken: the connection is closed and the domain destroyed"))
            raise
        self._ring_rx.release()
        if done and self.ring_holes is not None:
            self.ring_holes([g for _s, g in done])
        if waits:
            self.wait_posted(waits)
        if st == 0 and mine.__class__ is tuple:  # mapped on the ring: the record goes
            del calls.waiting[seq]
            self.sent += 1
            if signalled is not None:
                self._signalled(signalled)
            handle, mfn, p2mt = mine
            return handle, mfn, p2mt, None
        if st == 5:  # nothing sent
            calls.waiting.pop(seq, None)
            self._signalled(signalled)
            return None
        self.sent += 1
        if st == 0:  # RSP_SOCKET: refused, or not the common case: the reply comes there
            body = self._wait_call(c)
            self._signalled(signalled)
            return -1, 0, 0, body
        if st == ringio.TIMED_OUT:
            raise self._fail(ServiceError(
                errno.ETIMEDOUT, f"the service did not answer {c!r} on the ring within "
                f"{self.timeout} s: the connection is closed and the domain destroyed"))
        if st == ringio.HUNG_UP:
            raise self._fail(ServiceError(errno.ECONNRESET, "the service closed the connection"))
        raise self._fail(ServiceError(errno.EBADMSG, "ring: the service's rsp_prod is bogus"))

    def _take_rsps(
        self, rsps: bytes, seq: int, gfn: int, p2m: dict[int, Any] | None,
        signalled: BaseException | None,
    ) -> tuple[tuple[int, int, int] | int | None, list[tuple[int, int]], list[int],
               BaseException | None]:
        """:func:`decide` what the ring's I/O read, and do it (the caller holds
        ``_ring_rx``): each posted unmap done is popped and its gfn leaves the
        p2m mirror; the map done on the ring (at ``gfn``) gets its p2m entry.
        Both can run again from the start (doing it twice is doing it once), so
        a signal handler that raises meanwhile is kept (returned as
        ``signalled``) and they run again: what was read is never lost.

        Returns:
            :func:`decide`'s three, and ``signalled``.

        Raises:
            ServiceError: EBADMSG, a response the service never sends (the
                connection is failed).
        """
        while True:
            try:
                mine, done, waits = decide(rsps, seq, self.calls.posted)
                if done:
                    self._done(done, p2m)
                if mine.__class__ is tuple and p2m is not None:
                    p2m[gfn] = mine[1:]
                return mine, done, waits, signalled
            except ServiceError as e:
                raise self._fail(e) from None
            except BaseException as e:  # a signal handler's: finish, raise it after
                signalled = signalled or e

    def _done(self, done: list[tuple[int, int]], p2m: dict[int, Any] | None) -> None:
        """Posted unmaps done on the ring (``(seq, gfn)``): their entries popped, their
        gfns out of the p2m mirror (idempotent)."""
        posted = self.calls.posted
        for s, g in done:
            posted.pop(s, None)
            if p2m is not None:
                p2m.pop(g, None)

    def _socket_posted(self) -> bool:
        """Whether a posted request sent on the socket waits for its reply (then
        nothing goes on the ring: it could overtake it)."""
        if self._sock_posted:
            with self._mu:
                self._sock_posted.intersection_update(self.calls.posted)
        return bool(self._sock_posted)

    def _give_holes(self, freed: list[int]) -> None:
        """Holes of posted unmaps done on the ring, back to the domain."""
        if freed and self.ring_holes is not None:
            self.ring_holes(freed)

    def drain_ring(self, wait: bool = True) -> None:
        """Take the ring responses that came (posted one-op unmaps): holes back, p2m updated.

        Args:
            wait: if another thread is consuming the ring's responses, wait
                for it (else leave them to it).

        Raises:
            ServiceError: the service's ring indices are bogus, or a response
                is not one it sends (the connection is failed).
        """
        p2m = self.ring_p2m
        if (self.ring is None or p2m is None or self.calls.error is not None
                or not self._ring_rx.acquire(blocking=wait)):
            return
        try:
            ring = self.ring
            if ring is None:
                return
            rsps = ring_io().ring_collect(ring.mem, ring.state)
            if rsps is None:
                raise self._fail(ServiceError(errno.EBADMSG,
                                              "ring: the service's rsp_prod is bogus"))
            _mine, done, _waits, signalled = self._take_rsps(rsps, -1, -1, p2m, None)
        finally:
            self._ring_rx.release()
        self._give_holes([g for _s, g in done])
        self._signalled(signalled)

    def post_unmap_one(self, gfn: int, handle: int, on_reply: OnReply) -> bool:
        """Post a ``GNTTABOP_unmap_grant_ref`` of one op (``host_addr`` ``gfn << 12``)
        on the ring.

        Its posted entry is ``(gfn, on_reply)``: a success's response
        (:func:`decide`) pops it, ``gfn`` leaves the p2m mirror and comes
        back as a hole; ``on_reply`` runs on the reply the socket brings
        when the service answers there.

        Returns:
            False if the ring cannot take it (none; a posted request waits on
            the socket; it is full; ``gfn`` or ``handle`` does not fit):
            nothing sent (post it on the socket).

        Raises:
            ServiceError: the connection failed.
            Exception: an earlier posted request's failure; nothing is sent.
        """
        ring = self.ring
        if ring is None or (self._sock_posted and self._socket_posted()):
            return False
        calls = self.calls
        if calls.deferred:
            self.raise_deferred()
        if calls.error is not None:
            raise calls.error
        seq = calls.next_seq()
        calls.posted[seq] = (gfn, on_reply)  # (atomic under the GIL)
        io = ring_io()
        args = (ring.mem, ring.state, self._send_lock, ring.kick, seq, gfn, handle)
        sent = io.ring_post_unmap(*args)
        if sent < 0:  # full: take the responses waiting there, then try again
            self.drain_ring(wait=False)
            sent = io.ring_post_unmap(*args)
        if sent > 0:
            self.sent += 1
            return True
        calls.posted.pop(seq, None)
        return False
