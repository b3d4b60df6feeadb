"""Event channels of :class:`~xengrant.EmbeddedXen` domains, in this process.

:class:`EvtchnHub` holds the sans-IO core (:mod:`xengrant.evtchn.core`, the
service's own rules) for every domain of one hypervisor, under a lock, and
routes each delivery to the handle its port was bound through.
:class:`EmbeddedEvtchn` is such a handle, as a process gets from opening
``/dev/xen/evtchn``: its ports, a queue of ports that fired (each masked
until unmasked, as drivers/xen/evtchn.c's ``evtchn_interrupt`` leaves it) and
a pipe that is readable while that queue is not empty, for select/asyncio.
No thread runs: a notify from one domain queues the port on the peer's handle
and wakes whoever waits there.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable

from .core import Delivery, EventChannels, EvtchnError
from .protocol import poll_fd_async, timed_out


class EvtchnHub:
    """Every domain's event channels of one embedded hypervisor.

    Args:
        is_privileged: whether a domain may act on others' ports (dom0).
    """

    def __init__(self, is_privileged: Callable[[int], bool] | None = None) -> None:
        self.core = EventChannels(is_privileged)
        self.lock = threading.Lock()
        #: ``(domid, port)`` -> the handle the port was bound through
        self.owners: dict[tuple[int, int], EmbeddedEvtchn] = {}

    def add_domain(self, domid: int) -> None:
        """A new domain (``evtchn_init``)."""
        with self.lock:
            self.core.add_domain(domid)

    def destroy_domain(self, domid: int) -> None:
        """A domain dies: its ports close, peers' ports go back to unbound
        (``evtchn_destroy``)."""
        with self.lock:
            self.core.destroy_domain(domid)
            for key in [k for k in self.owners if k[0] == domid]:
                self.owners.pop(key).bound.discard(key[1])

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Queue each port that fired on its handle (caller holds ``lock``)."""
        for key in deliveries:
            handle = self.owners.get(key)
            if handle is not None:
                handle._push(key[1])

    def open(self, domid: int) -> EmbeddedEvtchn:
        """A new handle of ``domid`` (``xenevtchn_open``)."""
        return EmbeddedEvtchn(self, domid)


