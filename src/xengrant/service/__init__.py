"""The emulated hypervisor as a service: domains as processes.

- :func:`serve` / ``xengrant hypervisor`` -- run the service on a Unix socket
  (``$XENGRANT_SOCKET``, else ``$XDG_RUNTIME_DIR/xengrant.sock``, else
  ``xengrant.sock`` in a 0700 directory ``/tmp/xengrant-<uid>/``).
- :func:`connect` -- join it as a domain: the same guest API as in-process
  (:class:`~xengrant.guest.domain.Domain`), plus ``.xs`` (xenstore) and
  ``.evtchn`` (event channels).  Machine memory is shared (a memfd), so
  mappings across processes are zero-copy.
- :func:`stats`, :func:`debug_key` -- look inside a running service.

Modules: :mod:`~xengrant.service.protocol` (framing, sans-IO),
:mod:`~xengrant.service.xenstore` and :mod:`~xengrant.service.evtchn`
(sans-IO cores), :mod:`~xengrant.service.server`,
:mod:`~xengrant.service.client` (its clients :mod:`~xengrant.service.xsclient`
and :mod:`~xengrant.service.evtclient`), :mod:`~xengrant.service.xenbus`,
:mod:`~xengrant.service.paths` (socket, token, peer checks),
:mod:`~xengrant.service.identity` (admission, dom0, attach secrets),
:mod:`~xengrant.service.cli`.
"""

from __future__ import annotations

from .client import (
    Channel,
    RemoteDomain,
    RemoteGntshr,
    RemoteGnttab,
    RemoteHypercalls,
    connect,
    debug_key,
    ping,
    stats,
)
from .errors import ServiceError
from .evtchn import EventChannels, EvtchnError
from .evtclient import EventChannelClient
from .identity import Identity
from .paths import default_socket_path
from .server import Server, serve
from .stats_types import ServiceStats
from .xenstore import XenStore, XenStoreError
from .xsclient import XenStoreClient, XenStoreWatch

__all__ = [
    "Channel",
    "EventChannelClient",
    "EventChannels",
    "EvtchnError",
    "Identity",
    "RemoteDomain",
    "RemoteGntshr",
    "RemoteGnttab",
    "RemoteHypercalls",
    "Server",
    "ServiceError",
    "ServiceStats",
    "XenStore",
    "XenStoreClient",
    "XenStoreError",
    "XenStoreWatch",
    "connect",
    "debug_key",
    "default_socket_path",
    "ping",
    "serve",
    "stats",
]
