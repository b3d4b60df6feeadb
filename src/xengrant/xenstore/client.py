"""The client side of xs_wire, sans-IO, shared by every xenstore client here.

:class:`ClientCodec` numbers requests, packs them, takes the bytes the
server sends, matches replies to requests by ``req_id`` (a reply to a
request given up is dropped), queues ``XS_WATCH_EVENT`` messages, and turns
``XS_ERROR`` replies into :class:`~xengrant.errors.XenStoreError` with
xenstored's errno.  A client adds the I/O: :class:`xengrant.linux.LinuxXenStore`
(a socket or /dev/xen/xenbus) and the service's xenstore client.

:func:`wait_for_value` and :func:`wait_until` are the watch-then-read loops
every client offers, written once against :class:`WatchingStore`;
:func:`wait_until_async` and :func:`wait_for_value_async` are their asyncio
twins, the same loop with the event loop running while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from ..errors import XenStoreError
from . import wire as w

T = TypeVar("T")


class ClientCodec:
    """Request ids, reply matching and watch-event queueing for one connection.

    Args:
        max_events: watch events kept unread; past it the oldest go (a
            client that never reads its watches must not grow forever).
    """

    def __init__(self, max_events: int = 65536) -> None:
        self.decoder = w.Decoder()
        self._req_id = 0
        self._pending: set[int] = set()
        self._replies: dict[int, w.Message] = {}
        #: watch events not yet read: (path, token)
        self.watch_events: deque[tuple[str, str]] = deque(maxlen=max_events)

    def request(self, mtype: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        """A new request: ``(req_id, bytes to send)``.

        Raises:
            XenStoreError: E2BIG if the payload is over XENSTORE_PAYLOAD_MAX.
        """
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        data = w.pack(mtype, self._req_id, tx_id, payload)
        self._pending.add(self._req_id)
        return self._req_id, data

    def forget(self, req_id: int) -> None:
        """Give up on a request: its reply, if it comes, is dropped."""
        self._pending.discard(req_id)
        self._replies.pop(req_id, None)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server: replies are kept for :meth:`reply`, events queued.

        Raises:
            ProtocolViolation: EPROTO, a message over XENSTORE_PAYLOAD_MAX.
        """
        for msg in self.decoder.feed(data):
            if msg.type == w.XS_WATCH_EVENT:
                self.queue_event(msg.payload)
            elif msg.req_id in self._pending:
                self._pending.discard(msg.req_id)
                self._replies[msg.req_id] = msg
            # else: the late reply to a request given up

    def queue_event(self, payload: bytes) -> None:
        """Queue an XS_WATCH_EVENT payload (path NUL token NUL); a malformed one is dropped.

        As Linux's ``xs_watch_msg``: the payload must hold exactly two
        strings (``count_strings(body, len) != 2`` is dropped, EINVAL), which
        is what xenstored's ``send_event`` sends.  Bytes that are not UTF-8
        (a token is whatever XS_WATCH carried) are replaced, not raised.
        """
        if payload.count(b"\0") != 2:
            return
        parts = payload.split(b"\0")
        self.watch_events.append(
            (parts[w.XS_WATCH_PATH].decode(errors="replace"),
             parts[w.XS_WATCH_TOKEN].decode(errors="replace"))
        )

    def reply(self, req_id: int) -> w.Message | None:
        """The reply to ``req_id`` once it came (taken), else None."""
        return self._replies.pop(req_id, None)

    def take_event(self, token: str | None = None) -> tuple[str, str] | None:
        """The oldest queued event (of the watch with ``token``, if given), taken; else None."""
        for item in self.watch_events:
            if token is None or item[1] == token:
                self.watch_events.remove(item)
                return item
        return None

    def drop_events(self, token: str) -> None:
        """Forget queued events of the watch set with ``token``."""
        for item in [e for e in self.watch_events if e[1] == token]:
            self.watch_events.remove(item)


def result(msg: w.Message, what: str = "xenstore request") -> bytes:
    """A reply's payload, or the XS_ERROR it is raised.

    Raises:
        XenStoreError: the errno xenstored named (EINVAL for an unknown name).
    """
    if msg.type == w.XS_ERROR:
        name = msg.payload.split(b"\0", 1)[0].decode("ascii", "replace")
        raise XenStoreError(w.errno_of(msg.payload), f"{what}: {name}")
    return msg.payload


class WatchingStore(Protocol):
    """What :func:`wait_for_value` needs of a client."""

    def read(self, path: str) -> bytes: ...

    def watch(self, path: str, token: str) -> None: ...

    def unwatch(self, path: str, token: str) -> None: ...

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]: ...

    def drop_watch_events(self, token: str) -> None: ...


