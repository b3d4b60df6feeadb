"""The domain's event channels over the service's socket (``domain.evtchn``)."""

from __future__ import annotations

from ..abi import grant_table as gt
from . import protocol as p
from .callclient import ServiceCallClient, or_timeout
from .evtchn import EvtchnError


# ------------------------------------------------------------ event channels
class EventChannelClient(ServiceCallClient):
    """The domain's event channels (libxenevtchn's ``xenevtchn_*`` calls).

    As with /dev/xen/evtchn, a port that fired stays masked until
    :meth:`unmask`; :meth:`wait` does both.  Binding an interdomain port
    delivers one event on it at once (Xen sets it pending).
    """

    error = EvtchnError

    def bind_unbound_port(self, remote_domid: int) -> int:
        """``EVTCHNOP_alloc_unbound``: a port ``remote_domid`` may bind to."""
        body = self._call(p.MSG_EVTCHN_ALLOC_UNBOUND, p.TWO_U32.pack(gt.DOMID_SELF, remote_domid))
        return int(p.U32.unpack(body)[0])

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """``EVTCHNOP_bind_interdomain``: the new local port."""
        body = self._call(
            p.MSG_EVTCHN_BIND_INTERDOMAIN, p.TWO_U32.pack(remote_domid, remote_port)
        )
        return int(p.U32.unpack(body)[0])

    def notify(self, port: int) -> None:
        """``EVTCHNOP_send``."""
        self._call(p.MSG_EVTCHN_SEND, p.U32.pack(port))

    def unbind(self, port: int) -> None:
        """``EVTCHNOP_close`` (events already queued for it are dropped)."""
        self._call(p.MSG_EVTCHN_CLOSE, p.U32.pack(port))
        with self.channel._mu:
            while port in self.channel.events:
                self.channel.events.remove(port)

    def status(self, port: int, domid: int = gt.DOMID_SELF) -> tuple[int, int, int]:
        """``EVTCHNOP_status``: ``(EVTCHNSTAT_*, remote domid, remote port)``."""
        body = self._call(p.MSG_EVTCHN_STATUS, p.TWO_U32.pack(domid, port))
        state, rdom, rport = p.EVTCHN_STATUS_REPLY.unpack(body)
        return int(state), int(rdom), int(rport)

    def pending(self, timeout: float | None = None) -> int:
        """``xenevtchn_pending``: the next port that fired.

        Raises:
            TimeoutError: none fired within ``timeout`` seconds (None: wait forever).
        """
        port: int | None = self.channel.wait_for(self.channel.events, None, timeout)
        return or_timeout(port, "pending: no event", timeout)

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask`` (one-way: nothing is answered)."""
        self.channel.send(p.MSG_EVTCHN_UNMASK, p.U32.pack(port))

    def wait(self, port: int | None = None, timeout: float | None = None) -> int:
        """Wait for an event (on ``port``, or any), unmask it, return the port.

        Raises:
            TimeoutError: none came within ``timeout`` seconds (None: wait forever).
        """
        got: int | None = self.channel.wait_for(self.channel.events, port, timeout)
        got = or_timeout(got, f"wait: no event on port {port}", timeout)
        self.unmask(got)
        return got

    async def pending_async(self, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`pending`."""
        port: int | None = await self.channel.wait_for_async(self.channel.events, None, timeout)
        return or_timeout(port, "pending_async: no event", timeout)

    async def wait_async(self, port: int | None = None, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`wait`."""
        got: int | None = await self.channel.wait_for_async(self.channel.events, port, timeout)
        got = or_timeout(got, f"wait_async: no event on port {port}", timeout)
        self.unmask(got)
        return got
