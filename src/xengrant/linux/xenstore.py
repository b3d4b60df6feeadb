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
is read.  No transactions (``tx_id`` is 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence

from ..errors import XenStoreError

# enum xsd_sockmsg_type (xen/include/public/io/xs_wire.h)
XS_CONTROL = 0
XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_IS_DOMAIN_INTRODUCED = 17
XS_RESUME = 18
XS_SET_TARGET = 19
XS_RESET_WATCHES = 21
XS_DIRECTORY_PART = 22
#: XENSTORE_PAYLOAD_MAX: the largest payload of one message.
XENSTORE_PAYLOAD_MAX = 4096
#: struct xsd_sockmsg
HEADER = struct.Struct("=IIII")

XENSTORED_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
#: seconds a request waits for its reply unless told otherwise
DEFAULT_TIMEOUT = 30.0


def _errno_of(name: bytes) -> int:
    """``XS_ERROR``'s payload (``b"ENOENT\\0"``) -> the errno (EIO when unknown)."""
    text = name.rstrip(b"\0").decode("ascii", "replace")
    value = getattr(errno, text, None)
    return value if isinstance(value, int) and text.startswith("E") else errno.EIO


def _strings(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


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
                self._sock.settimeout(timeout)
                self._sock.connect(path)
                self._sock.setblocking(False)
            except BaseException:
                self._sock.close()
                raise
            self.fd = self._sock.fileno()
        self._mu = threading.RLock()
        self._buf = bytearray()
        self._req_id = 0
        #: watch events read while waiting for something else: (path, token)
        self.watch_events: deque[tuple[str, str]] = deque()
        self.closed = False

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

    def _send(self, mtype: int, payload: bytes, req_id: int) -> None:
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XenStoreError(errno.E2BIG, f"payload of {len(payload)} bytes > 4096")
        data = HEADER.pack(mtype, req_id, 0, len(payload)) + payload
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]

    def _next_message(self, deadline: float | None) -> tuple[int, int, bytes] | None:
        """The next whole message ``(type, req_id, payload)``, or None at the deadline."""
        while True:
            if len(self._buf) >= HEADER.size:
                mtype, req_id, _tx, length = HEADER.unpack_from(self._buf)
                if length > XENSTORE_PAYLOAD_MAX:  # hostile or broken: never buffer more
                    raise XenStoreError(errno.EPROTO, f"message of {length} bytes from {self.path}")
                end = HEADER.size + length
                if len(self._buf) >= end:
                    payload = bytes(self._buf[HEADER.size : end])
                    del self._buf[:end]
                    return mtype, req_id, payload
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                return None
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise XenStoreError(errno.ECONNRESET, f"{self.path} closed the connection")
            self._buf += chunk

    def _queue_event(self, payload: bytes) -> None:
        parts = payload.split(b"\0")
        if len(parts) >= 2:
            self.watch_events.append((parts[0].decode(errors="replace"),
                                      parts[1].decode(errors="replace")))

    def _call(self, mtype: int, payload: bytes, timeout: float | None = None) -> bytes:
        name = f"xenstore request {mtype}"
        with self._mu:
            if self.closed:
                raise XenStoreError(errno.EBADF, "the connection is closed")
            self._req_id = (self._req_id + 1) & 0xFFFFFFFF
            req_id = self._req_id
            deadline = self._deadline(timeout)
            self._send(mtype, payload, req_id)
            while True:
                msg = self._next_message(deadline)
                if msg is None:
                    raise TimeoutError(f"{name}: no reply from {self.path} in time")
                rtype, rid, body = msg
                if rtype == XS_WATCH_EVENT:
                    self._queue_event(body)
                    continue
                if rid != req_id:
                    continue  # the late reply to a request given up
                if rtype == XS_ERROR:
                    text = body.rstrip(b"\0").decode(errors="replace")
                    raise XenStoreError(_errno_of(body), text)
                return body

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
            for item in [e for e in self.watch_events if e[1] == token]:
                self.watch_events.remove(item)

    def _read_event(self, token: str | None, timeout: float | None) -> tuple[str, str]:
        with self._mu:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                for item in self.watch_events:
                    if token is None or item[1] == token:
                        self.watch_events.remove(item)
                        return item
                msg = self._next_message(deadline)
                if msg is None:
                    raise TimeoutError(f"read_watch: no watch event within {timeout} s")
                if msg[0] == XS_WATCH_EVENT:
                    self._queue_event(msg[2])
                # anything else is a late reply to a request given up

    def wait_for_value(
        self, path: str, want: Sequence[bytes] | None = None, timeout: float | None = None
    ) -> bytes:
        """Watch ``path`` until it exists (and holds one of ``want``); return its value.

        Raises:
            TimeoutError: ``timeout`` passed first.
        """
        token = f"wait-{id(self)}-{time.monotonic_ns()}"
        deadline = None if timeout is None else time.monotonic() + timeout
        self.watch(path, token)
        try:
            while True:
                try:
                    value = self.read(path)
                    if want is None or value in want:
                        return value
                except XenStoreError as e:
                    if e.errno not in (errno.ENOENT, errno.EACCES):
                        raise
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{path} did not become {want!r} in time")
                with contextlib.suppress(TimeoutError):  # the deadline above says so
                    self.read_watch_token(token, left)
        finally:
            with contextlib.suppress(XenStoreError, TimeoutError, OSError):
                self.unwatch(path, token)
            self.drop_watch_events(token)

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
