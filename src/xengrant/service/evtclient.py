"""The domain's event channels over the service's socket (``domain.evtchn``).

An :class:`~xengrant.evtchn.Evtchn`: the same semantics and return types as
the embedded and the real-Xen handles.  The client plays the part of the
process's ``/dev/xen/evtchn`` file: ports bound through it are its own, and
notify/unbind of any other port is ``ENOTCONN`` as Linux's ``evtchn_ioctl``
answers (the service itself, like the hypercall, would say ``EINVAL``).
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

from ..abi import grant_table as gt
from . import protocol as p
from .callclient import ServiceCallClient, or_timeout
from .evtchn import NR_PORTS_2L, EvtchnError

if TYPE_CHECKING:
    from .client import Channel


# ------------------------------------------------------------ event channels
class EventChannelClient(ServiceCallClient):
    """The domain's event channels (libxenevtchn's ``xenevtchn_*`` calls).

    As with /dev/xen/evtchn, a port that fired stays masked until
    :meth:`unmask`; :meth:`wait` does both.  Binding an interdomain port
    delivers one event on it at once (Xen sets it pending).
    """

    error = EvtchnError

    def __init__(self, channel: Channel, domid: int) -> None:
        super().__init__(channel, domid)
        #: ports bound through this client (its "file")
        self.bound: set[int] = set()

    def _own(self, port: int) -> int:
        self.bound.add(port)
        return port

    def _mine(self, op: str, port: int) -> None:
        if port not in self.bound:  # evtchn_ioctl: find_evtchn failed
            raise EvtchnError(errno.ENOTCONN, f"{op}: port {port} is not bound by this handle")

    def fileno(self) -> int:
        """``xenevtchn_fd``: the domain's socket, readable when any message may
        have come; then ``pending(0)`` reads it and says whether it was an event."""
        return int(self.channel.sock.fileno())

    def bind_unbound_port(self, remote_domid: int) -> int:
        """``EVTCHNOP_alloc_unbound``: a port ``remote_domid`` may bind to."""
        body = self._call(p.MSG_EVTCHN_ALLOC_UNBOUND, p.TWO_U32.pack(gt.DOMID_SELF, remote_domid))
        return self._own(int(p.U32.unpack(body)[0]))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """``EVTCHNOP_bind_interdomain``: the new local port."""
        body = self._call(
            p.MSG_EVTCHN_BIND_INTERDOMAIN, p.TWO_U32.pack(remote_domid, remote_port)
        )
        return self._own(int(p.U32.unpack(body)[0]))

    def bind_virq(self, virq: int) -> int:
        """``xenevtchn_bind_virq``: the service raises no virtual IRQs.

        Raises:
            EvtchnError: ENOSYS, always.
        """
        raise EvtchnError(errno.ENOSYS, f"bind_virq({virq}): the service has no virtual IRQs")

    def notify(self, port: int) -> None:
        """``EVTCHNOP_send``.

        Raises:
            EvtchnError: ENOTCONN (not bound through this client), EINVAL.
        """
        self._mine("notify", port)
        self._call(p.MSG_EVTCHN_SEND, p.U32.pack(port))

    def unbind(self, port: int) -> None:
        """``EVTCHNOP_close`` (events already queued for it are dropped).

        Raises:
            EvtchnError: ENOTCONN (not bound through this client), EINVAL.
        """
        if not 0 <= port < NR_PORTS_2L:  # evtchn_ioctl: >= xen_evtchn_nr_channels
            raise EvtchnError(errno.EINVAL, f"unbind: port {port} is out of range")
        self._mine("unbind", port)
        self._call(p.MSG_EVTCHN_CLOSE, p.U32.pack(port))
        self.bound.discard(port)
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
        port: int | None = self.channel.wait_for(self.channel.events, None, _look(timeout))
        return or_timeout(port, "pending: no event", timeout)

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask`` (one-way: nothing is answered); a port not bound
        through this client is ignored (``evtchn_write``)."""
        if port not in self.bound:
            return
        self.channel.send(p.MSG_EVTCHN_UNMASK, p.U32.pack(port))

    def wait(self, port: int | None = None, timeout: float | None = None) -> int:
        """Wait for an event (on ``port``, or any), unmask it, return the port.

        Raises:
            TimeoutError: none came within ``timeout`` seconds (None: wait forever).
        """
        got: int | None = self.channel.wait_for(self.channel.events, port, _look(timeout))
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

    def close(self) -> None:
        """``xenevtchn_close``: unbind every port bound through this client
        (``evtchn_release``); the connection stays open."""
        for port in sorted(self.bound):
            with contextlib.suppress(EvtchnError):
                self.unbind(port)


def _look(timeout: float | None) -> float | None:
    """A zero timeout still reads what the socket holds: for a millisecond at most
    (the channel's wait gives up before reading when its time is already up)."""
    return 0.001 if timeout is not None and timeout <= 0 else timeout
