"""One bound event-channel port, on any backend of the portable API.

Rings and vchans signal through one local port: notify the other end, wait
for it to notify us.  :class:`EventPort` gives that pair (and an asyncio twin
and a descriptor for ``select``) over an :class:`~xengrant.evtchn.Evtchn`
handle -- an :class:`~xengrant.EmbeddedXen` domain's ``domain.evtchn``, the
service's ``domain.evtchn``, real Xen's :class:`~xengrant.linux.LinuxEvtchn`
-- and over the older :class:`~xengrant.linux.EventChannels`, whose
``pending`` returns every port it read (the ports read for another port are
kept for that port's next wait).

Either way an event that comes while nobody waits is kept (pending) and ends
the next wait at once, so "check, then sleep" loses no wake-up, as with
``xenevtchn_pending`` (``libxenvchan_wait``).  A wait that gives up raises
:class:`TimeoutError`, as every wait of the portable API does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Union, cast

from .evtchn.protocol import Evtchn, poll_fd_async

if TYPE_CHECKING:
    from .linux.evtchn import EventChannels

#: what an EventPort signals through: a portable handle, or the first real-Xen wrapper
PortHandle = Union[Evtchn, "EventChannels"]


class EventPort:
    """A local port bound to a remote one.

    Args:
        evtchn: an :class:`~xengrant.evtchn.Evtchn` handle (``domain.evtchn``,
            :class:`~xengrant.linux.LinuxEvtchn`) or an open
            :class:`~xengrant.linux.EventChannels`.
        port: the local port.
        owned: unbind it in :meth:`close`.

    Use :meth:`offer` (``xenevtchn_bind_unbound_port``) or :meth:`bind`
    (``xenevtchn_bind_interdomain``) to make one.
    """

    def __init__(self, evtchn: PortHandle, port: int, *, owned: bool = True) -> None:
        self.evtchn: PortHandle = evtchn
        self.port = port
        self.owned = owned
        self.closed = False
        # The first real-Xen wrapper's pending() reads every port at once.
        self._legacy = not hasattr(evtchn, "wait_async")

    @classmethod
    def offer(cls, evtchn: PortHandle, remote_domid: int) -> EventPort:
        """A new unbound port ``remote_domid`` may bind (``EVTCHNOP_alloc_unbound``)."""
        return cls(evtchn, evtchn.bind_unbound_port(remote_domid))

    @classmethod
    def bind(cls, evtchn: PortHandle, remote_domid: int, remote_port: int) -> EventPort:
        """Bind to ``remote_port`` of ``remote_domid`` (``EVTCHNOP_bind_interdomain``).

        Raises:
            EvtchnError / GrantError: the port is not offered to this domain
            (EINVAL), the domain does not exist (ESRCH).
        """
        return cls(evtchn, evtchn.bind_interdomain(remote_domid, remote_port))

    def __repr__(self) -> str:
        return f"<EventPort {self.port}{' closed' if self.closed else ''}>"

    def notify(self) -> None:
        """Signal the remote end (``EVTCHNOP_send``, ``xenevtchn_notify``).

        On the service the send is posted (see
        :meth:`~xengrant.service.EventChannelClient.notify`).
        """
        self.evtchn.notify(self.port)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for an event on this port, and unmask it (``libxenvchan_wait``).

        Args:
            timeout: seconds (None: for ever; 0: only look -- on the service,
                for at most a millisecond).

        Raises:
            TimeoutError: none came within ``timeout``.
        """
        if not self._legacy:
            cast(Evtchn, self.evtchn).wait(self.port, timeout)
            return
        # /dev/xen/evtchn hands out every port of the file: events read for
        # other ports are kept (on the EventChannels object) for their waiters.
        legacy = cast("EventChannels", self.evtchn)
        seen: set[int] = legacy.__dict__.setdefault("_xg_seen", set())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.port in seen:
                seen.discard(self.port)
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            seen.update(legacy.pending(left))
            if self.port in seen:
                seen.discard(self.port)
                return
            if left is not None and left <= 0:
                raise TimeoutError(f"wait: no event on port {self.port} within {timeout} s")

    async def wait_async(self, timeout: float | None = None) -> None:
        """asyncio twin of :meth:`wait`."""
        if not self._legacy:
            await cast(Evtchn, self.evtchn).wait_async(self.port, timeout)
            return

        def look() -> bool | None:
            try:
                self.wait(0)
            except TimeoutError:
                return None
            return True

        await poll_fd_async(self.evtchn.fileno(), look, timeout,
                            f"wait_async: no event on port {self.port}")

    def fileno(self) -> int:
        """A descriptor that becomes readable when an event may have come
        (``libxenvchan_fd_for_select``): the handle's :meth:`~xengrant.evtchn.Evtchn.fileno`
        (on the service the domain's socket, readable for any message); call
        :meth:`wait` with ``timeout=0`` to see whether it was this port's."""
        return int(self.evtchn.fileno())

    def close(self) -> None:
        """Unbind the port (when owned); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.owned:
            self.evtchn.unbind(self.port)

    def __enter__(self) -> EventPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

