"""A domain's grant table as the hypervisor keeps it.

The shared entries live in machine frames that the guest maps and writes in
place (``shared_raw`` in grant_table.c); the hypervisor's private state is the
active entries (``struct active_grant_entry``, here only those pinned) and, for
v2, the status frames.

Limits and their precedents:

- ``DEFAULT_MAX_GRANT_FRAMES = 64``: Xen's ``opt_max_grant_frames``
  (the toolstack's -1 means this default).
- The table starts with ``INITIAL_NR_GRANT_FRAMES = 1`` frame and grows on
  ``setup_table`` or ``XENMEM_add_to_physmap`` (``gnttab_grow_table``).
- v1 entries are 8 bytes (512 per frame), v2 entries 16 (256 per frame); one
  status frame holds 2048 ``grant_status_t`` (``grant_to_status_frames``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi.grant_table import (
    GRANT_PER_PAGE_V1,
    GRANT_PER_PAGE_V2,
    GRANT_STATUS_PER_PAGE,
)

DEFAULT_MAX_GRANT_FRAMES = 64
INITIAL_NR_GRANT_FRAMES = 1

# Pin counters of an active entry (grant_table.c, GNTPIN_*): four 8-bit
# counts of host/device, read/write mappings packed in one word.
GNTPIN_hstw_shift = 0
GNTPIN_hstw_inc = 1 << GNTPIN_hstw_shift
GNTPIN_hstw_mask = 0xFF << GNTPIN_hstw_shift
GNTPIN_hstr_shift = 8
GNTPIN_hstr_inc = 1 << GNTPIN_hstr_shift
GNTPIN_hstr_mask = 0xFF << GNTPIN_hstr_shift
GNTPIN_devw_shift = 16
GNTPIN_devw_inc = 1 << GNTPIN_devw_shift
GNTPIN_devw_mask = 0xFF << GNTPIN_devw_shift
GNTPIN_devr_shift = 24
GNTPIN_devr_inc = 1 << GNTPIN_devr_shift
GNTPIN_devr_mask = 0xFF << GNTPIN_devr_shift
GNTPIN_cntr_width = 8
GNTPIN_WRITE_MASK = GNTPIN_hstw_mask | GNTPIN_devw_mask


def GNTPIN_incr2oflow_mask(pin_incr: int) -> int:
    """The top bit of each counter ``pin_incr`` is about to increment.

    Xen 4.17's ``GNTPIN_incr2oflow_mask`` (since 4.15, commit 8cec5d065c):
    ``(x) << (GNTPIN_cntr_width - 1)``.  A pin is refused ("risk of counter
    overflow") only when a counter *it would increment* has its top bit set,
    so 128 writable host pins still allow a read-only map, a device map and
    a copy from the grant (before 4.15 any full counter, ``pin & 0x80808080``,
    refused them all).
    """
    return pin_incr << (GNTPIN_cntr_width - 1)


if TYPE_CHECKING:

    class ActiveGrant:
        """``struct active_grant_entry``: exists while the grant is pinned.

        A C struct (``xengrant._cext.ActiveGrant``) so that the C map/unmap
        runs fill it in place; this is its interface for type checkers.

        Args and attributes:
            pin: the four packed pin counters (0 when made).
            domid: the domain the grant is pinned for.
            mfn: the machine frame granted.
            start: first byte usable (sub-page grants).
            length: bytes usable from ``start``.
            is_sub_page: a v2 sub-page grant (never mappable).
        """

        pin: int
        domid: int
        mfn: int
        start: int
        length: int
        is_sub_page: bool

        def __init__(
            self, domid: int, mfn: int, start: int, length: int, is_sub_page: bool
        ) -> None: ...

else:
    from .._cext import ActiveGrant


def grant_to_status_frames(grant_frames: int) -> int:
    """Status frames a v2 table of ``grant_frames`` frames needs."""
    return (grant_frames * GRANT_PER_PAGE_V2 + GRANT_STATUS_PER_PAGE - 1) // GRANT_STATUS_PER_PAGE


class GrantTableState:
    """One domain's grant table.

    Args:
        max_grant_frames: how far the table may grow (``max_grant_frames``).

    Attributes:
        version: 1 or 2 (``gt_version``).
        shared: machine frames of the shared entries, in table order.
        status: machine frames of the v2 status words.
        shared_gfn: where each shared frame sits in the owner's physmap (or -1).
        status_gfn: the same for status frames.
        active: ref -> active entry, for pinned refs only.
    """

    def __init__(self, max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES) -> None:
        self.max_grant_frames = max_grant_frames
        self.version = 1
        self.shared: list[int] = []
        self.status: list[int] = []
        self.shared_gfn: list[int] = []
        self.status_gfn: list[int] = []
        self.active: dict[int, ActiveGrant] = {}

    @property
    def nr_grant_frames(self) -> int:
        """Frames of shared entries (``nr_grant_frames``)."""
        return len(self.shared)

    @property
    def per_frame(self) -> int:
        """Entries per frame for the current version."""
        return GRANT_PER_PAGE_V1 if self.version == 1 else GRANT_PER_PAGE_V2

    @property
    def entry_size(self) -> int:
        """Bytes per shared entry for the current version."""
        return 8 if self.version == 1 else 16

    @property
    def nr_grant_entries(self) -> int:
        """Entries the table holds now (``nr_grant_entries``)."""
        return len(self.shared) * (GRANT_PER_PAGE_V1 if self.version == 1 else GRANT_PER_PAGE_V2)

    def entry_offset(self, ref: int) -> int:
        """Machine-buffer offset of entry ``ref`` (must be < nr_grant_entries)."""
        # Hot (several calls per map/unmap/copy op): no nested property calls.
        if self.version == 1:
            return self.shared[ref // GRANT_PER_PAGE_V1] * 4096 + (ref % GRANT_PER_PAGE_V1) * 8
        return self.shared[ref // GRANT_PER_PAGE_V2] * 4096 + (ref % GRANT_PER_PAGE_V2) * 16

    def status_offset(self, ref: int) -> int:
        """Machine-buffer offset of the v2 status word of ``ref``."""
        return self.status[ref // GRANT_STATUS_PER_PAGE] * 4096 + (ref % GRANT_STATUS_PER_PAGE) * 2

    def read_entry(self, mem: memoryview, ref: int) -> tuple[int, int, int]:
        """Decode entry ``ref`` from machine memory (not atomically: for dumps and copies).

        Returns:
            ``(flags, domid, frame)``; under v2 the flags include the status
            word's GTF_reading/GTF_writing and the frame is ``full_page.frame``.
        """
        off = self.entry_offset(ref)
        flags = int.from_bytes(mem[off : off + 2], "little")
        domid = int.from_bytes(mem[off + 2 : off + 4], "little")
        if self.version == 1:
            return flags, domid, int.from_bytes(mem[off + 4 : off + 8], "little")
        soff = self.status_offset(ref)
        flags |= int.from_bytes(mem[soff : soff + 2], "little")
        return flags, domid, int.from_bytes(mem[off + 8 : off + 16], "little")

    def pinned_beyond_reserved(self, reserved: int) -> bool:
        """True if any ref >= ``reserved`` is pinned (blocks set_version)."""
        return any(ref >= reserved and act.pin for ref, act in self.active.items())
