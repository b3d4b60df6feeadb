"""The domain's xenstore connection over the service's socket (``domain.xs``)."""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Sequence

from . import protocol as p
from .callclient import ServiceCallClient, or_timeout
from .errors import ServiceError
from .xenstore import XenStoreError


# ------------------------------------------------------------------ xenstore
class XenStoreClient(ServiceCallClient):
    """The domain's xenstore connection (libxenstore's ``xs_*`` calls).

    Paths without a leading ``/`` are relative to the domain's home,
    ``/local/domain/<domid>``.  Errors raise :class:`XenStoreError` with
    xenstored's errno.
    """

    error = XenStoreError

    def read(self, path: str) -> bytes:
        """``xs_read``."""
        return self._call(p.MSG_XS_READ, p.pack_strings(path))

    def write(self, path: str, value: bytes | str) -> None:
        """``xs_write`` (creates the node and missing parents)."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._call(p.MSG_XS_WRITE, path.encode() + b"\0" + data)

    def mkdir(self, path: str) -> None:
        """``xs_mkdir``."""
        self._call(p.MSG_XS_MKDIR, p.pack_strings(path))

    def rm(self, path: str) -> None:
        """``xs_rm`` (recursive)."""
        self._call(p.MSG_XS_RM, p.pack_strings(path))

    def directory(self, path: str) -> list[str]:
        """``xs_directory``: child names."""
        return [x.decode() for x in p.split_strings(self._call(p.MSG_XS_DIRECTORY,
                                                                 p.pack_strings(path)))]

    def get_perms(self, path: str) -> list[str]:
        """``xs_get_permissions`` as strings (``"n0"``, ``"r5"``)."""
        return [x.decode() for x in p.split_strings(self._call(p.MSG_XS_GET_PERMS,
                                                                 p.pack_strings(path)))]

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        """``xs_set_permissions``: first entry owner + default, then per-domain entries."""
        self._call(p.MSG_XS_SET_PERMS, p.pack_strings(path, *perms))

    def watch(self, path: str, token: str) -> None:
        """``xs_watch``: an event comes at once, then on each change at or below ``path``."""
        self._call(p.MSG_XS_WATCH, p.pack_strings(path, token))

    def watching(self, path: str, token: str) -> XenStoreWatch:
        """:meth:`watch`, as a context manager: ``with xs.watching(path, token) as w:
        w.read(timeout)``; leaving the block unwatches and drops its queued events."""
        self.watch(path, token)
        return XenStoreWatch(self, path, token)

    def unwatch(self, path: str, token: str) -> None:
        """``xs_unwatch``."""
        self._call(p.MSG_XS_UNWATCH, p.pack_strings(path, token))

    def read_watch(self, timeout: float | None = None) -> tuple[str, str]:
        """``xs_read_watch``: the next ``(path, token)``.

        Raises:
            TimeoutError: none came within ``timeout`` seconds (None: wait forever).
        """
        item: tuple[str, str] | None = self.channel.wait_for(
            self.channel.watch_events, None, timeout
        )
        return or_timeout(item, "read_watch: no watch event", timeout)

    async def read_watch_async(self, timeout: float | None = None) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch`."""
        item: tuple[str, str] | None = await self.channel.wait_for_async(
            self.channel.watch_events, None, timeout
        )
        return or_timeout(item, "read_watch_async: no watch event", timeout)

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]:
        """The next event of the watch set with ``token`` (others stay queued).

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
        """
        item: tuple[str, str] | None = self.channel.wait_for(
            self.channel.watch_events, _TokenMatch(token), timeout
        )
        return or_timeout(item, f"read_watch_token: no event of watch {token!r}", timeout)

    def drop_watch_events(self, token: str) -> None:
        """Forget queued events of the watch set with ``token``."""
        with self.channel._mu:
            for item in [e for e in self.channel.watch_events if e[1] == token]:
                self.channel.watch_events.remove(item)

    def get_domain_path(self, domid: int) -> str:
        """``xs_get_domain_path``: ``/local/domain/<domid>``."""
        body = self._call(p.MSG_XS_GET_DOMAIN_PATH, p.pack_strings(str(domid)))
        return body.rstrip(b"\0").decode()

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
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{path} did not become {want!r}")
                with contextlib.suppress(TimeoutError):  # the deadline above says so
                    self.read_watch_token(token, remaining)
        finally:
            with contextlib.suppress(XenStoreError, ServiceError):
                self.unwatch(path, token)
            self.drop_watch_events(token)


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


class _TokenMatch:
    """Compares equal to any watch event with this token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __eq__(self, other: object) -> bool:
        return isinstance(other, tuple) and len(other) == 2 and other[1] == self.token

    __hash__ = None  # type: ignore[assignment]
