"""The portable xenstore API: libxenstore's calls, one semantics on every backend.

:class:`XenStore` is what ``domain.xs`` is on an :class:`~xengrant.EmbeddedXen`
domain (:class:`~xengrant.xs_embedded.EmbeddedXenStore`, in this process), on
a domain of the service (:class:`~xengrant.service.XenStoreClient`) and on
real Xen (:class:`~xengrant.linux.LinuxXenStore`, xs_wire over xenstored's
socket or ``/dev/xen/xenbus``).  The rules they share (tools/libs/store/xs.c,
tools/xenstored/core.c):

- Paths without a leading ``/`` are under the domain's home,
  ``/local/domain/<domid>`` (``canonicalize``).
- Errors are :class:`~xengrant.errors.XenStoreError` with xenstored's errno
  (ENOENT, EACCES, EINVAL, EEXIST, ENOSPC, E2BIG, EAGAIN ...).
- ``watch(path, token)`` fires once at once, then at every change at or below
  ``path`` the watcher may read; events are ``(path, token)`` tuples,
  relative when the watch was.  ``read_watch(timeout)`` /
  ``read_watch_token(token, timeout)`` raise :class:`TimeoutError` when none
  came; ``watching(path, token)`` is a context manager that unwatches.
- A transaction (``xs.transaction()``, ``XS_TRANSACTION_START``) sees its
  own writes; nothing of it is seen by others before the commit; the commit
  (``XS_TRANSACTION_END`` "T") fails with :class:`TransactionConflict`
  (EAGAIN) when a node it touched changed meanwhile, and nothing of it is
  applied.  :func:`run_transaction` retries, as every xenbus user does
  (``xenbus_transaction_start`` ... ``-EAGAIN: goto again``).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from .errors import XenStoreError
from .xenstore import wire as w
from .xenstore.client import wait_for_value, wait_for_value_async

_T = TypeVar("_T")

#: tries :func:`run_transaction` makes before giving up
DEFAULT_RETRIES = 16


class TransactionConflict(XenStoreError):
    """A transaction's commit met a change made meanwhile (``EAGAIN``): nothing
    of it was applied; run it again (:func:`run_transaction` does)."""

    def __init__(self, text: str = "") -> None:
        super().__init__(errno.EAGAIN, text or "the transaction conflicted: run it again")


@runtime_checkable
class XenStoreOps(Protocol):
    """The node operations, on a connection or inside a transaction."""

    def read(self, path: str) -> bytes:
        """``xs_read``: the node's value.

        Raises:
            XenStoreError: ENOENT, EACCES, EINVAL.
        """
        ...

    def write(self, path: str, value: bytes | str) -> None:
        """``xs_write``: set the value, creating the node and missing parents."""
        ...

    def mkdir(self, path: str) -> None:
        """``xs_mkdir``: an empty node (fine if it exists)."""
        ...

    def rm(self, path: str) -> None:
        """``xs_rm``: the node and everything below it."""
        ...

    def directory(self, path: str) -> list[str]:
        """``xs_directory``: the children's names."""
        ...

    def get_perms(self, path: str) -> list[str]:
        """``xs_get_permissions``: ``["n0", "r5", ...]`` (owner and default first)."""
        ...

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        """``xs_set_permissions``."""
        ...


class Transaction(XenStoreOps, Protocol):
    """An open transaction: the node operations, then :meth:`commit` or :meth:`abort`."""

    def commit(self) -> None:
        """``xs_transaction_end(t, false)``.

        Raises:
            TransactionConflict: EAGAIN: nothing was applied.
        """
        ...

    def abort(self) -> None:
        """``xs_transaction_end(t, true)``: forget it."""
        ...

    def __enter__(self) -> Transaction: ...

    def __exit__(self, exc_type: object, *exc: object) -> None: ...


