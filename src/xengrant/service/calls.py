"""The requests of one service connection in flight, without a socket (sans-IO).

A domain process's connection (:class:`~xengrant.service.channel.Channel`)
keeps one :class:`Call` per request it sent and waits for, and one entry per
*posted* request (sent with ``F_POSTED``; nobody waits for its reply, which
runs the entry's ``on_reply`` when it is read).  :class:`Calls` is fed the
bytes the socket brought (:meth:`Calls.feed`) and sorts them: a reply moves
its call from ``SENT`` to ``ANSWERED`` (the waiter takes it: ``DONE``), a
posted request's reply runs its ``on_reply`` in stream order, events and
watch events are queued.  When the connection fails (the service closed it,
it sent something it never sends, or it did not answer in time) every call
still in flight is ``FAILED`` with the connection's error, and so is every
call made later.

Nothing here reads or writes a socket, takes a lock or sleeps: the channel
does that around it (one reader at a time, holding its lock while it feeds),
and the unit tests drive it with bytes.
"""

from __future__ import annotations

import enum
import errno
import itertools
from collections import deque
from collections.abc import Callable
from typing import Optional, Union

from ..xenstore.client import ClientCodec
from . import protocol as p
from .errors import ServiceError

#: What a posted request runs on its reply: the failure to report, or None.
OnReply = Callable[[bytes], Optional[BaseException]]
#: A posted request's entry: ``on_reply``, or ``(gfn, on_reply)`` for a posted
#: one-op unmap on the request ring (a success there is finished by
#: :mod:`~xengrant.service.frontring` from its ring response, without ``on_reply``).
Posted = Union[OnReply, "tuple[int, OnReply]"]


class State(enum.Enum):
    """Where a request waited for stands."""

    #: sent; no reply read yet
    SENT = "sent"
    #: its reply was read; the waiter has not taken it
    ANSWERED = "answered"
    #: the waiter took the reply
    DONE = "done"
    #: the connection failed before the reply came
    FAILED = "failed"


class Call:
    """One request sent and waited for.

    Attributes:
        seq: its sequence number.
        mtype: its ``MSG_*``.
        state: a :class:`State`.
        reply: the reply's payload once ``ANSWERED``.
        error: the connection's failure once ``FAILED``.
    """

    __slots__ = ("error", "mtype", "reply", "seq", "state")

    def __init__(self, seq: int, mtype: int) -> None:
        self.seq = seq
        self.mtype = mtype
        self.state = State.SENT
        self.reply: bytes | None = None
        self.error: ServiceError | None = None

    def __repr__(self) -> str:
        name = p.MSG_NAMES.get(self.mtype, str(self.mtype))
        return f"<Call {self.seq} {name} {self.state.value}>"


