"""XenBus on the portable xenstore API: device dirs, the state handshake, publishing.

Works on any :class:`~xengrant.xsapi.XenStore` -- an
:class:`~xengrant.EmbeddedXen` domain's ``domain.xs``, the service's, real
Xen's :class:`~xengrant.linux.LinuxXenStore` -- sync and asyncio.

- :func:`add_device` is what the toolstack (dom0) writes for a new PV device,
  as libxl's ``libxl__device_generic_add`` does: the frontend dir
  ``/local/domain/<fe>/device/<kind>/<devid>`` is the frontend's, readable by
  the backend; the backend dir ``/local/domain/<be>/backend/<kind>/<fe>/<devid>``
  is the backend's, readable by the frontend; each names the other and starts
  in ``XenbusStateInitialising``.
- :func:`switch_state` / :func:`wait_state` / :func:`wait_state_async`: the
  ``state`` node handshake of xen/include/public/io/xenbus.h.
- :func:`publish`: what a Linux frontend's ``talk_to_backend`` does --
  ``ring-ref``, ``event-channel`` (and the rest) and the new state written in
  one transaction, retried on EAGAIN, so the backend never sees half of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from .errors import XenStoreError
from .xenstore.client import wait_until, wait_until_async
from .xsapi import HasTransactions, Transaction, run_transaction


class XenStore(Protocol):
    """The xenstore calls the XenBus helpers make (every
    :class:`~xengrant.xsapi.XenStore` has them; :func:`publish` uses a
    transaction where the connection has ``transaction()``)."""

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, value: bytes | str) -> None: ...

    def mkdir(self, path: str) -> None: ...

    def rm(self, path: str) -> None: ...

    def set_perms(self, path: str, perms: Sequence[str]) -> None: ...

    def watch(self, path: str, token: str) -> None: ...

    def unwatch(self, path: str, token: str) -> None: ...

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]: ...

    def drop_watch_events(self, token: str) -> None: ...

XenbusStateUnknown = 0
XenbusStateInitialising = 1
XenbusStateInitWait = 2
XenbusStateInitialised = 3
XenbusStateConnected = 4
XenbusStateClosing = 5
XenbusStateClosed = 6
XenbusStateReconfiguring = 7
XenbusStateReconfigured = 8

STATE_NAMES = {
    0: "Unknown",
    1: "Initialising",
    2: "InitWait",
    3: "Initialised",
    4: "Connected",
    5: "Closing",
    6: "Closed",
    7: "Reconfiguring",
    8: "Reconfigured",
}


def frontend_path(frontend: int, kind: str, devid: int) -> str:
    """``/local/domain/<fe>/device/<kind>/<devid>``."""
    return f"/local/domain/{frontend}/device/{kind}/{devid}"


def backend_path(backend: int, kind: str, frontend: int, devid: int) -> str:
    """``/local/domain/<be>/backend/<kind>/<fe>/<devid>``."""
    return f"/local/domain/{backend}/backend/{kind}/{frontend}/{devid}"


def add_device(xs: XenStore, kind: str, devid: int, frontend: int, backend: int) -> tuple[str, str]:
    """Write a device's frontend and backend dirs, as the toolstack (dom0).

    Args:
        xs: a xenstore client of a privileged domain.
        kind: the device class (``vif``, ``vbd``, ``vdemo`` ...).
        devid: the device number.
        frontend: the frontend domain.
        backend: the backend domain.

    Returns:
        ``(frontend dir, backend dir)``.

    Raises:
        XenStoreError: EACCES if ``xs`` is not privileged.
    """
    fe = frontend_path(frontend, kind, devid)
    be = backend_path(backend, kind, frontend, devid)
    with contextlib.suppress(XenStoreError):
        xs.rm(fe)
    with contextlib.suppress(XenStoreError):
        xs.rm(be)
    xs.mkdir(fe)  # libxl__device_generic_add writes these in one transaction
    xs.set_perms(fe, [f"n{frontend}", f"r{backend}"])
    xs.mkdir(be)
    xs.set_perms(be, [f"n{backend}", f"r{frontend}"])
    xs.write(f"{fe}/backend", be)
    xs.write(f"{fe}/backend-id", str(backend))
    xs.write(f"{fe}/state", str(XenbusStateInitialising))
    xs.write(f"{be}/frontend", fe)
    xs.write(f"{be}/frontend-id", str(frontend))
    xs.write(f"{be}/online", "1")
    xs.write(f"{be}/state", str(XenbusStateInitialising))
    return fe, be


def switch_state(xs: XenStore, dev: str, state: int) -> None:
    """Write ``dev/state`` (``xenbus_switch_state``)."""
    xs.write(f"{dev}/state", str(state))


def read_state(xs: XenStore, dev: str) -> int:
    """``dev/state`` as an int (XenbusStateUnknown if absent or unreadable)."""
    try:
        return int(xs.read(f"{dev}/state"))
    except (XenStoreError, ValueError):
        return XenbusStateUnknown


def wait_state(xs: XenStore, dev: str, states: Sequence[int], timeout: float | None = None) -> int:
    """Wait (with a watch, no polling) until ``dev/state`` is one of ``states``.

    A state node that is absent or unreadable reads as ``XenbusStateUnknown``
    (``xenbus_read_driver_state``): include it in ``states`` to also stop when
    the other end's directory goes away (its domain died).

    Returns:
        The state reached.

    Raises:
        TimeoutError: ``timeout`` passed first.
    """
    check, what = _state_check(xs, dev, states)
    return wait_until(xs, f"{dev}/state", check, timeout, what)


def _state_check(
    xs: XenStore, dev: str, states: Sequence[int]
) -> tuple[Callable[[], int | None], Callable[[], str]]:
    """:func:`wait_state`'s test, and its TimeoutError's text (the last state read)."""
    last = [XenbusStateUnknown]

    def check() -> int | None:
        state = last[0] = read_state(xs, dev)
        return state if state in states else None

    return check, lambda: f"{dev}/state is {STATE_NAMES.get(last[0], last[0])}"


async def wait_state_async(
    xs: XenStore, dev: str, states: Sequence[int], timeout: float | None = None
) -> int:
    """asyncio twin of :func:`wait_state` (the event loop runs while it waits): the
    same check on :func:`~xengrant.xenstore.client.wait_until_async`.

    Returns:
        The state reached.

    Raises:
        TimeoutError: ``timeout`` passed first.
    """
    check, what = _state_check(xs, dev, states)
    return await wait_until_async(xs, f"{dev}/state", check, timeout, what)


def publish(
    xs: XenStore,
    dev: str,
    values: Mapping[str, str | int | bytes],
    state: int | None = None,
    retries: int = 16,
) -> None:
    """Write ``dev/<key>`` for each of ``values`` and ``dev/state`` together.

    As Linux's frontends do in ``talk_to_backend`` (netfront, blkfront):
    ``xenbus_transaction_start``, the ``xenbus_printf`` of ``ring-ref`` and
    ``event-channel``, the state, ``xenbus_transaction_end``, and again on
    ``-EAGAIN``.  A connection without transactions writes them one by one,
    the state last.

    Args:
        xs: the connection.
        dev: the device directory (the frontend's or the backend's).
        values: key -> value (ints are written in decimal).
        state: a ``XenbusState*`` to switch to in the same transaction.
        retries: commits tried.

    Raises:
        TransactionConflict: every try conflicted.
        XenStoreError: a write was refused (EACCES, ENOSPC ...).
    """
    items = [(f"{dev}/{k}", v if isinstance(v, (str, bytes)) else str(v))
             for k, v in values.items()]
    if state is not None:
        items.append((f"{dev}/state", str(state)))
    if not isinstance(xs, HasTransactions):
        for path, value in items:
            xs.write(path, value)
        return

    def body(t: Transaction) -> None:
        for path, value in items:
            t.write(path, value)

    run_transaction(xs, body, retries)
