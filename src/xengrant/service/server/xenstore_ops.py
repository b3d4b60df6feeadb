"""Xenstore requests of a connection: one xs_wire session each, run by
:class:`xengrant.xenstore.session.Session` with xenstored's rules.
"""

from __future__ import annotations

import errno

from ...xenstore import wire as xsw
from ...xenstore.session import Session
from .. import protocol as p
from ..xenstore import XenStoreError
from .base import ServerBase
from .connection import Connection


class XenstoreOps(ServerBase):
    """MSG_XS_* and XS_WIRE: a connection's xenstore session."""

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