class EmbeddedEvtchn:
    """An event-channel handle of one embedded domain (an :class:`~.Evtchn`).

    Args:
        hub: the hypervisor's :class:`EvtchnHub`.
        domid: the domain.

    Attributes:
        domid: the domain the handle acts for.
        bound: the ports bound through this handle.
    """

    def __init__(self, hub: EvtchnHub, domid: int) -> None:
        self.hub = hub
        self.domid = domid
        self.bound: set[int] = set()
        self.closed = False
        self._queue: deque[int] = deque()
        self._cv = threading.Condition(threading.Lock())
        # readable while _queue is not empty (one byte in the pipe), once
        # somebody asked for the descriptor (fileno, the asyncio twins): till
        # then a delivery wakes the waiter through _cv alone, two system calls
        # fewer per event
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selectable = False
        self._fds = weakref.finalize(self, _close_fds, self._rfd, self._wfd)

    def __repr__(self) -> str:
        return f"<EmbeddedEvtchn d{self.domid} ports {sorted(self.bound)}>"

    def __enter__(self) -> EmbeddedEvtchn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, op: str) -> None:
        if self.closed:
            raise EvtchnError(errno.EBADF, f"{op}: the handle is closed")

    # ------------------------------------------------------------ delivery
    def _push(self, port: int) -> None:
        """A port fired (hub lock held): queue it, wake the waiters."""
        with self._cv:
            if self.closed:
                return
            if not self._queue and self._selectable:
                os.write(self._wfd, b"\1")
            self._queue.append(port)
            self._cv.notify_all()

    def _take(self, port: int | None) -> int | None:
        """The first queued port (``port``, or any); caller holds ``_cv``."""
        q = self._queue
        if not q:
            return None
        if port is None:
            got = q.popleft()
        elif port in q:
            q.remove(port)
            got = port
        else:
            return None
        if not q and self._selectable:
            os.read(self._rfd, 1)
        return got

    def _wait_take(self, port: int | None, timeout: float | None, what: str) -> int:
        with self._cv:
            got = self._take(port)
            if got is None and (timeout is None or timeout > 0):
                self._cv.wait_for(lambda: self.closed or (port is None and bool(self._queue))
                                  or port in self._queue, timeout)
                got = self._take(port)
        if got is None:
            self._check(what)
            raise timed_out(what, timeout)
        return got

    # ------------------------------------------------------------- binding
    def bind_unbound_port(self, remote_domid: int) -> int:
        """``EVTCHNOP_alloc_unbound`` for this domain (``IOCTL_EVTCHN_BIND_UNBOUND_PORT``).

        Returns:
            The local port.

        Raises:
            EvtchnError: ESRCH (no such domain), ENOSPC (no free port).
        """
        self._check("bind_unbound_port")
        with self.hub.lock:
            port = self.hub.core.alloc_unbound(self.domid, self.domid, remote_domid)
            self._own(port)
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """``EVTCHNOP_bind_interdomain`` (``IOCTL_EVTCHN_BIND_INTERDOMAIN``).

        Returns:
            The local port, already pending (one event comes at once).

        Raises:
            EvtchnError: ESRCH (no such domain), EINVAL (the port is not
                unbound for this domain), ENOSPC.
        """
        self._check("bind_interdomain")
        with self.hub.lock:
            port, deliveries = self.hub.core.bind_interdomain(
                self.domid, remote_domid, remote_port
            )
            self._own(port)
            self.hub.deliver(deliveries)
        return port

    def bind_virq(self, virq: int) -> int:
        """``xenevtchn_bind_virq``: the emulator raises no virtual IRQs.

        Raises:
            EvtchnError: ENOSYS, always.
        """
        raise EvtchnError(errno.ENOSYS, f"bind_virq({virq}): EmbeddedXen has no virtual IRQs")

    def _own(self, port: int) -> None:
        # evtchn_bind_to_user: the port belongs to this file, masked off no more
        self.bound.add(port)
        self.hub.owners[(self.domid, port)] = self

    def _mine(self, op: str, port: int) -> None:
        self._check(op)
        if port not in self.bound:  # evtchn_ioctl: find_evtchn() failed
            raise EvtchnError(errno.ENOTCONN, f"{op}: port {port} is not bound by this handle")

    # ----------------------------------------------------------- signalling
    def notify(self, port: int) -> None:
        """``EVTCHNOP_send`` (``IOCTL_EVTCHN_NOTIFY``).

        Raises:
            EvtchnError: ENOTCONN (not bound by this handle).
        """
        self._mine("notify", port)
        with self.hub.lock:
            self.hub.deliver(self.hub.core.send(self.domid, port))

    def unbind(self, port: int) -> None:
        """``EVTCHNOP_close`` (``IOCTL_EVTCHN_UNBIND``); its queued events go.

        Raises:
            EvtchnError: ENOTCONN (not bound by this handle).
        """
        if not 0 <= port < self.hub.core.nr_ports:  # evtchn_ioctl: >= xen_evtchn_nr_channels
            raise EvtchnError(errno.EINVAL, f"unbind: port {port} is out of range")
        self._mine("unbind", port)
        with self.hub.lock:
            self._close_port(port)

    def _close_port(self, port: int) -> None:
        self.bound.discard(port)
        if self.hub.owners.get((self.domid, port)) is self:
            del self.hub.owners[(self.domid, port)]
        if self.domid in self.hub.core.domains:  # a dead domain's ports are gone already
            self.hub.core.close(self.domid, port)
        with self._cv:
            while self._take(port) is not None:
                pass

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask`` (a write to ``/dev/xen/evtchn``): deliver ``port``
        again, at once if it fired while masked.  Ports not bound here are ignored."""
        if self.closed or port not in self.bound:
            return
        with self.hub.lock:
            self.hub.deliver(self.hub.core.unmask(self.domid, port))

    # ------------------------------------------------------------- waiting
    def fileno(self) -> int:
        """A pipe readable while a port is queued (level-triggered)."""
        with self._cv:
            if not self._selectable:
                self._selectable = True
                if self._queue:
                    os.write(self._wfd, b"\1")
        return self._rfd

    def pending(self, timeout: float | None = None) -> int:
        """``xenevtchn_pending``: the next port that fired, still masked.

        Raises:
            TimeoutError: none within ``timeout`` seconds (None: for ever).
        """
        return self._wait_take(None, timeout, "pending: no event")

    def wait(self, port: int | None = None, timeout: float | None = None) -> int:
        """Wait for an event on ``port`` (None: any), unmask it, return the port.

        Raises:
            TimeoutError: none within ``timeout`` seconds (None: for ever).
        """
        got = self._wait_take(port, timeout, f"wait: no event on port {port}")
        self.unmask(got)
        return got

    def _poll(self, port: int | None) -> int | None:
        with self._cv:
            got = self._take(port)
        if got is None:
            self._check("wait")
        return got

    async def pending_async(self, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`pending`."""
        return await poll_fd_async(self.fileno(), lambda: self._poll(None), timeout,
                                   "pending_async: no event")

    async def wait_async(self, port: int | None = None, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`wait`."""
        got = await poll_fd_async(self.fileno(), lambda: self._poll(port), timeout,
                                  f"wait_async: no event on port {port}")
        self.unmask(got)
        return got

    def close(self) -> None:
        """``xenevtchn_close``: unbind every port of this handle; idempotent."""
        if self.closed:
            return
        with self.hub.lock:
            for port in sorted(self.bound):
                self._close_port(port)
            with self._cv:
                self.closed = True
                self._queue.clear()
                self._cv.notify_all()
        self._fds()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
