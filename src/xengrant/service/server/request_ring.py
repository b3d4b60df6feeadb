"""The service's end of a connection's request ring (:mod:`xengrant.service.ring`):
set up, waited on with the socket, served in C, the rest as socket requests.
"""

from __future__ import annotations

import errno

from ... import _cext
from ...emu import gnttab_map
from ...emu.domain import DomainState
from ...errors import HypercallError
from .. import protocol as p
from ..ring import ServiceRing
from ..ring import request as ring_request
from . import dispatch
from .base import ServerBase
from .connection import Connection


class RequestRing(ServerBase):
    """MSG_RING_SETUP and serving a connection's request ring."""

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
        # the page's memfd is the client's: the service keeps its mapping alone
        conn.handover[conn.ring.memfd] = conn.ring.drop_memfd
        return self._ok()

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
        if d is None or d.is_dying or not (dispatch.SERVE_FASTPATH and gnttab_map.FASTPATH):
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