def _token(xs: object) -> str:
    """A token no other wait of this process uses."""
    return f"wait-{id(xs):x}-{time.monotonic_ns()}"


def _timeout_text(path: str, what: str | Callable[[], str]) -> str:
    text = what() if callable(what) else what
    return text or f"{path}: not there in time"


def wait_until(
    xs: WatchingStore,
    path: str,
    check: Callable[[], T | None],
    timeout: float | None = None,
    what: str | Callable[[], str] = "",
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """Watch ``path`` and call ``check`` at once and after each event until it returns non-None.

    Args:
        xs: the client.
        path: the watched path.
        check: the test; its first non-None result is returned.
        timeout: seconds in all (None: no bound).
        what: the TimeoutError's text (or a function giving it then).
        ignore: errors of the final unwatch to ignore (the connection may be gone).

    Returns:
        ``check``'s result.

    Raises:
        TimeoutError: ``timeout`` passed first.
    """
    token = _token(xs)
    deadline = None if timeout is None else time.monotonic() + timeout
    xs.watch(path, token)
    try:
        while True:
            got = check()
            if got is not None:
                return got
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(_timeout_text(path, what))
            with contextlib.suppress(TimeoutError):  # the deadline above says so
                xs.read_watch_token(token, left)
    finally:
        with contextlib.suppress(*ignore):
            xs.unwatch(path, token)
        xs.drop_watch_events(token)


async def read_watch_token_async(
    xs: WatchingStore, token: str, timeout: float | None
) -> tuple[str, str]:
    """``xs.read_watch_token_async(token, timeout)`` where the client has it
    (EmbeddedXen's, the service's); else its blocking call in a worker thread.

    Raises:
        TimeoutError: none came within ``timeout`` seconds.
    """
    native = getattr(xs, "read_watch_token_async", None)
    if native is not None:
        got: tuple[str, str] = await native(token, timeout)
        return got
    return await asyncio.to_thread(xs.read_watch_token, token, timeout)


async def wait_until_async(
    xs: WatchingStore,
    path: str,
    check: Callable[[], T | None],
    timeout: float | None = None,
    what: str | Callable[[], str] = "",
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """asyncio twin of :func:`wait_until`: the same loop, the event loop runs while it waits.

    Args:
        xs: the client.
        path: the watched path.
        check: the test (a plain call: every client's read answers at once
            or within its own timeout); its first non-None result is returned.
        timeout: seconds in all (None: no bound), on the running loop's clock.
        what: the TimeoutError's text (or a function giving it then).
        ignore: errors of the final unwatch to ignore (the connection may be gone).

    Returns:
        ``check``'s result.

    Raises:
        TimeoutError: ``timeout`` passed first.
    """
    loop = asyncio.get_running_loop()
    token = _token(xs)
    deadline = None if timeout is None else loop.time() + timeout
    xs.watch(path, token)
    try:
        while True:
            got = check()
            if got is not None:
                return got
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(_timeout_text(path, what))
            with contextlib.suppress(TimeoutError):  # the deadline above says so
                await read_watch_token_async(xs, token, left)
    finally:
        with contextlib.suppress(*ignore):
            xs.unwatch(path, token)
        xs.drop_watch_events(token)


def _value_check(
    xs: WatchingStore, path: str, want: Sequence[bytes] | None
) -> Callable[[], bytes | None]:
    """:func:`wait_for_value`'s test: the value once there (and one of ``want``)."""

    def check() -> bytes | None:
        try:
            value = xs.read(path)
        except XenStoreError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                raise
            return None
        return value if want is None or value in want else None

    return check


def wait_for_value(
    xs: WatchingStore,
    path: str,
    want: Sequence[bytes] | None = None,
    timeout: float | None = None,
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> bytes:
    """Watch ``path`` until it exists (and holds one of ``want``); return its value.

    A node absent or unreadable (ENOENT, EACCES) is waited for.

    Raises:
        TimeoutError: ``timeout`` passed first.
        XenStoreError: any other error of the read.
    """
    return wait_until(xs, path, _value_check(xs, path, want), timeout,
                      f"{path} did not become {want!r} in time", ignore)


async def wait_for_value_async(
    xs: WatchingStore,
    path: str,
    want: Sequence[bytes] | None = None,
    timeout: float | None = None,
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> bytes:
    """asyncio twin of :func:`wait_for_value`.

    Raises:
        TimeoutError: ``timeout`` passed first.
        XenStoreError: any other error of the read.
    """
    return await wait_until_async(xs, path, _value_check(xs, path, want), timeout,
                                  f"{path} did not become {want!r} in time", ignore)
