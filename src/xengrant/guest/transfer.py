"""Page transfers (``GNTTABOP_transfer``, Linux ``gnttab_grant_foreign_transfer``
and ``gnttab_end_foreign_transfer_ref``): offering to accept a page, and giving one.
"""

from __future__ import annotations

import struct
import time

from .._cext import cmpxchg16, load16, load32, store16
from ..abi import grant_table as gt
from ..errors import GrantError, GrantTableFull
from ..hypercall import check_rc
from .table_base import GrantTableBase

_TRANSFER = struct.Struct("<QH2xIh6x")


class Transfer(GrantTableBase):
    """Page transfers of a :class:`~xengrant.guest.gnttab.GrantTable`."""

    def grant_transfer(self, domid: int, gfn: int = 0) -> int:
        """Offer to accept a page from ``domid`` (Linux ``gnttab_grant_foreign_transfer``).

        Args:
            domid: the domain that may give a page.
            gfn: for a translated guest, where the page will appear.

        Returns:
            The ref to hand to the giver.
        """
        ref = self.get_nonblock()
        if ref is None:
            raise GrantTableFull("grant_transfer", 1, 0)
        view, off = self._locate(ref)
        self._introduce_entry(view, off, domid, gfn, gt.GTF_accept_transfer)
        return ref

    def end_transfer(self, ref: int, release_ref: bool = True) -> int:
        """Close an accept-transfer entry (Linux ``gnttab_end_foreign_transfer_ref``).

        Returns:
            The frame received (PV: machine frame; translated: the gfn), or
            0 if nothing was transferred.
        """
        view, off = self._locate(ref)
        flags = load16(view, off)
        while not flags & gt.GTF_transfer_committed:
            prev = cmpxchg16(view, off, flags, 0)
            if prev == flags:
                if release_ref:
                    self.put(ref)
                return 0
            flags = prev
        # Committed: Xen sets completed right after writing the frame.
        # mutation: equivalent — in process the transfer hypercall sets both bits before
        # the guest runs again; this wait matters against a service in another process.
        while not load16(view, off) & gt.GTF_transfer_completed:
            time.sleep(0)
        if self.version == 1:
            frame = int(load32(view, off + 4))
        else:
            mv = memoryview(view)
            frame = int.from_bytes(mv[off + 8 : off + 16], "little")
            mv.release()
        store16(view, off, 0)
        if release_ref:
            self.put(ref)
        return frame

    def transfer(self, gfn: int, domid: int, ref: int) -> None:
        """Give page ``gfn`` to ``domid`` through its accept-transfer ``ref``.

        Raises:
            GrantError: the op's status (a translated caller gets
                ``GNTST_general_error`` and keeps the page).
        """
        buf = bytearray(_TRANSFER.size)
        # mutation: equivalent — the 0 is the op's status, an output
        _TRANSFER.pack_into(buf, 0, gfn, domid, ref, 0)
        check_rc("transfer", self._hc.grant_table_op(gt.GNTTABOP_transfer, memoryview(buf), 1))
        st = _TRANSFER.unpack_from(buf)[3]
        if st != gt.GNTST_okay:
            raise GrantError("transfer", st, f"page {gfn:#x} to d{domid} ref {ref}")
