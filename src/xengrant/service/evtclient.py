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
import functools
import threading
from collections.abc import Iterator
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
        # unmasks are owed (sent with the next message) while nobody else waits
        # for events here and nobody asked for fileno() (see unmask)
        self._lock = threading.Lock()
        self._waiters = 0
        self._at_once = False

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """A wait for events: what is owed goes first; meanwhile an unmask made
        by another thread is sent at once (this wait may need it)."""
        with self._lock:
            self._waiters += 1
        try:
            self.channel.send_owed()
            yield
        finally:
            with self._lock:
                self._waiters -= 1

    def _own(self, port: int) -> int:
        self.bound.add(port)
        return port

    def _mine(self, op: str, port: int) -> None:
        if port not in self.bound:  # evtchn_ioctl: find_evtchn failed
            raise EvtchnError(errno.ENOTCONN, f"{op}: port {port} is not bound by this handle")

    def fileno(self) -> int:
        """``xenevtchn_fd``: the domain's socket, readable when any message may
        have come; then ``pending(0)`` reads it and says whether it was an event.

        From the first call on, :meth:`unmask` sends at once (a process that
        sleeps in ``select`` on the socket must not owe the service an unmask).
        """
        with self._lock:
            self._at_once = True
        self.channel.send_owed()
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
        """``EVTCHNOP_send``, posted: it returns once the message is sent,
        without waiting for the service's answer (the service runs it before
        anything this domain sends next, so a call made after it sees it
        done).  ``xenevtchn_notify`` waits for its hypercall; here the only
        failures left once the port is bound through this client are the
        connection's, and the service's answer (EINVAL, ESRCH) is raised by
        the next call on the connection, as a posted unmap's is.

        Raises:
            EvtchnError: ENOTCONN (not bound through this client).
            ServiceError: the connection is gone.
        """
        if port not in self.bound:
            self._mine("notify", port)
        self.channel.post(p.MSG_EVTCHN_SEND, _port_bytes(port), self._on_send)

    def _on_send(self, body: bytes) -> BaseException | None:
        """A posted send's answer: None, or the EvtchnError it reported."""
        status = int.from_bytes(body[:4], "little", signed=True)
        if status >= 0:
            return None
        return EvtchnError(-status, bytes(body[4:]).decode("utf-8", "replace"))

    def unbind(self, port: int) -> None:
        """``EVTCHNOP_close`` (events already queued for it are dropped).

        Raises:
            EvtchnError: ENOTCONN (not bound through this client), EINVAL.
        """
        if not 0 <= port < NR_PORTS_2L:  # evtchn_ioctl: >= xen_evtchn_nr_channels
            raise EvtchnError(errno.EINVAL, f"unbind: port {port} is out of range")
        self._mine("unbind", port)
        # an unmask still owed would come in front of the close and raise an
        # event the close drops no more (it comes after the close's reply)
        self.channel.disown(_unmask_frame(port))
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
        with self._waiting():
            port: int | None = self.channel.wait_for(self.channel.events, None, timeout)
        return or_timeout(port, "pending: no event", timeout)

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask`` (one-way: nothing is answered); a port not bound
        through this client is ignored (``evtchn_write``).

        The message rides in front of the next one this domain sends on the
        connection (usually the notify that answers the event: one system
        call, one wake-up of the service, instead of two), or goes out before
        the next wait for events, whichever comes first; at once while another
        thread waits for events here, or once :meth:`fileno` was asked for.
        No event is lost meanwhile: the service keeps the port pending
        (``evtchn_2l_set_pending`` on a masked port) and delivers it when the
        unmask comes, before anything sent after it is answered.

        Raises:
            ServiceError: the connection is gone (when sent at once).
        """
        if port not in self.bound:
            return
        frame = _unmask_frame(port)
        with self._lock:
            if not (self._at_once or self._waiters):
                self.channel.owe(frame)
                return
        self.channel.send(p.MSG_EVTCHN_UNMASK, _port_bytes(port))

    def wait(self, port: int | None = None, timeout: float | None = None) -> int:
        """Wait for an event (on ``port``, or any), unmask it, return the port.

        Raises:
            TimeoutError: none came within ``timeout`` seconds (None: wait forever).
        """
        with self._waiting():
            got: int | None = self.channel.wait_for(self.channel.events, port, timeout)
        got = or_timeout(got, f"wait: no event on port {port}", timeout)
        self.unmask(got)
        return got

    async def pending_async(self, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`pending`."""
        with self._waiting():
            port: int | None = await self.channel.wait_for_async(
                self.channel.events, None, timeout)
        return or_timeout(port, "pending_async: no event", timeout)

    async def wait_async(self, port: int | None = None, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`wait`."""
        with self._waiting():
            got: int | None = await self.channel.wait_for_async(
                self.channel.events, port, timeout)
        got = or_timeout(got, f"wait_async: no event on port {port}", timeout)
        self.unmask(got)
        return got

    def close(self) -> None:
        """``xenevtchn_close``: unbind every port bound through this client
        (``evtchn_release``); the connection stays open."""
        for port in sorted(self.bound):
            with contextlib.suppress(EvtchnError):
                self.unbind(port)


@functools.lru_cache(maxsize=NR_PORTS_2L)
def _port_bytes(port: int) -> bytes:
    """A port as the u32 payload of EVTCHN_SEND / EVTCHN_UNMASK (cached)."""
    return p.U32.pack(port)


@functools.lru_cache(maxsize=NR_PORTS_2L)
def _unmask_frame(port: int) -> bytes:
    """The whole one-way EVTCHN_UNMASK message for ``port`` (cached)."""
    return p.HEADER.pack(4, p.MSG_EVTCHN_UNMASK, 0, 0) + p.U32.pack(port)
