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
"""

from __future__ import annotations

import errno as _errno
import select
import struct
import time
from typing import Any

from ..abi import evtchn as ev
from ._device import Device, OsDevice
from .errors import from_oserror

EVTCHN_PATH = "/dev/xen/evtchn"


class EventChannels:
    """An open ``/dev/xen/evtchn`` (``xenevtchn_handle``), non-blocking.

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

    def __enter__(self) -> EventChannels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The file descriptor, readable when an event is pending."""
        return self.dev.fileno()

    def _ioctl(self, name: str, request: int, arg: Any) -> int:
        try:
            return self.dev.ioctl(request, arg)
        except OSError as e:
            raise from_oserror(name, f"IOCTL_EVTCHN_{name.upper()} of {self.path}", e) from e

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

    def loopback(self, domid: int = 0) -> tuple[int, int]:
        """Two connected local ports (this domain is ``domid``): ``(a, b)``.

        Signalling either raises an event on the other.  The initial pending
        event Xen sets on the interdomain bind is consumed.
        """
        a = self.bind_unbound_port(domid)
        b = self.bind_interdomain(domid, a)
        self.drain()
        return a, b

    def notify(self, port: int) -> None:
        """Signal the remote end of local ``port`` (``xenevtchn_notify``)."""
        self._ioctl("notify", ev.IOCTL_EVTCHN_NOTIFY, ev.ioctl_evtchn_notify(port=port))

    def unbind(self, port: int) -> None:
        """Close local ``port`` (``xenevtchn_unbind``)."""
        self._ioctl("unbind", ev.IOCTL_EVTCHN_UNBIND, ev.ioctl_evtchn_unbind(port=port))
        self.bound.discard(port)

    def unmask(self, port: int) -> None:
        """Re-enable delivery on ``port`` after reading it (``xenevtchn_unmask``)."""
        self.dev.write(struct.pack("=I", port))

    def pending(self, timeout: float | None = 0.0) -> list[int]:
        """Ports with events, each unmasked again (``xenevtchn_pending`` + ``unmask``).

        Args:
            timeout: wait up to this many seconds for one (None: forever).

        Returns:
            The ports read (empty when none arrived in time).
        """
        fd = self.dev.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return []
        try:
            data = self.dev.read(4096)
        except OSError as e:
            if e.errno == _errno.EAGAIN:
                return []
            raise from_oserror("pending", f"read of {self.path}", e) from e
        ports = [p for (p,) in struct.iter_unpack("=I", data[: len(data) // 4 * 4])]
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

    def wait_for(self, port: int, timeout: float = 5.0) -> bool:
        """Wait until ``port`` has an event (other ports read meanwhile are dropped).

        Returns:
            True if it came within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if port in self.pending(left):
                return True

    def close(self) -> None:
        """Close the device (the driver unbinds every port of this file)."""
        self.bound.clear()
        self.dev.close()