class WatchContext(Protocol):
    """What ``xs.watching(path, token)`` returns: a context manager that unwatches."""

    token: str

    def read(self, timeout: float | None = None) -> tuple[str, str]:
        """The next event of this watch (TimeoutError when none came)."""
        ...

    def close(self) -> None:
        """Unwatch and drop the queued events."""
        ...

    def __enter__(self) -> WatchContext: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class XenStore(XenStoreOps, Protocol):
    """A xenstore connection (``xs_open``) on any backend."""

    def watching(self, path: str, token: str) -> WatchContext:
        """:meth:`watch` as a context manager (leaving it unwatches)."""
        ...

    def watch(self, path: str, token: str) -> None:
        """``xs_watch``: an event at once, then at each change at or below ``path``."""
        ...

    def unwatch(self, path: str, token: str) -> None:
        """``xs_unwatch`` (its queued events stay until read or dropped)."""
        ...

    def read_watch(self, timeout: float | None = None) -> tuple[str, str]:
        """``xs_read_watch``: the next ``(path, token)``.

        Raises:
            TimeoutError: none within ``timeout`` seconds (None: for ever).
        """
        ...

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]:
        """The next event of the watch with ``token`` (others stay queued).

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """
        ...

    async def read_watch_async(self, timeout: float | None = None) -> tuple[str, str]:
        """asyncio twin of :meth:`read_watch`."""
        ...

    def drop_watch_events(self, token: str) -> None:
        """Forget the queued events of the watch with ``token``."""
        ...

    def get_domain_path(self, domid: int) -> str:
        """``xs_get_domain_path``: ``/local/domain/<domid>``."""
        ...

    def transaction(self) -> Transaction:
        """``xs_transaction_start``: a :class:`Transaction` (a context manager
        that commits, or aborts when the block raises)."""
        ...


@runtime_checkable
class HasTransactions(Protocol):
    """Anything that starts transactions (every :class:`XenStore`)."""

    def transaction(self) -> Transaction:
        """``xs_transaction_start``."""
        ...


def run_transaction(
    xs: HasTransactions, fn: Callable[[Transaction], _T], retries: int = DEFAULT_RETRIES
) -> _T:
    """Run ``fn(t)`` in a transaction and commit it, again while it conflicts.

    The loop every xenbus user writes (``again: xenbus_transaction_start ...
    if (err == -EAGAIN) goto again``, drivers/xen/xenbus and libxl).

    Args:
        xs: the connection.
        fn: the transaction's body; it must only act through ``t`` (it may
            run several times).
        retries: commits tried before giving up.

    Returns:
        What ``fn`` returned, in the run that committed.

    Raises:
        TransactionConflict: every try conflicted.
        XenStoreError: ``fn`` or the commit failed otherwise (aborted).
    """
    last: TransactionConflict | None = None
    for _ in range(max(1, retries)):
        t = xs.transaction()
        try:
            out = fn(t)
        except BaseException:
            t.abort()
            raise
        try:
            t.commit()
        except TransactionConflict as e:
            last = e
            continue
        return out
    assert last is not None
    raise last


class XsWireOps:
    """The node operations as xs_wire requests, over ``_call`` (a connection's,
    or a transaction's with its ``tx_id``): one copy of how each ``xs_*`` call
    of tools/libs/store/xs.c packs its request and reads its reply."""

    def _call(self, mtype: int, payload: bytes, timeout: float | None = None,
              tx_id: int = 0) -> bytes:
        raise NotImplementedError

    def _tx(self) -> int:
        return 0

    def read(self, path: str) -> bytes:
        """``xs_read`` (``XS_READ``).

        Raises:
            XenStoreError: ENOENT, EACCES, EINVAL.
        """
        return self._call(w.XS_READ, w.strings(path), tx_id=self._tx())

    def write(self, path: str, value: bytes | str) -> None:
        """``xs_write`` (``XS_WRITE``: the path NUL the value): creates the node
        and missing parents.

        Raises:
            XenStoreError: EACCES, EINVAL, ENOSPC (quota), E2BIG.
        """
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._call(w.XS_WRITE, path.encode() + b"\0" + data, tx_id=self._tx())

    def mkdir(self, path: str) -> None:
        """``xs_mkdir`` (``XS_MKDIR``)."""
        self._call(w.XS_MKDIR, w.strings(path), tx_id=self._tx())

    def rm(self, path: str) -> None:
        """``xs_rm`` (``XS_RM``): the node and everything below it."""
        self._call(w.XS_RM, w.strings(path), tx_id=self._tx())

    def directory(self, path: str) -> list[str]:
        """``xs_directory`` (``XS_DIRECTORY``): the children's names."""
        body = self._call(w.XS_DIRECTORY, w.strings(path), tx_id=self._tx())
        return [x.decode() for x in body.split(b"\0") if x]

    def get_perms(self, path: str) -> list[str]:
        """``xs_get_permissions`` (``XS_GET_PERMS``): ``["n0", "r5", ...]``."""
        body = self._call(w.XS_GET_PERMS, w.strings(path), tx_id=self._tx())
        return [x.decode() for x in body.split(b"\0") if x]

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        """``xs_set_permissions`` (``XS_SET_PERMS``)."""
        self._call(w.XS_SET_PERMS, w.strings(path, *perms), tx_id=self._tx())


