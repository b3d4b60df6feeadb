"""XenBus conventions on top of the service's xenstore: device dirs and states.

- :func:`add_device` is what the toolstack (dom0) writes for a new PV device,
  as libxl's ``libxl__device_generic_add`` does: the frontend dir
  ``/local/domain/<fe>/device/<kind>/<devid>`` is the frontend's, readable by
  the backend; the backend dir ``/local/domain/<be>/backend/<kind>/<fe>/<devid>``
  is the backend's, readable by the frontend; each names the other and starts
  in ``XenbusStateInitialising``.
- :func:`switch_state` / :func:`wait_state`: the ``state`` node handshake of
  xen/include/public/io/xenbus.h.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Protocol

from .xenstore import XenStoreError


class XenStore(Protocol):
    """The xenstore calls the XenBus helpers make: the service's ``domain.xs``
    (:class:`~xengrant.service.client.XenStoreClient`) and real Xen's
    :class:`~xengrant.linux.LinuxXenStore` both have them."""

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
    xs.mkdir(fe)
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
    token = f"state-{dev}-{time.monotonic_ns()}"
    deadline = None if timeout is None else time.monotonic() + timeout
    xs.watch(f"{dev}/state", token)
    try:
        while True:
            state = read_state(xs, dev)
            if state in states:
                return state
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{dev}/state is {STATE_NAMES.get(state, state)}")
            with contextlib.suppress(TimeoutError):  # the deadline above says so
                xs.read_watch_token(token, remaining)
    finally:
        with contextlib.suppress(OSError):
            xs.unwatch(f"{dev}/state", token)
        xs.drop_watch_events(token)
