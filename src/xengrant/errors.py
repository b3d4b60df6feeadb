"""Exceptions: each names the operation and carries Xen's code and text.

- :class:`GrantError` -- an op answered a ``GNTST_*`` status (per op, as Xen
  writes ``op->status``); ``status`` and ``message`` are Xen's.
- :class:`BatchError` -- a batch where some entries failed; ``statuses`` holds
  every entry's status, like the ``status`` fields Zephyr's and Linux's
  ``gnttab_map_refs`` callers inspect.
- :class:`HypercallError` -- the hypercall itself failed with a negative errno
  (``-EINVAL``, ``-ENOSYS``, ``-EBUSY`` ...), as ``set_version`` does.
- :class:`Busy` -- ending access to a grant the peer still has mapped
  (``GTF_reading``/``GTF_writing`` set): mirage's ``Error `Busy``.
- :class:`GrantTableFull` -- no free grant reference (mirage's
  ``Grant_table_full``, Linux's ``-ENOSPC``).
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence

from .abi.grant_table import GNTST_NAMES, GNTST_okay, gnttabop_error


class XenError(Exception):
    """Base class of every xengrant error."""


class GrantError(XenError):
    """A grant-table operation failed with a ``GNTST_*`` status.

    Attributes:
        op: the operation, e.g. ``"map_grant_ref"``.
        status: the ``GNTST_*`` code (negative).
        message: Xen's ``GNTTABOP_error_msgs`` text for ``status``.
        detail: what went wrong, in the words of Xen's debug message.
    """

    def __init__(self, op: str, status: int, detail: str = "") -> None:
        self.op = op
        self.status = status
        self.message = gnttabop_error(status)
        self.detail = detail
        name = GNTST_NAMES.get(status, str(status))
        text = f"{op}: {name} ({status}): {self.message}"
        if detail:
            text += f" -- {detail}"
        super().__init__(text)


class BatchError(GrantError):
    """Some entries of a batched op failed.

    Attributes:
        statuses: the status of every entry, in order (``GNTST_okay`` for
            those that succeeded).
        failed: ``(index, status)`` of each failed entry.
    """

    def __init__(self, op: str, statuses: Sequence[int], detail: str = "") -> None:
        self.statuses = list(statuses)
        self.failed = [(i, s) for i, s in enumerate(self.statuses) if s != GNTST_okay]
        first_index, first = self.failed[0] if self.failed else (0, GNTST_okay)
        summary = (
            f"{len(self.failed)} of {len(self.statuses)} entries failed; first: entry {first_index}"
        )
        super().__init__(op, first, f"{summary}{'; ' + detail if detail else ''}")


class HypercallError(XenError, OSError):
    """The hypercall returned a negative errno rather than per-op statuses.

    Attributes:
        op: the operation.
        errno: the positive errno value (``EINVAL`` ...).
    """

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        text = f"{op}: -{name}: {os.strerror(err)}"
        if detail:
            text += f" -- {detail}"
        OSError.__init__(self, err, text)
        self.op = op

    def __str__(self) -> str:
        return str(self.strerror)


class ErrnoError(XenError, OSError):
    """A request answered with an errno (xenstore, event channels).

    Attributes:
        errno: the positive errno.
        detail: what went wrong, without the errno name.
    """

    #: how the message starts: ``{name}`` is the errno's name (``EACCES``).
    prefix = "{name}"

    def __init__(self, err: int, text: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        head = self.prefix.format(name=name)
        OSError.__init__(self, err, head + (f": {text}" if text else ""))
        self.detail = text

    def __str__(self) -> str:
        return str(self.strerror)


class XenStoreError(ErrnoError):
    """A xenstore request failed (the service's xenstore or real xenstored).

    Attributes:
        errno: the positive errno xenstored answers (EACCES, ENOENT ...).
        detail: the explanation.
    """

    prefix = "xenstore: {name}"


class Busy(XenError, TimeoutError):
    """The peer still uses the grant: access cannot end yet.

    A :class:`TimeoutError`: the wait for the peer to let go timed out
    (``unshare(timeout=)``, ``end_access(timeout=)``; ``try_unshare`` and
    ``try_end_access`` are a zero timeout), so ``except TimeoutError`` catches
    every timeout of the package.

    Attributes:
        op: the operation.
        refs: the grant references still in use.
    """

    def __init__(self, op: str, refs: Sequence[int], detail: str = "") -> None:
        self.op = op
        self.refs = list(refs)
        self.detail = detail
        text = f"{op}: grant ref(s) {self.refs} still in use by the remote domain"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class GrantTableFull(XenError):
    """Not enough free grant references (the table is at max_grant_frames)."""

    def __init__(self, op: str, wanted: int, free: int) -> None:
        self.op = op
        self.wanted = wanted
        self.free = free
        super().__init__(
            f"{op}: grant table full: wanted {wanted} reference(s), {free} free "
            "and the table cannot grow past max_grant_frames"
        )


class GrantTableTimeout(GrantTableFull, TimeoutError):
    """A wait for free grant references (``get(timeout=)``, ``get_n(timeout=)``
    and their asyncio twins) timed out: the table stayed full.

    A :class:`GrantTableFull` (as documented before) and a :class:`TimeoutError`.
    """