class WireTransaction(XsWireOps):
    """A transaction of an xs_wire connection: every request carries its ``tx_id``.

    Args:
        request: the connection's ``(XS_* type, payload, tx_id) -> reply payload``
            (raising :class:`~xengrant.errors.XenStoreError` for an XS_ERROR).
    """

    def __init__(self, request: Callable[[int, bytes, int], bytes]) -> None:
        self._request = request
        body = request(w.XS_TRANSACTION_START, w.strings(""), 0)
        self.tx_id = int(body.rstrip(b"\0") or b"0")
        self.done = False

    def __repr__(self) -> str:
        return f"<WireTransaction {self.tx_id}{' done' if self.done else ''}>"

    def _tx(self) -> int:
        if self.done:
            raise XenStoreError(errno.EINVAL, f"transaction {self.tx_id} has ended")
        return self.tx_id

    def _call(self, mtype: int, payload: bytes, timeout: float | None = None,
              tx_id: int = 0) -> bytes:
        return self._request(mtype, payload, tx_id)

    def __enter__(self) -> WireTransaction:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _end(self, commit: bool) -> None:
        tx_id = self._tx()
        self.done = True
        self._request(w.XS_TRANSACTION_END, w.strings("T" if commit else "F"), tx_id)

    def commit(self) -> None:
        """``xs_transaction_end(t, false)`` (``XS_TRANSACTION_END`` "T").

        Raises:
            TransactionConflict: EAGAIN (xenstored's ``finalize_transaction``
                found a node it touched changed): nothing was applied.
            XenStoreError: ENOENT (the transaction is unknown), a quota.
        """
        try:
            self._end(True)
        except XenStoreError as e:
            if e.errno == errno.EAGAIN:
                raise TransactionConflict(e.detail) from None
            raise

    def abort(self) -> None:
        """``xs_transaction_end(t, true)`` (``XS_TRANSACTION_END`` "F"); idempotent."""
        if not self.done:
            self._end(False)


class _Watcher(Protocol):
    def unwatch(self, path: str, token: str) -> None: ...

    def read_watch_token(self, token: str, timeout: float | None = None) -> tuple[str, str]: ...

    def drop_watch_events(self, token: str) -> None: ...


class Watching:
    """A watch set by ``xs.watching(path, token)``; leaving the block unwatches
    and drops its queued events.

    Attributes:
        path: the watched path.
        token: its token.
    """

    def __init__(self, xs: _Watcher, path: str, token: str) -> None:
        self.xs, self.path, self.token = xs, path, token
        self.closed = False

    def __repr__(self) -> str:
        return f"<Watching {self.path!r} {self.token!r}{' closed' if self.closed else ''}>"

    def read(self, timeout: float | None = None) -> tuple[str, str]:
        """The next event of this watch.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """
        return self.xs.read_watch_token(self.token, timeout)

    def close(self) -> None:
        """``xs_unwatch`` and drop its queued events; idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(OSError):  # a connection gone has no watch left
                self.xs.unwatch(self.path, self.token)
        finally:
            self.xs.drop_watch_events(self.token)

    def __enter__(self) -> Watching:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DEFAULT_RETRIES",
    "HasTransactions",
    "Transaction",
    "TransactionConflict",
    "Watching",
    "WireTransaction",
    "XenStore",
    "XenStoreOps",
    "XsWireOps",
    "run_transaction",
    "wait_for_value",
    "wait_for_value_async",
]
