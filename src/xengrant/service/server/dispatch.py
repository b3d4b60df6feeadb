"""Request dispatch: what a connection's thread read becomes replies.

Whole messages are handled straight from the receive buffer (a GNTTAB_OP's op
structs are the hypercall's ``uop`` in place).  Leading map/unmap messages
that are the common success case are answered in C
(:func:`xengrant._cext.serve_gnttab`); the rest go to the handler table, and
every handler failure becomes an error reply (status ``-errno``): nothing a
client sends can stop the service.
"""

from __future__ import annotations

import errno
import traceback

from ... import _cext
from ...emu import gnttab_map
from ...errors import HypercallError
from .. import protocol as p
from ..evtchn import EvtchnError
from ..xenstore import XenStoreError
from .base import ServerBase
from .connection import Connection, Payload

#: Answer map/unmap messages in C (:func:`_cext.serve_gnttab`) when the
#: emulator's C map path is on too; tests turn it off to compare.
SERVE_FASTPATH = True


class Dispatch(ServerBase):
    """Requests to handlers, replies and error replies, async messages."""

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
