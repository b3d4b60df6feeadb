"""``HYPERVISOR_event_channel_op`` as service messages (the sans-IO core is
:mod:`xengrant.service.evtchn`; deliveries go out through
:meth:`~.dispatch.Dispatch._dispatch_async`).
"""

from __future__ import annotations

from ...abi.gntalloc import UNMAP_NOTIFY_SEND_EVENT
from .. import protocol as p
from .base import ServerBase
from .connection import Connection


class EventChannelOps(ServerBase):
    """EVTCHN_ALLOC_UNBOUND, BIND_INTERDOMAIN, SEND, CLOSE, STATUS."""

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
