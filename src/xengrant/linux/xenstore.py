"""A minimal xenstore client on real Xen, speaking ``xs_wire.h``.

Where the messages go:

- in a domU: ``/dev/xen/xenbus`` (Linux's ``xenbus_dev_frontend``: it passes
  each message to xenstored over the shared ring and gives back the reply
  with our ``req_id``; watches set through it deliver ``XS_WATCH_EVENT``
  messages on the same file);
- in dom0: xenstored's Unix socket ``/var/run/xenstored/socket`` when it
  exists, else ``/dev/xen/xenbus``.

Every message is a ``struct xsd_sockmsg`` (``type``, ``req_id``, ``tx_id``,
``len``: four native ``uint32_t``) and ``len`` bytes of payload (at most
``XENSTORE_PAYLOAD_MAX``, 4096).  Requests name their strings NUL-separated
(``XS_WRITE``: the path NUL then the value, not NUL-terminated); a failure is
an ``XS_ERROR`` reply whose payload is the errno's name (``"ENOENT"``).  The
message numbers are the ``enum xsd_sockmsg_type`` of
``/usr/include/xen/io/xs_wire.h`` (tests/test_linux_xenstore.py checks them
against the header by compiling C).

The API is the service's ``domain.xs`` (:class:`~xengrant.service.client.XenStoreClient`):
``read``, ``write``, ``mkdir``, ``rm``, ``directory``, ``get_perms``,
``set_perms``, ``watch``, ``unwatch``, ``read_watch``, ``read_watch_token``,
``drop_watch_events``, ``get_domain_path``, ``wait_for_value``; errors raise
:class:`~xengrant.errors.XenStoreError` with xenstored's errno, so
:mod:`xengrant.service.xenbus`'s handshake helpers run on both.  Every call
waits at most ``timeout`` seconds (``TimeoutError``); what xenstored sends is
input from another domain's daemon and is bounded (``len`` <= 4096) before it
is read.  Transactions (:meth:`LinuxXenStore.transaction`) put their
``tx_id`` in each request's header, as libxenstore does.

Logging (``xengrant.linux``, as the grant calls, :mod:`._log`): xenstored's
error answers (``ENOENT``, ``EACCES``, ``EAGAIN`` ...: what other domains'
nodes and permissions decide) at DEBUG with the errno, rate-limited; a
request given up for want of a reply at WARNING, rate-limited; a connection
that died (xenstored closed it, sent a message over 4096 bytes, a read or
write failed) at WARNING, once; every later request on it fails at once with
the same errno (its stream is gone or out of step).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence

from ..errors import XenStoreError
from ..xenstore import wire as _w
from ..xenstore.client import ClientCodec, result, wait_for_value
from ..xenstore.wire import (  # noqa: F401  (re-exported: the XS_* numbers of xs_wire.h)
    HEADER,
    XENSTORE_PAYLOAD_MAX,
    XS_CONTROL,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_ERROR,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_MKDIR,
    XS_READ,
    XS_RELEASE,
    XS_RESET_WATCHES,
    XS_RESUME,
    XS_RM,
    XS_SET_PERMS,
    XS_SET_TARGET,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WATCH_EVENT,
    XS_WRITE,
)
from ..xsapi import Watching, WireTransaction
from ._log import logger, ratelimited

XENSTORED_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
#: seconds a request waits for its reply unless told otherwise
DEFAULT_TIMEOUT = 30.0


def _strings(*parts: str) -> bytes:
    return _w.strings(*parts)


class LinuxXenStore:
    """One xenstore connection (libxenstore's ``xs_open``), over a socket or the xenbus device.

    Paths without a leading ``/`` are relative to this domain's home
    (``/local/domain/<domid>``), as xenstored resolves them.  Thread-safe: one
    request at a time.

    Args:
        path: the socket or device; None picks :data:`XENSTORED_SOCKET` if it
            exists, else :data:`XENBUS_DEVICE`.
        timeout: the default bound, in seconds, of every call.

    Raises:
        OSError: neither can be opened.
    """

    def __init__(self, path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if path is None:
            path = XENSTORED_SOCKET if os.path.exists(XENSTORED_SOCKET) else XENBUS_DEVICE
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        if path.startswith("/dev/"):
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _connect(self._sock, path, timeout)
                self._sock.setblocking(False)
            except BaseException:
                self._sock.close()
                raise
            self.fd = self._sock.fileno()
        self._mu = threading.RLock()
        #: request ids, reply matching, the watch-event queue (shared with every client)
        self.codec = ClientCodec()
        #: watch events read while waiting for something else: (path, token)
        self.watch_events = self.codec.watch_events
        self.closed = False
        #: why the connection died (logged once), or None
        self.broken: XenStoreError | None = None

    def __repr__(self) -> str:
        return f"<LinuxXenStore {self.path}{' closed' if self.closed else ''}>"

    def __enter__(self) -> LinuxXenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (xenstored drops its watches)."""
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            self._sock.close()
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    # ------------------------------------------------------------ the wire
    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t < 0 else time.monotonic() + t

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError as e:
                raise self._broke(XenStoreError(
                    e.errno or errno.EIO, f"write to {self.path}: {e.strerror}")) from None
            view = view[n:]

    def _pump(self, deadline: float | None) -> bool:
        """Read what the peer sent into the codec; False once the deadline passed."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        r, _, _ = select.select([self.fd], [], [], left)
        if not r:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError as e:
            raise self._broke(XenStoreError(
                e.errno or errno.EIO, f"read of {self.path}: {e.strerror}")) from None
        if not chunk:
            raise self._broke(
                XenStoreError(errno.ECONNRESET, f"{self.path} closed the connection"))
        try:
            self.codec.feed(chunk)  # bounded: a message over 4096 bytes raises EPROTO
        except XenStoreError as e:
            raise self._broke(e) from None
        return True

    def _broke(self, err: XenStoreError) -> XenStoreError:
        """The connection is dead: say why once, at WARNING; returns ``err``."""
        if self.broken is None:
            self.broken = err
            logger.warning("xenstore connection %s failed: %s (errno %s)", self.path,
                           err.detail or err, err.errno)
        return err

    def _call(self, mtype: int, payload: bytes, timeout: float | None = None,
              tx: int = 0) -> bytes:
        name = f"XS_{_w.XS_NAMES.get(mtype, mtype)}"
        with self._mu:
            if self.closed:
                raise XenStoreError(errno.EBADF, "the connection is closed")
            if self.broken is not None:  # its stream is gone or out of step: no more requests
                raise XenStoreError(self.broken.errno or errno.EIO, f"{name}: {self.broken.detail}")
            req_id, data = self.codec.request(mtype, payload, tx)
            deadline = self._deadline(timeout)
            try:
                self._send(data)
                while True:
                    msg = self.codec.reply(req_id)
                    if msg is not None:
                        return self._result(msg, name)
                    if not self._pump(deadline):
                        ratelimited(logging.WARNING, ("xenstore", "timeout"),
                                    "%s: no reply from %s in time; the request is given up",
                                    name, self.path)
                        raise TimeoutError(f"{name}: no reply from {self.path} in time")
            finally:
                self.codec.forget(req_id)

    @staticmethod
    def _result(msg: _w.Message, name: str) -> bytes:
        """The reply's payload; xenstored's error answer logged at DEBUG and raised."""
        try:
            return result(msg, name)
        except XenStoreError as e:
            err = e.errno or errno.EINVAL
            ratelimited(logging.DEBUG, ("xenstore", name, err), "%s: xenstored answered %s (%d)",
                        name, errno.errorcode.get(err, str(err)), err)
            raise

    # ------------------------------------------------------------- requests
    def read(self, path: str, timeout: float | None = None) -> bytes:
        """``xs_read``: the node's value.

        Raises:
            XenStoreError: ENOENT, EACCES ... (xenstored's errno).
            TimeoutError: no reply within ``timeout`` (default: the connection's).
        """
        return self._call(XS_READ, _strings(path), timeout)

    def write(self, path: str, value: bytes | str, timeout: float | None = None) -> None:
        """``xs_write`` (creates the node and missing parents)."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._call(XS_WRITE, path.encode() + b"\0" + data, timeout)

    def mkdir(self, path: str, timeout: float | None = None) -> None:
        """``xs_mkdir``."""
        self._call(XS_MKDIR, _strings(path), timeout)

    def rm(self, path: str, timeout: float | None = None) -> None:
        """``xs_rm`` (recursive)."""
        self._call(XS_RM, _strings(path), timeout)

    def directory(self, path: str, timeout: float | None = None) -> list[str]:
        """``xs_directory``: the child names."""
        body = self._call(XS_DIRECTORY, _strings(path), timeout)
        return [x.decode() for x in body.split(b"\0") if x]

    def get_perms(self, path: str, timeout: float | None = None) -> list[str]:
        """``xs_get_permissions`` as strings (``"n0"``, ``"r5"``)."""
        body = self._call(XS_GET_PERMS, _strings(path), timeout)
        return [x.decode() for x in body.split(b"\0") if x]

    def set_perms(self, path: str, perms: Sequence[str], timeout: float | None = None) -> None:
        """``xs_set_permissions``: the owner and everyone's default first, then per domain."""
        self._call(XS_SET_PERMS, _strings(path, *perms), timeout)

    def get_domain_path(self, domid: int, timeout: float | None = None) -> str:
        """``xs_get_domain_path``: ``/local/domain/<domid>``."""
        return self._call(XS_GET_DOMAIN_PATH, _strings(str(domid)), timeout).rstrip(b"\0").decode()

    def watch(self, path: str, token: str, timeout: float | None = None) -> None:
        """``xs_watch``: an event comes at once, then at every change at or below ``path``."""
        self._call(XS_WATCH, _strings(path, token), timeout)

    def unwatch(self, path: str, token: str, timeout: float | None = None) -> None:
        """``xs_unwatch``."""
        self._call(XS_UNWATCH, _strings(path, token), timeout)

    def watching(self, path: str, token: str) -> Watching:
        """:meth:`watch` as a context manager: leaving it unwatches and drops
        the watch's queued events."""
        self.watch(path, token)
        return Watching(self, path, token)

    def transaction(self) -> WireTransaction:
        """``xs_transaction_start`` (``XS_TRANSACTION_START``): a transaction
        whose requests carry its ``tx_id``; its commit raises
        :class:`~xengrant.xsapi.TransactionConflict` on xenstored's EAGAIN."""
        return WireTransaction(lambda mtype, payload, tx: self._call(mtype, payload, None, tx))

    def introduce(self, domid: int, mfn: int, port: int, timeout: float | None = None) -> None:
        """``xs_introduce_domain`` (``XS_INTRODUCE``; dom0, to xenstored's socket)."""
        self._call(XS_INTRODUCE, _strings(str(domid), str(mfn), str(port)), timeout)

    def release(self, domid: int, timeout: float | None = None) -> None:
        """``xs_release_domain`` (``XS_RELEASE``; dom0)."""
        self._call(XS_RELEASE, _strings(str(domid)), timeout)

    def set_target(self, domid: int, target: int, timeout: float | None = None) -> None:
        """``xs_set_target`` (``XS_SET_TARGET``; dom0): ``domid`` gets ``target``'s rights."""
        self._call(XS_SET_TARGET, _strings(str(domid), str(target)), timeout)

    # --------------------------------------------------------------- events
    def read_watch(self, timeout: float | None = None) -> tuple[str, str]:
        """``xs_read_watch``: the next ``(path, token)``.

        Raises:
            TimeoutError: none came within ``timeout`` seconds (None: wait forever).
        """
        return self._read_event(None, timeout)

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]:
        """The next event of the watch set with ``token`` (others stay queued).

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
        """
        return self._read_event(token, timeout)

    async def read_watch_async(self, timeout: float | None = None) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch` (waits in a worker thread)."""
        import asyncio  # not at the top: a domU's agent starts faster without it

        return await asyncio.to_thread(self.read_watch, timeout)

    def drop_watch_events(self, token: str) -> None:
        """Forget queued events of the watch set with ``token``."""
        with self._mu:
            self.codec.drop_events(token)

    def _read_event(self, token: str | None, timeout: float | None) -> tuple[str, str]:
        with self._mu:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                item = self.codec.take_event(token)
                if item is not None:
                    return item
                if not self._pump(deadline):
                    raise TimeoutError(f"read_watch: no watch event within {timeout} s")

    def wait_for_value(
        self, path: str, want: Sequence[bytes] | None = None, timeout: float | None = None
    ) -> bytes:
        """Watch ``path`` until it exists (and holds one of ``want``); return its value.

        Raises:
            TimeoutError: ``timeout`` passed first.
        """
        return wait_for_value(self, path, want, timeout, (XenStoreError, TimeoutError, OSError))

    async def wait_for_value_async(
        self, path: str, want: Sequence[bytes] | None = None, timeout: float | None = None
    ) -> bytes:
        """asyncio twin of :meth:`wait_for_value`."""
        import asyncio

        return await asyncio.to_thread(self.wait_for_value, path, want, timeout)

    def domid(self, timeout: float | None = None) -> int:
        """This domain's id: its ``domid`` node, which the toolstack writes.

        Raises:
            XenStoreError: the node is missing or unreadable.
        """
        return int(self.read("domid", timeout))


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect, waiting up to ``timeout`` for room in xenstored's listen queue.

    A non-blocking AF_UNIX connect to a full backlog fails at once with EAGAIN
    (C xenstored listens with a backlog of 1, so a few clients opening at once
    meet it); a blocking one waits in ``unix_wait_for_peer``, bounded by the
    socket's send timeout (``sock_sndtimeo``).
    """
    secs = max(timeout, 0.001)
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("@ll", int(secs), int(secs % 1 * 1e6)))
    try:
        sock.connect(path)
    except BlockingIOError as e:  # the send timeout passed with the queue still full
        raise TimeoutError(f"connect to {path}: xenstored's listen queue stayed full") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", 0, 0))


def open_xenstore(path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> LinuxXenStore:
    """A :class:`LinuxXenStore` (the socket in dom0 when xenstored runs there, else xenbus)."""
    return LinuxXenStore(path, timeout=timeout)


def xenstore_domid(path: str | None = None, timeout: float = 10.0) -> int | None:
    """This domain's id read from xenstore, or None when xenstore cannot be reached.

    Args:
        path: as :class:`LinuxXenStore`.
        timeout: the bound on opening and reading, in seconds.
    """
    try:
        with LinuxXenStore(path, timeout=timeout) as xs:
            return xs.domid()
    except (OSError, ValueError):
        return None