class Calls:
    """The connection's requests in flight and what came from the service.

    Args:
        max_payload: the largest reply payload taken (a larger one fails
            the connection: the service never sends one).

    Attributes:
        waiting: seq -> :class:`Call`, the requests waited for.
        posted: seq -> :data:`Posted`, the posted requests not answered yet.
        events: event-channel ports that fired, oldest first.
        xs: the connection's xenstore client codec
            (:class:`~xengrant.xenstore.client.ClientCodec`, shared by every
            xenstore client here): its request ids, and the watch events that
            came, queued by its rule (at most ``max_watch_events``, the oldest
            dropped past it; a malformed one dropped).
        deferred: failures posted requests reported, not raised yet.
        error: the connection's failure, once it failed (then nothing more is taken).
    """

    def __init__(
        self, max_payload: int = 8 * p.MAX_PAYLOAD, max_watch_events: int = 65536
    ) -> None:
        self.decoder = p.Decoder(max_payload=max_payload)
        self.waiting: dict[int, Call] = {}
        self.posted: dict[int, Posted] = {}
        self.events: deque[int] = deque()
        self.xs = ClientCodec(max_watch_events)
        self.deferred: deque[BaseException] = deque()
        self.error: ServiceError | None = None
        self._seq = itertools.count(1)

    @property
    def watch_events(self) -> deque[tuple[str, str]]:
        """``(path, token)`` of xenstore watches that fired, oldest first (:attr:`xs`'s queue)."""
        return self.xs.watch_events

    # ------------------------------------------------------------ sending
    def next_seq(self) -> int:
        """A fresh sequence number (u32, wrapping)."""
        return next(self._seq) & 0xFFFFFFFF

    def call(self, mtype: int, seq: int | None = None) -> Call:
        """A request about to be sent and waited for.

        Args:
            mtype: its ``MSG_*``.
            seq: its sequence number (default: a fresh one).

        Returns:
            Its record, ``SENT`` (``FAILED`` at once if the connection failed).
        """
        c = Call(self.next_seq() if seq is None else seq, mtype)
        if self.error is not None:
            c.state, c.error = State.FAILED, self.error
        else:
            self.waiting[c.seq] = c
        return c

    def post(self, entry: Posted, seq: int | None = None) -> int:
        """A posted request about to be sent; its sequence number."""
        s = self.next_seq() if seq is None else seq
        self.posted[s] = entry
        return s

    def unsent(self, seq: int) -> None:
        """The request ``seq`` was not sent after all: forget it."""
        self.waiting.pop(seq, None)
        self.posted.pop(seq, None)

    # ---------------------------------------------------------- receiving
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Sort what the socket brought (b"": it closed).

        Raises nothing: a stream the service never sends (a reply to no
        request, an oversized reply) fails the connection (:meth:`fail`).
        """
        if self.error is not None:
            return
        if not data:
            self.fail(ServiceError(errno.ECONNRESET, "the service closed the connection"))
            return
        for fr in self.decoder.feed(data):
            self._frame(fr)
            if self.error is not None:
                return

    def _frame(self, fr: p.Frame) -> None:
        pl = fr.payload
        if fr.flags & p.F_REPLY:
            if pl is None:
                self.fail(ServiceError(errno.EBADMSG, f"reply {fr.seq} over the size limit"))
                return
            c = self.waiting.get(fr.seq)
            if c is not None:
                c.state, c.reply = State.ANSWERED, pl
                return
            entry = self.posted.pop(fr.seq, None)
            if entry is None:
                self.fail(ServiceError(errno.EBADMSG, f"a reply to no request ({fr.seq})"))
                return
            done = entry[1] if isinstance(entry, tuple) else entry
            self.run(done, pl)
        elif fr.flags & p.F_ASYNC and pl is not None:
            if fr.type == p.MSG_EVENT and len(pl) == 4:
                self.events.append(p.U32.unpack(pl)[0])
            elif fr.type == p.MSG_WATCH_EVENT:  # the XS_WATCH_EVENT payload
                self.xs.queue_event(pl)

    def run(self, done: OnReply, payload: bytes) -> None:
        """Run a posted request's ``on_reply``; keep the failure it reports."""
        try:
            err = done(payload)
        except Exception as e:
            err = e
        if err is not None:
            self.deferred.append(err)

    def take(self, c: Call) -> bytes | None:
        """The reply of an ``ANSWERED`` call (it is ``DONE`` then); None while ``SENT``.

        Raises:
            ServiceError: the connection failed before the reply came.
        """
        if c.state is State.ANSWERED:
            c.state = State.DONE
            del self.waiting[c.seq]
            reply, c.reply = c.reply, None
            return reply
        if c.state is State.FAILED:
            assert c.error is not None
            raise c.error
        if c.state is State.DONE:
            raise ValueError(f"{c!r}: its reply was taken")
        if self.error is not None:  # recorded as the connection failed: it fails too
            c.state, c.error = State.FAILED, self.error
            self.waiting.pop(c.seq, None)
            raise self.error
        return None

    def fail(self, err: ServiceError) -> None:
        """The connection failed: every call in flight (and every later one) ``FAILED``.

        Posted requests are dropped: nobody waits for them, and their replies
        cannot come.
        """
        if self.error is not None:
            return
        self.error = err
        for c in list(self.waiting.values()):  # (the ring inserts without the lock)
            c.state, c.error = State.FAILED, err
        self.waiting.clear()
        self.posted.clear()
