"""One bound event-channel port, the same on the service and on real Xen.

Rings and vchans signal through one local port: notify the other end, wait
for it to notify us.  :class:`EventPort` gives that pair (and an asyncio twin
and a descriptor for ``select``) over either event-channel interface
xengrant has:

- the service's :class:`~xengrant.service.EventChannelClient` (``domain.evtchn``
  of :func:`xengrant.service.connect`): ``wait(port, timeout)`` unmasks what it
  returns; events come on the domain's socket;
- Linux's :class:`~xengrant.linux.EventChannels` (``/dev/xen/evtchn``,
  libxenevtchn): ``pending`` reads and unmasks every port of the file; events
  read for another port are kept for that port's next wait, so several ports
  (vchans, rings) can share one ``EventChannels``.

Either way an event that comes while nobody waits is kept (pending) and ends
the next wait at once, so "check, then sleep" loses no wake-up, as with
``xenevtchn_pending`` (``libxenvchan_wait``).
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

#: how long ``wait(0)`` looks at the service's socket
_LOOK = 0.001


class EventPort:
    """A local port bound to a remote one.

    Args:
        evtchn: the domain's event channels (``domain.evtchn``, or an open
            :class:`~xengrant.linux.EventChannels`).
        port: the local port.
        owned: unbind it in :meth:`close`.

    Use :meth:`offer` (``xenevtchn_bind_unbound_port``) or :meth:`bind`
    (``xenevtchn_bind_interdomain``) to make one.
    """

    def __init__(self, evtchn: Any, port: int, *, owned: bool = True) -> None:
        self.evtchn = evtchn
        self.port = port
        self.owned = owned
        self.closed = False
        # The service's client waits on one port; Linux's device reads them all.
        self._service = hasattr(evtchn, "wait_async")
        channel = getattr(evtchn, "channel", None)
        self._post = getattr(channel, "post", None) if self._service else None
        if self._post is not None:
            from .service import protocol

            self._msg_send = protocol.MSG_EVTCHN_SEND

    @classmethod
    def offer(cls, evtchn: Any, remote_domid: int) -> EventPort:
        """A new unbound port ``remote_domid`` may bind (``EVTCHNOP_alloc_unbound``)."""
        return cls(evtchn, evtchn.bind_unbound_port(remote_domid))

    @classmethod
    def bind(cls, evtchn: Any, remote_domid: int, remote_port: int) -> EventPort:
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

        On the service the send is posted: it returns without waiting for
        the service's answer (the service runs it before anything this domain
        sends next); a failure (the port closed under us) is raised by a later
        call on the connection, as a posted unmap's is.
        """
        if self._post is not None:
            self._post(self._msg_send, struct.pack("<I", self.port), self._on_reply)
            return
        self.evtchn.notify(self.port)

    def _on_reply(self, body: bytes) -> BaseException | None:
        status = int.from_bytes(body[:4], "little", signed=True)
        if status >= 0:
            return None
        err: BaseException = self.evtchn.error(-status, bytes(body[4:]).decode("utf-8", "replace"))
        return err

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for an event on this port, and unmask it (``libxenvchan_wait``).

        Args:
            timeout: seconds (None: for ever; 0: only look -- on the service,
                for at most a millisecond).

        Returns:
            True if one came, False after ``timeout``.
        """
        if self._service:
            # The service's client returns at once for 0 without reading its
            # socket: look for a millisecond instead.
            look = timeout if timeout is None or timeout > 0 else _LOOK
            try:
                self.evtchn.wait(self.port, look)
            except TimeoutError:
                return False
            return True
        # /dev/xen/evtchn hands out every port of the file: events read for
        # other ports are kept (on the EventChannels object) for their waiters.
        seen: set[int] = self.evtchn.__dict__.setdefault("_xg_seen", set())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.port in seen:
                seen.discard(self.port)
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            seen.update(self.evtchn.pending(left))
            if self.port in seen:
                seen.discard(self.port)
                return True
            if left is not None and left <= 0:
                return False

    async def wait_async(self, timeout: float | None = None) -> bool:
        """asyncio twin of :meth:`wait`."""
        if self._service:
            try:
                await self.evtchn.wait_async(self.port, timeout)
            except TimeoutError:
                return False
            return True
        loop = asyncio.get_running_loop()
        fd = self.evtchn.fileno()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self.wait(0):
                return True
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, fut)
            try:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return False
                try:
                    await asyncio.wait_for(fut, left)
                except asyncio.TimeoutError:
                    return self.wait(0)
            finally:
                loop.remove_reader(fd)

    def fileno(self) -> int:
        """A descriptor that becomes readable when an event may have come
        (``libxenvchan_fd_for_select``): ``/dev/xen/evtchn`` on Linux, the
        domain's socket on the service (readable for any message; call
        :meth:`wait` with ``timeout=0`` to see whether it was this port's)."""
        if self._service:
            return int(self.evtchn.channel.sock.fileno())
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


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
