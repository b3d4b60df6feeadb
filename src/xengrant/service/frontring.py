"""The front end of a connection's request ring: the one fast path for one page.

:class:`RingFront` is the part of :class:`~xengrant.service.channel.Channel`
that puts one-op ``GNTTABOP_map_grant_ref`` and posted one-op
``GNTTABOP_unmap_grant_ref`` requests on the ring
(:mod:`xengrant.service.ring`) and consumes its responses.  Whether C may
serve an op is decided here, in :meth:`RingFront.map_one` and
:meth:`RingFront.post_unmap_one`: an op of one page, when the ring can take
it (none of this connection's posted requests waits on the socket, nobody
else consumes the ring, it is not full, the values fit the op); anything
else is a plain request on the socket.

The C (``_cext.ring_map_one``, ``ring_collect``, ``ring_post_unmap``) does
the ring's indices and barriers, finishes a success the way Python would
(the p2m entry, the hole of a posted unmap) and hands everything else back:
the seqs answered on the socket, and a signal handler's exception that came
while it waited (the wait goes on: a hypercall is not given up).
"""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Callable
from typing import Any

from .. import _cext
from . import protocol as p
from .calls import Call, Calls, OnReply
from .errors import ServiceError
from .ring import ClientRing

#: ``map_one``'s result: handle, mfn, p2m type, the socket reply's payload
#: (None: a success done on the ring, in the p2m mirror already).
MapOne = tuple[int, int, int, "bytes | None"]


def wait_ms(timeout: float | None) -> int:
    """A timeout in seconds as ``_cext`` waits take it: ms, rounded up (-1: forever)."""
    return -1 if timeout is None else math.ceil(max(timeout, 0) * 1000)


class RingFront:
    """The ring's front end, a part of :class:`~xengrant.service.channel.Channel`
    (which sets these attributes and provides the methods named below).

    Attributes:
        ring: the request ring, once set up (None: everything on the socket).
        ring_p2m: the p2m mirror, for the ring's posted unmaps a collect finishes.
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
        """A ``GNTTABOP_map_grant_ref`` of one op on the request ring, in one C call.

        ``_cext.ring_map_one`` posts the request and waits for its response
        (spinning, then asleep until the service kicks); the responses to
        posted one-op unmaps before it are finished there (``(gfn,
        on_reply)`` entries of ``calls.posted``: see :meth:`post_unmap_one`).

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
        """
        ring = self.ring
        if ring is None or (self._sock_posted and self._socket_posted()):
            return None
        calls = self.calls
        if calls.deferred:
            self.raise_deferred()
        if not self._ring_rx.acquire(blocking=False):
            return None
        freed: list[int] = []
        later: list[Any] = []
        # its record: the reply may come on the socket (a dict insert is atomic
        # under the GIL; Calls.fail copies before it iterates)
        seq = calls.next_seq()
        c = calls.waiting[seq] = Call(seq, p.MSG_GNTTAB_OP)
        try:
            if calls.error is not None:
                raise calls.error
            # (a signal handler that raises while it waits does not end the
            # wait: its exception comes back with the response, as signalled)
            st, handle, mfn, p2mt, signalled = _cext.ring_map_one(
                ring.mem, ring.state, self._send_lock, ring.kick, seq, gfn, flags, ref, domid,
                self._spin_ns, self._timeout_ms, calls.posted, p2m, freed, later, ring.wait,
                self._fileno,
            )
        except BaseException:  # nothing sent (or a bug in the consumer: the C raised)
            calls.waiting.pop(seq, None)
            raise
        finally:
            self._ring_rx.release()
        if freed and self.ring_holes is not None:
            self.ring_holes(freed)
        if later:
            self._ring_later(later)
        if st == 0:  # mapped on the ring: the record goes
            calls.waiting.pop(seq, None)
            self.sent += 1
            if signalled is not None:
                self._signalled(signalled)
            return handle, mfn, p2mt, None
        if st == 5:  # nothing sent
            calls.waiting.pop(seq, None)
            self._signalled(signalled)
            return None
        self.sent += 1
        if st == 1:  # refused, or not the common case: the reply comes on the socket
            body = self._wait_call(c)
            self._signalled(signalled)
            return -1, 0, 0, body
        if st == -3:
            raise self._fail(ServiceError(
                errno.ETIMEDOUT, f"the service did not answer {c!r} on the ring within "
                f"{self.timeout} s: the connection is closed and the domain destroyed"))
        if st == -2:
            raise self._fail(ServiceError(errno.ECONNRESET, "the service closed the connection"))
        raise self._fail(ServiceError(
            errno.EBADMSG, f"ring: a response the service does not send ({st})"))

    def _ring_later(self, later: list[Any]) -> None:
        """What a ring consumer left for Python: seqs of posted requests answered on
        the socket (their replies are waited for, so their outcome is known before
        this call returns)."""
        waits = [x for x in later if isinstance(x, int)]
        if waits:
            self.wait_posted(waits)

    def _socket_posted(self) -> bool:
        """Whether a posted request sent on the socket waits for its reply (then
        nothing goes on the ring: it could overtake it)."""
        if self._sock_posted:
            with self._mu:
                self._sock_posted.intersection_update(self.calls.posted)
        return bool(self._sock_posted)

    def _give_holes(self, freed: list[int]) -> None:
        """Holes of posted unmaps a ring consumer finished, back to the domain."""
        if freed and self.ring_holes is not None:
            self.ring_holes(freed)

    def drain_ring(self, wait: bool = True) -> None:
        """Take the ring responses that came (posted one-op unmaps): holes back, p2m updated.

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
                st = _cext.ring_collect(ring.mem, ring.state, self.calls.posted, p2m, freed,
                                        later)
        finally:
            self._ring_rx.release()
        self._give_holes(freed)
        if st == -4:
            raise self._fail(ServiceError(errno.EBADMSG, "ring: the service's rsp_prod is bogus"))

    def post_unmap_one(self, gfn: int, handle: int, on_reply: OnReply) -> bool:
        """Post a ``GNTTABOP_unmap_grant_ref`` of one op (``host_addr`` ``gfn << 12``)
        on the ring.

        Its posted entry is ``(gfn, on_reply)``: a success's response is
        finished by the ring's consumer (``gfn`` leaves the p2m mirror and
        comes back as a hole); ``on_reply`` runs on any other reply.

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
        args = (ring.mem, ring.state, self._send_lock, ring.kick, seq, gfn, handle)
        sent = _cext.ring_post_unmap(*args)
        if sent < 0:  # full: take the responses waiting there, then try again
            self.drain_ring(wait=False)
            sent = _cext.ring_post_unmap(*args)
        if sent > 0:
            self.sent += 1
            return True
        calls.posted.pop(seq, None)
        return False

