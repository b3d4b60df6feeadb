"""What the parts of a guest's grant table share (:class:`GrantTableBase`).

:class:`~xengrant.guest.gnttab.GrantTable` is made of small parts (mixins), one
concept each: the table and its entries (:mod:`.gnttab`), the free list
(:mod:`.free_list`), deferred releases (:mod:`.deferred`), sharing pages
(:mod:`.sharing`), mapping foreign grants (:mod:`.grant_map`) and page
transfers (:mod:`.transfer`).  They all work on the state declared here, under
:attr:`GrantTableBase._lock`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..abi import grant_table as gt
from .domain import Domain

if TYPE_CHECKING:
    from .free_list import FreeCallback
    from .gnttab import GrantEntry
    from .share import Share

#: free-list states of a ref
_FREE, _USED, _RESERVED = 0, 1, 2
_INUSE = gt.GTF_reading | gt.GTF_writing


def decode_flags(flags: int) -> str:
    """Readable GTF flags, e.g. ``permit_access|readonly|reading``."""
    kind = {
        gt.GTF_invalid: "invalid",
        gt.GTF_permit_access: "permit_access",
        gt.GTF_accept_transfer: "accept_transfer",
        gt.GTF_transitive: "transitive",
    }[flags & gt.GTF_type_mask]
    names = [kind]
    if (flags & gt.GTF_type_mask) == gt.GTF_accept_transfer:
        bits = [(gt.GTF_transfer_committed, "committed"), (gt.GTF_transfer_completed, "completed")]
    else:
        bits = [
            (gt.GTF_readonly, "readonly"),
            (gt.GTF_reading, "reading"),
            (gt.GTF_writing, "writing"),
            (gt.GTF_PWT, "PWT"),
            (gt.GTF_PCD, "PCD"),
            (gt.GTF_PAT, "PAT"),
            (gt.GTF_sub_page, "sub_page"),
        ]
    names += [n for bit, n in bits if flags & bit]
    return "|".join(names)


class GrantTableBase:
    """A grant table's state (set up by :class:`~xengrant.guest.gnttab.GrantTable`)
    and the calls its parts make into each other (declared for the type checker)."""

    domain: Domain
    domid: int
    _hc: Any
    #: held while the free list, the deferred releases or the frames change
    _lock: threading.Condition
    _async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]
    #: threads blocked in get_n's wait (under ``_lock``): _wake skips notify_all at 0
    _sync_waiters: int
    _frames: list[Any]
    _status_frames: list[Any]
    #: each ref's free-list state (_FREE, _USED, _RESERVED)
    _state: bytearray
    _free: list[int]
    _deferred: list[tuple[int, bool, Any]]
    _orphans: list[Callable[[], bool]]
    _kept: dict[int, int]
    _reaper: threading.Timer | None
    _reaper_stopped: bool
    _free_callbacks: list[FreeCallback]
    version: int
    max_nr_frames: int

    @property
    def per_frame(self) -> int:
        """Entries per frame for the version in force."""
        return gt.GRANT_PER_PAGE_V1 if self.version == 1 else gt.GRANT_PER_PAGE_V2

    @property
    def nr_entries(self) -> int:
        """Entries in the mapped frames."""
        return len(self._frames) * self.per_frame

    if TYPE_CHECKING:  # implemented by the parts (see GrantTable's bases)

        def _map_frames(self, upto: int) -> bool:
            raise NotImplementedError

        def _locate(self, ref: int) -> tuple[Any, int]:
            raise NotImplementedError

        def _entry_flags(self, ref: int) -> int:
            raise NotImplementedError

        def entry(self, ref: int) -> GrantEntry:
            raise NotImplementedError

        def grant_access(self, ref: int, domid: int, gfn: int, writable: bool = True) -> None:
            raise NotImplementedError

        def _introduce_entry(self, view: Any, off: int, domid: int, frame: int, flags: int) -> None:
            raise NotImplementedError

        def try_end_access(self, ref: int, release_ref: bool = False) -> None:
            raise NotImplementedError

        async def end_access_async(
            self, ref: int, release_ref: bool = False, timeout: float | None = None
        ) -> None:
            raise NotImplementedError

        def get_n_nonblock(self, count: int) -> list[int]:
            raise NotImplementedError

        def _write_entry(
            self, ref: int, domid: int, gfn: int, writable: bool, check: bool = False
        ) -> None:
            raise NotImplementedError

        def end_access(
            self, ref: int, release_ref: bool = False, timeout: float | None = None
        ) -> None:
            raise NotImplementedError

        def _end_run(self, refs: list[int], start: int) -> int:
            raise NotImplementedError

        def _abandon_share(self, share: Share) -> None:
            raise NotImplementedError

        def get_nonblock(self) -> int | None:
            raise NotImplementedError

        def put(self, ref: int) -> None:
            raise NotImplementedError

        def put_n(self, refs: Sequence[int]) -> None:
            raise NotImplementedError

        def num_free_grants(self) -> int:
            raise NotImplementedError

        @property
        def deferred(self) -> int:
            raise NotImplementedError

        def _reap_deferred(self) -> None:
            raise NotImplementedError

        def _arm_reaper(self) -> None:
            raise NotImplementedError

        def _orphan(self, retry: Callable[[], bool]) -> None:
            raise NotImplementedError

        def _defer_all(self, refs: Sequence[int]) -> None:
            raise NotImplementedError
