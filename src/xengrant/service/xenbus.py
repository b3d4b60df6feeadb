"""XenBus helpers, moved to :mod:`xengrant.xenbus` (they run on every xenstore backend).

Kept so that ``from xengrant.service import xenbus`` still works.
"""

from __future__ import annotations

from ..xenbus import (
    STATE_NAMES,
    XenbusStateClosed,
    XenbusStateClosing,
    XenbusStateConnected,
    XenbusStateInitialised,
    XenbusStateInitialising,
    XenbusStateInitWait,
    XenbusStateReconfigured,
    XenbusStateReconfiguring,
    XenbusStateUnknown,
    XenStore,
    add_device,
    backend_path,
    frontend_path,
    publish,
    read_state,
    switch_state,
    wait_state,
    wait_state_async,
)

__all__ = [
    "STATE_NAMES",
    "XenStore",
    "XenbusStateClosed",
    "XenbusStateClosing",
    "XenbusStateConnected",
    "XenbusStateInitWait",
    "XenbusStateInitialised",
    "XenbusStateInitialising",
    "XenbusStateReconfigured",
    "XenbusStateReconfiguring",
    "XenbusStateUnknown",
    "add_device",
    "backend_path",
    "frontend_path",
    "publish",
    "read_state",
    "switch_state",
    "wait_state",
    "wait_state_async",
]
