"""Event channels through Linux's ``/dev/xen/evtchn`` (libxenevtchn's calls).

Used with unmap notifications: a sharer or mapper passes a local port to
``share_pages``/``map_grant_ref(..., notify_port=...)`` or
:meth:`~.gntdev.LinuxGnttab.set_unmap_notify`, and the other side waits for
its end of the channel here.

The device protocol (drivers/xen/evtchn.c): binding ioctls return the new
local port; ``read`` returns pending ports as 32-bit integers, each masked
until written back (``write`` = unmask); ``IOCTL_EVTCHN_NOTIFY`` signals the
remote end of a local port.  Xen marks a newly bound interdomain port pending
(``evtchn_bind_interdomain``), so the first read after a bind may return it.

Failures are logged to ``xengrant.linux`` (:mod:`._log`), rate-limited, as the
grant calls' are: a bind the other domain decides (its port not unbound or
not offered to us, the domain gone: ``EINVAL``/``ESRCH``/``EPERM``/``EACCES``/
``EBUSY`` from ``evtchn_bind_interdomain`` / ``evtchn_alloc_unbound``) at
DEBUG with the errno; every other failure -- of this handle (a port it did
not bind, ``ENOTCONN``), of this domain (no ports left) or of the device --
at WARNING.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import select
import struct
import threading
import time
from collections import deque
from typing import Any

from ..abi import evtchn as ev
from ..evtchn.core import EvtchnError
from ..evtchn.protocol import poll_fd_async, timed_out
from ._device import Device, OsDevice
from ._log import ratelimited
from .errors import describe, from_oserror

EVTCHN_PATH = "/dev/xen/evtchn"

#: what the other domain decides: a bind's errno that is its doing, not ours
#: (``evtchn_bind_interdomain``: the remote port is not unbound or not offered
#: to this domain, EINVAL; the remote domain is gone, ESRCH; XSM said no,
#: EPERM/EACCES; ``evtchn_alloc_unbound`` for a domain that is gone, ESRCH)
_PEER_ERRNOS = {
    "bind_interdomain": frozenset({_errno.EINVAL, _errno.ESRCH, _errno.EPERM, _errno.EACCES,
                                   _errno.EBUSY}),
    "bind_unbound_port": frozenset({_errno.ESRCH, _errno.EPERM, _errno.EACCES}),
}


def log_failure(name: str, call: str, err: int) -> None:
    """Say why an event-channel call failed: DEBUG when the other domain decided
    it (:data:`_PEER_ERRNOS`), else WARNING; rate-limited per call and errno."""
    peer = err in _PEER_ERRNOS.get(name, ())
    ratelimited(logging.DEBUG if peer else logging.WARNING, ("evtchn", name, err),
                "evtchn %s: %s", name, describe(call, err))


class _EvtchnDevice:
    """An open ``/dev/xen/evtchn`` (``xenevtchn_handle``), non-blocking: the
    binding, notifying and unmasking calls both classes below make.

    Args:
        path: the device node.
        device: an already open device (tests pass a fake).

    Raises:
        OSError: the device cannot be opened.
    """

    def __init__(self, path: str = EVTCHN_PATH, *, device: Device | None = None) -> None:
        self.dev: Device = device if device is not None else OsDevice(path, nonblock=True)
        self.path = path
        self.bound: set[int] = set()

    def fileno(self) -> int:
        """The file descriptor, readable when an event is pending."""
        return self.dev.fileno()

    def _error(self, name: str, call: str, e: OSError) -> Exception:
        return from_oserror(name, call, e)

    def _fail(self, name: str, call: str, e: OSError) -> Exception:
        """Log the failure (:func:`log_failure`) and make its exception."""
        log_failure(name, call, e.errno or _errno.EIO)
        return self._error(name, call, e)

    def _ioctl(self, name: str, request: int, arg: Any) -> int:
        try:
            return self.dev.ioctl(request, arg)
        except OSError as e:
            raise self._fail(name, f"IOCTL_EVTCHN_{name.upper()} of {self.path}", e) from e

    def bind_unbound_port(self, remote_domid: int) -> int:
        """Allocate a port ``remote_domid`` may bind to (``xenevtchn_bind_unbound_port``).

        Returns:
            The local port.

        Raises:
            GrantError: the driver refused (a ``LinuxGrantError`` with its errno).
        """
        port = self._ioctl(
            "bind_unbound_port",
            ev.IOCTL_EVTCHN_BIND_UNBOUND_PORT,
            ev.ioctl_evtchn_bind_unbound_port(remote_domain=remote_domid),
        )
        self.bound.add(port)
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect to ``remote_port`` of ``remote_domid`` (``xenevtchn_bind_interdomain``).

        Returns:
            The local port.
        """
        port = self._ioctl(
            "bind_interdomain",
            ev.IOCTL_EVTCHN_BIND_INTERDOMAIN,
            ev.ioctl_evtchn_bind_interdomain(remote_domain=remote_domid, remote_port=remote_port),
        )
        self.bound.add(port)
        return port

    def bind_virq(self, virq: int) -> int:
        """Bind a virtual IRQ of this domain (``xenevtchn_bind_virq``, ``VIRQ_*``).

        Returns:
            The local port.
        """
        port = self._ioctl(
            "bind_virq", ev.IOCTL_EVTCHN_BIND_VIRQ, ev.ioctl_evtchn_bind_virq(virq=virq)
        )
        self.bound.add(port)
        return port

    def notify(self, port: int) -> None:
        """Signal the remote end of local ``port`` (``xenevtchn_notify``)."""
        self._ioctl("notify", ev.IOCTL_EVTCHN_NOTIFY, ev.ioctl_evtchn_notify(port=port))

    def unbind(self, port: int) -> None:
        """Close local ``port`` (``xenevtchn_unbind``)."""
        self._ioctl("unbind", ev.IOCTL_EVTCHN_UNBIND, ev.ioctl_evtchn_unbind(port=port))
        self.bound.discard(port)

    def unmask(self, port: int) -> None:
        """Re-enable delivery on ``port`` after reading it (``xenevtchn_unmask``)."""
        try:
            self.dev.write(struct.pack("=I", port))
        except OSError as e:
            raise self._fail("unmask", f"write of {self.path}", e) from e

    def _read_ports(self, timeout: float | None) -> list[int]:
        """Ports the driver queued (each masked), waiting up to ``timeout``; [] if none."""
        fd = self.dev.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return []
        try:
            data = self.dev.read(4096)
        except OSError as e:
            if e.errno == _errno.EAGAIN:
                return []
            raise self._fail("pending", f"read of {self.path}", e) from e
        return [p for (p,) in struct.iter_unpack("=I", data[: len(data) // 4 * 4])]

    def close(self) -> None:
        """Close the device (the driver unbinds every port of this file)."""
        self.bound.clear()
        self.dev.close()


class EventChannels(_EvtchnDevice):
    """``/dev/xen/evtchn`` with the calls this project's real-Xen tests began with:
    :meth:`pending` returns every port read, already unmasked, and
    :meth:`wait_for` a bool.  The portable handle, with the same semantics as
    the emulator's and the service's, is :class:`LinuxEvtchn`.
    """

    def __enter__(self) -> EventChannels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def loopback(self, domid: int = 0) -> tuple[int, int]:
        """Two connected local ports (this domain is ``domid``): ``(a, b)``.

        Signalling either raises an event on the other.  The initial pending
        event Xen sets on the interdomain bind is consumed.
        """
        a = self.bind_unbound_port(domid)
        b = self.bind_interdomain(domid, a)
        self.drain()
        return a, b

    def pending(self, timeout: float | None = 0.0) -> list[int]:
        """Ports with events, each unmasked again (``xenevtchn_pending`` + ``unmask``).

        Args:
            timeout: wait up to this many seconds for one (None: forever).

        Returns:
            The ports read (empty when none arrived in time).
        """
        ports = self._read_ports(timeout)
        for p in ports:
            self.unmask(p)
        return ports

    def drain(self) -> list[int]:
        """Read (and unmask) every event already pending, without waiting."""
        out: list[int] = []
        while True:
            got = self.pending(0.0)
            if not got:
                return out
            out += got

    def wait_for(self, port: int, timeout: float = 5.0) -> None:
        """Wait until ``port`` has an event (other ports read meanwhile are dropped).

        Args:
            port: the local port.
            timeout: seconds.

        Raises:
            TimeoutError: no event on ``port`` within ``timeout`` seconds (the one
                way every blocking call of the package says so).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"evtchn wait_for: no event on port {port} in {timeout} s")
            if port in self.pending(left):
                return


class LinuxEvtchn(_EvtchnDevice):
    """The portable event-channel handle (:class:`~xengrant.evtchn.Evtchn`) on
    ``/dev/xen/evtchn``: the same semantics and return types as the
    emulator's and the service's.

    A read of the device returns every port the driver queued; :meth:`pending`
    hands them out one at a time, still masked (``xenevtchn_pending`` reads one
    ``evtchn_port_t``), and :meth:`wait` keeps the ports it read for other
    waits.  Errors are :class:`~xengrant.evtchn.EvtchnError` with the driver's
    errno (``ENOTCONN`` for a port this handle did not bind, as
    ``evtchn_ioctl``'s ``find_evtchn`` answers).

    Args:
        path: the device node.
        device: an already open device (tests pass a fake).

    Raises:
        OSError: the device cannot be opened.
    """

    def __init__(self, path: str = EVTCHN_PATH, *, device: Device | None = None) -> None:
        super().__init__(path, device=device)
        self._queue: deque[int] = deque()
        self._mu = threading.Lock()

    def __enter__(self) -> LinuxEvtchn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, name: str, call: str, e: OSError) -> Exception:
        err = e.errno or _errno.EIO
        return EvtchnError(err, f"{name}: {call}: {os.strerror(err)}")

    def unbind(self, port: int) -> None:
        """Close local ``port`` (``xenevtchn_unbind``); events read for it go.

        Raises:
            EvtchnError: ENOTCONN (not bound by this handle), EINVAL.
        """
        super().unbind(port)
        with self._mu:
            while port in self._queue:
                self._queue.remove(port)

    def _take(self, port: int | None, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._mu:
                q = self._queue
                if port is None and q:
                    return q.popleft()
                if port is not None and port in q:
                    q.remove(port)
                    return port
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = self._read_ports(left)
            with self._mu:
                self._queue.extend(got)
            if not got and left is not None and left <= 0:
                with self._mu:  # one last look: another thread may have read it
                    if port is None and self._queue:
                        return self._queue.popleft()
                    if port is not None and port in self._queue:
                        self._queue.remove(port)
                        return port
                return None

    def pending(self, timeout: float | None = None) -> int:
        """``xenevtchn_pending``: the next port that fired, still masked.

        Raises:
            TimeoutError: none within ``timeout`` seconds (None: for ever).
        """
        got = self._take(None, timeout)
        if got is None:
            raise timed_out("pending: no event", timeout)
        return got

    def wait(self, port: int | None = None, timeout: float | None = None) -> int:
        """Wait for an event on ``port`` (None: any), unmask it, return the port.

        Raises:
            TimeoutError: none within ``timeout`` seconds (None: for ever).
        """
        got = self._take(port, timeout)
        if got is None:
            raise timed_out(f"wait: no event on port {port}", timeout)
        self.unmask(got)
        return got

    async def pending_async(self, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`pending`."""
        return await poll_fd_async(self.fileno(), lambda: self._take(None, 0.0), timeout,
                                   "pending_async: no event")

    async def wait_async(self, port: int | None = None, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`wait`."""
        got = await poll_fd_async(self.fileno(), lambda: self._take(port, 0.0), timeout,
                                  f"wait_async: no event on port {port}")
        self.unmask(got)
        return got

    def close(self) -> None:
        """``xenevtchn_close``: the driver unbinds every port of this file."""
        with self._mu:
            self._queue.clear()
        super().close()
