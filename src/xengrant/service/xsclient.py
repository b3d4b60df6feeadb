"""The domain's xenstore connection over the service's socket (``domain.xs``)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..xenstore.client import ClientCodec, result, wait_for_value, wait_for_value_async
from ..xenstore.wire import (
    XS_DIRECTORY,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_MKDIR,
    XS_NAMES,
    XS_READ,
    XS_RELEASE,
    XS_RM,
    XS_SET_PERMS,
    XS_SET_TARGET,
    XS_UNWATCH,
    XS_WATCH,
    XS_WRITE,
    Decoder,
    split_strings,
    strings,
)
from ..xsapi import WireTransaction
from . import protocol as p
from .callclient import ServiceCallClient, or_timeout
from .errors import ServiceError
from .xenstore import XenStoreError

if TYPE_CHECKING:
    from .client import Channel


# ------------------------------------------------------------------ xenstore
class XenStoreClient(ServiceCallClient):
    """The domain's xenstore connection (libxenstore's ``xs_*`` calls).

    Every call is one xs_wire message (``struct xsd_sockmsg`` and its
    payload, packed by :class:`~xengrant.xenstore.client.ClientCodec`) in a
    ``MSG_XS_WIRE`` request; the reply is xenstored's reply message, byte
    for byte.  Watch events come as the XS_WATCH_EVENT payload in async
    ``MSG_WATCH_EVENT`` frames, which the connection's reader hands to the
    same codec (``channel.calls.xs``), so they are queued, taken by token
    and dropped by the one rule every xenstore client here follows.  Paths
    without a leading ``/`` are relative to the domain's home,
    ``/local/domain/<domid>``.  Errors raise :class:`XenStoreError` with
    xenstored's errno.
    """

    error = XenStoreError

    def __init__(self, channel: Channel, domid: int) -> None:
        super().__init__(channel, domid)
        #: the connection's codec: request ids here, watch events from its reader
        self.codec: ClientCodec = channel.calls.xs

    def call(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        """One xs_wire request (``XS_*`` type, payload, transaction id) -> the reply's payload.

        Raises:
            XenStoreError: the XS_ERROR xenstored's rules answer, or EPROTO
                for a reply that is not one message answering this request.
            ServiceError: the connection is gone.
        """
        with self.channel._mu:
            req_id, data = self.codec.request(mtype, payload, tx)
            self.codec.forget(req_id)  # replies are matched here, not queued there
        name = f"XS_{XS_NAMES.get(mtype, mtype)}"
        body = self._call(p.MSG_XS_WIRE, data)
        try:
            msgs = Decoder().feed(body)
        except XenStoreError:
            msgs = []
        if len(msgs) != 1 or msgs[0].req_id != req_id:
            raise XenStoreError(errno.EPROTO, f"{name}: the reply is not one xs_wire message")
        return result(msgs[0], name)

    def read(self, path: str, tx: int = 0) -> bytes:
        """``xs_read``."""
        return self.call(XS_READ, strings(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        """``xs_write`` (creates the node and missing parents)."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        self.call(XS_WRITE, path.encode() + b"\0" + data, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        """``xs_mkdir``."""
        self.call(XS_MKDIR, strings(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        """``xs_rm`` (recursive)."""
        self.call(XS_RM, strings(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        """``xs_directory``: child names."""
        return [x.decode() for x in split_strings(self.call(XS_DIRECTORY, strings(path), tx))]

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        """``xs_get_permissions`` as strings (``"n0"``, ``"r5"``)."""
        return [x.decode() for x in split_strings(self.call(XS_GET_PERMS, strings(path), tx))]

    def set_perms(self, path: str, perms: Sequence[str], tx: int = 0) -> None:
        """``xs_set_permissions``: first entry owner + default, then per-domain entries."""
        self.call(XS_SET_PERMS, strings(path, *perms), tx)

    def watch(self, path: str, token: str) -> None:
        """``xs_watch``: an event comes at once, then on each change at or below ``path``."""
        self.call(XS_WATCH, strings(path, token))

    def watching(self, path: str, token: str) -> XenStoreWatch:
        """:meth:`watch`, as a context manager: ``with xs.watching(path, token) as w:
        w.read(timeout)``; leaving the block unwatches and drops its queued events."""
        self.watch(path, token)
        return XenStoreWatch(self, path, token)

    def unwatch(self, path: str, token: str) -> None:
        """``xs_unwatch``."""
        self.call(XS_UNWATCH, strings(path, token))

    def read_watch(self, timeout: float | None = None) -> tuple[str, str]:
        """``xs_read_watch``: the next ``(path, token)``.

        Raises:
            TimeoutError: none came within ``timeout`` seconds (None: wait forever).
            ServiceError: the connection is gone.
        """
        item = self.channel.wait_take(self.codec.take_event, timeout)
        return or_timeout(item, "read_watch: no watch event", timeout)

    async def read_watch_async(self, timeout: float | None = None) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch`."""
        item = await self.channel.wait_take_async(self.codec.take_event, timeout)
        return or_timeout(item, "read_watch_async: no watch event", timeout)

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]:
        """The next event of the watch set with ``token`` (others stay queued).

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
            ServiceError: the connection is gone.
        """
        item = self.channel.wait_take(lambda: self.codec.take_event(token), timeout)
        return or_timeout(item, f"read_watch_token: no event of watch {token!r}", timeout)

    async def read_watch_token_async(
        self, token: str, timeout: float | None = None
    ) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch_token`."""
        item = await self.channel.wait_take_async(lambda: self.codec.take_event(token), timeout)
        return or_timeout(item, f"read_watch_token_async: no event of watch {token!r}", timeout)

    def drop_watch_events(self, token: str) -> None:
        """Forget queued events of the watch set with ``token``."""
        with self.channel._mu:
            self.codec.drop_events(token)

    def transaction(self) -> WireTransaction:
        """``xs_transaction_start`` (``XS_TRANSACTION_START``): a transaction
        whose requests carry its ``tx_id`` (:mod:`xengrant.xsapi`); its commit
        raises :class:`~xengrant.xsapi.TransactionConflict` on EAGAIN."""
        return WireTransaction(self.call)

    def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        """``xs_introduce_domain`` (``XS_INTRODUCE``, dom0 only): fires ``@introduceDomain``.

        Raises:
            XenStoreError: EACCES (not privileged), EINVAL.
        """
        self.call(XS_INTRODUCE, strings(str(domid), str(mfn), str(port)))

    def release(self, domid: int) -> None:
        """``xs_release_domain`` (``XS_RELEASE``, dom0 only): fires ``@releaseDomain``.

        Raises:
            XenStoreError: EACCES (not privileged), ENOENT.
        """
        self.call(XS_RELEASE, strings(str(domid)))

    def set_target(self, domid: int, target: int) -> None:
        """``xs_set_target`` (``XS_SET_TARGET``, dom0 only): ``domid`` (a stub
        domain) gets ``target``'s rights over its nodes.

        Raises:
            XenStoreError: EACCES (not privileged), ENOENT (either not introduced), EINVAL.
        """
        self.call(XS_SET_TARGET, strings(str(domid), str(target)))

    def get_domain_path(self, domid: int) -> str:
        """``xs_get_domain_path``: ``/local/domain/<domid>``."""
        return self.call(XS_GET_DOMAIN_PATH, strings(str(domid))).rstrip(b"\0").decode()

    def wait_for_value(
        self, path: str, want: Sequence[bytes] | None = None, timeout: float | None = None
    ) -> bytes:
        """Watch ``path`` until it exists (and holds one of ``want``); return its value.

        Raises:
            TimeoutError: ``timeout`` passed first.
        """
        return wait_for_value(self, path, want, timeout, (XenStoreError, ServiceError))

    async def wait_for_value_async(
        self, path: str, want: Sequence[bytes] | None = None, timeout: float | None = None
    ) -> bytes:
        """asyncio twin of :meth:`wait_for_value`.

        Raises:
            TimeoutError: ``timeout`` passed first.
        """
        return await wait_for_value_async(self, path, want, timeout, (XenStoreError, ServiceError))


class XenStoreWatch:
    """A watch :meth:`XenStoreClient.watching` set, and a context manager that removes it.

    Attributes:
        path: the watched path.
        token: its token.
    """

    def __init__(self, xs: XenStoreClient, path: str, token: str) -> None:
        self.xs = xs
        self.path = path
        self.token = token
        self.closed = False

    def __repr__(self) -> str:
        return f"<XenStoreWatch {self.path!r} {self.token!r}{' closed' if self.closed else ''}>"

    def read(self, timeout: float | None = None) -> tuple[str, str]:
        """The next event of this watch (``read_watch_token``).

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
        """
        return self.xs.read_watch_token(self.token, timeout)

    def close(self) -> None:
        """``xs_unwatch`` and drop the events still queued for it; idempotent (a
        connection already gone has no watch left to remove)."""
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(XenStoreError, ServiceError):
                self.xs.unwatch(self.path, self.token)
        finally:
            self.xs.drop_watch_events(self.token)

    def __enter__(self) -> XenStoreWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
