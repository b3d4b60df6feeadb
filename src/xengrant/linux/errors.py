"""What Linux's Xen drivers report, as the exceptions the emulator raises.

The emulator raises :class:`~xengrant.errors.GrantError` (one op),
:class:`~xengrant.errors.BatchError` (several), :class:`~xengrant.errors.GrantTableFull`,
``MemoryError`` and ``ValueError``.  On real Xen the same conditions arrive as
an errno from an ``ioctl`` or ``mmap`` of ``/dev/xen/gntalloc`` or
``/dev/xen/gntdev``; the subclasses here are those same types (so ``except
GrantError`` works on both) and also carry:

- ``errno``: the positive errno Linux returned (``EINVAL`` ...);
- ``linux``: what Linux reported, e.g. ``"mmap of /dev/xen/gntdev: EINVAL"``;
- ``__cause__``: the original ``OSError``.

The mapping (docs/real-xen.md has the table):

===========================  ==========================  ===================================
driver call                  errno                       raised
===========================  ==========================  ===================================
gntalloc ALLOC_GREF          ENOSPC (``limit`` reached,  :class:`LinuxGrantTableFull`
                             or no free grant refs)
gntalloc ALLOC_GREF, mmap    ENOMEM                      ``MemoryError``
gntdev mmap (the real map)   EINVAL (any failed page)    :class:`LinuxGrantError` /
                                                         :class:`LinuxBatchError` with
                                                         statuses found per grant
gntdev MAP_GRANT_REF         EINVAL (count > limit)      :class:`LinuxGrantError`
                                                         (``GNTST_general_error``)
anything else                errno                       :class:`LinuxGrantError`
                                                         (``GNTST_general_error``)
===========================  ==========================  ===================================
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence

from ..abi import grant_table as gt
from ..errors import BatchError, GrantError, GrantTableFull


def describe(call: str, err: int) -> str:
    """``"<call>: EINVAL (Invalid argument)"``: what Linux reported."""
    return f"{call}: {_errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


class LinuxGrantError(GrantError):
    """A :class:`~xengrant.errors.GrantError` from a Linux Xen driver.

    Attributes:
        errno: the errno Linux returned.
        linux: what Linux reported (call and errno name).
    """

    def __init__(self, op: str, status: int, err: int, linux: str, detail: str = "") -> None:
        self.errno = err
        self.linux = linux
        super().__init__(op, status, f"Linux: {linux}" + (f"; {detail}" if detail else ""))


class LinuxBatchError(BatchError):
    """A :class:`~xengrant.errors.BatchError` from a Linux Xen driver.

    Attributes:
        errno: the errno Linux returned.
        linux: what Linux reported.
    """

    def __init__(
        self, op: str, statuses: Sequence[int], err: int, linux: str, detail: str = ""
    ) -> None:
        self.errno = err
        self.linux = linux
        super().__init__(op, statuses, f"Linux: {linux}" + (f"; {detail}" if detail else ""))


class LinuxGrantTableFull(GrantTableFull):
    """gntalloc could not allocate: its ``limit`` is reached or the kernel has no free refs.

    Attributes:
        errno: ``ENOSPC``.
        linux: what Linux reported.
        limit: the gntalloc module's ``limit`` parameter if readable, else None.
    """

    def __init__(self, op: str, wanted: int, err: int, linux: str, limit: int | None) -> None:
        self.errno = err
        self.linux = linux
        self.limit = limit
        super().__init__(op, wanted, 0)
        lim = f" (gntalloc limit={limit})" if limit is not None else ""
        self.args = (f"{self.args[0]}; Linux: {linux}{lim}",)


def from_oserror(op: str, call: str, exc: OSError) -> Exception:
    """The exception for an unexpected driver errno (MemoryError for ENOMEM)."""
    err = exc.errno or _errno.EIO
    linux = describe(call, err)
    if err == _errno.ENOMEM:
        return MemoryError(f"{op}: Linux: {linux}")
    return LinuxGrantError(op, gt.GNTST_general_error, err, linux)
