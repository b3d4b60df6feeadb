"""xenstore as Xen 4.17's xenstored does it, sans-IO.

- :mod:`~xengrant.xenstore.wire`: ``xen/io/xs_wire.h`` (messages, types,
  error strings, limits, the ring page) and a bounded incremental decoder;
- :mod:`~xengrant.xenstore.store`: the tree, permissions, quotas, watches;
- :mod:`~xengrant.xenstore.transaction`: transactions (EAGAIN on conflict);
- :mod:`~xengrant.xenstore.session`: the server side of one connection;
- :mod:`~xengrant.xenstore.ring`: the ring page (``xenstore_domain_interface``);
- :mod:`~xengrant.xenstore.client`: the client side every client shares.
"""

from ..errors import XenStoreError
from .client import (
    ClientCodec,
    wait_for_value,
    wait_for_value_async,
    wait_until,
    wait_until_async,
)
from .ring import RingEnd, RingServer
from .session import Domains, Session, event_message
from .store import Perm, WatchEvent, XenStore
from .transaction import Transaction
from .wire import Decoder, Message, ProtocolViolation

__all__ = [
    "ClientCodec",
    "Decoder",
    "Domains",
    "Message",
    "Perm",
    "ProtocolViolation",
    "RingEnd",
    "RingServer",
    "Session",
    "Transaction",
    "WatchEvent",
    "XenStore",
    "XenStoreError",
    "event_message",
    "wait_for_value",
    "wait_for_value_async",
    "wait_until",
    "wait_until_async",
]
