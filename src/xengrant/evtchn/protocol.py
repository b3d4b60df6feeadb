"""The portable event-channel API: libxenevtchn's surface, one semantics.

Every backend -- :class:`~xengrant.evtchn.EmbeddedEvtchn` (an
:class:`~xengrant.EmbeddedXen` domain, in this process), the service's
:class:`~xengrant.service.EventChannelClient` and real Xen's
:class:`~xengrant.linux.LinuxEvtchn` (``/dev/xen/evtchn``) -- is an
:class:`Evtchn`: a handle as ``xenevtchn_open`` returns one
(tools/libs/evtchn/core.c).  The rules they share, from Linux's
drivers/xen/evtchn.c and Xen's common/event_channel.c:

- Ports bound through a handle are delivered to that handle.  A port that
  fires is queued once and stays masked until :meth:`Evtchn.unmask`
  (``evtchn_interrupt`` disables the irq; ``evtchn_write`` re-enables it);
  firing again meanwhile only sets it pending, delivered at the unmask.
- ``bind_interdomain`` sets the new local port pending
  (``evtchn_bind_interdomain``: "we may have lost notifications on the remote
  unbound port"): the binder sees one event at once.
- :meth:`Evtchn.pending` returns the next port that fired, masked
  (``xenevtchn_pending``); :meth:`Evtchn.wait` waits for one port (or any),
  unmasks it and returns it; events for other ports read meanwhile stay
  queued for their own waits.  Both raise :class:`TimeoutError` when nothing
  came within ``timeout`` seconds (None: wait for ever; 0: only look).
- :meth:`Evtchn.notify` and :meth:`Evtchn.unbind` of a port this handle did
  not bind are ``ENOTCONN`` (``evtchn_ioctl``'s ``find_evtchn``);
  :meth:`Evtchn.unmask` of one is ignored (``evtchn_write``).
- :meth:`Evtchn.fileno` is readable while an event is queued (the embedded
  handle and Linux), or when the service may have sent one (its socket; the
  next ``pending(0)`` reads it): select on it, then call ``pending(0)``.
- :meth:`Evtchn.close` unbinds every port of the handle (``evtchn_release``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

_T = TypeVar("_T")


@runtime_checkable
class Evtchn(Protocol):
    """An event-channel handle (``xenevtchn_handle``) on any backend."""

    def fileno(self) -> int:
        """``xenevtchn_fd``: a descriptor for select/asyncio (see the module)."""
        ...

    def bind_unbound_port(self, remote_domid: int) -> int:
        """``xenevtchn_bind_unbound_port``: a new port ``remote_domid`` may bind.

        Returns:
            The local port.
        """
        ...

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """``xenevtchn_bind_interdomain``: the new local port (set pending)."""
        ...

    def bind_virq(self, virq: int) -> int:
        """``xenevtchn_bind_virq`` (real Xen only; elsewhere ``ENOSYS``)."""
        ...

    def notify(self, port: int) -> None:
        """``xenevtchn_notify``: signal the remote end of ``port``."""
        ...

    def unbind(self, port: int) -> None:
        """``xenevtchn_unbind``: close ``port`` (its queued events go)."""
        ...

    def unmask(self, port: int) -> None:
        """``xenevtchn_unmask``: deliver ``port`` again."""
        ...

    def pending(self, timeout: float | None = None) -> int:
        """``xenevtchn_pending``: the next port that fired, still masked.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """
        ...

    def wait(self, port: int | None = None, timeout: float | None = None) -> int:
        """Wait for an event on ``port`` (None: any), unmask it, return the port.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """
        ...

    async def pending_async(self, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`pending`."""
        ...

    async def wait_async(self, port: int | None = None, timeout: float | None = None) -> int:
        """asyncio twin of :meth:`wait`."""
        ...

    def close(self) -> None:
        """``xenevtchn_close``: unbind every port of the handle."""
        ...


def timed_out(what: str, timeout: float | None) -> TimeoutError:
    """The one way every backend says a wait gave up."""
    return TimeoutError(f"{what} within {timeout} s")


async def poll_fd_async(
    fd: int, take: Callable[[], _T | None], timeout: float | None, what: str
) -> _T:
    """Await ``take()`` (which never blocks) becoming not None, sleeping on ``fd``.

    Args:
        fd: a descriptor readable whenever ``take`` may have something.
        take: looks without blocking; None when there is nothing yet.
        timeout: seconds (None: for ever).
        what: the operation, named in the TimeoutError.

    Returns:
        What ``take`` returned.

    Raises:
        TimeoutError: ``timeout`` passed first.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        got = take()
        if got is not None:
            return got
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            raise timed_out(what, timeout)
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, fut)
        try:
            await asyncio.wait_for(fut, left)
        except asyncio.TimeoutError:
            pass  # look once more, then the deadline says so
        finally:
            loop.remove_reader(fd)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
