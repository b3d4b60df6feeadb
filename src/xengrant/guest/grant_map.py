"""Mapping foreign grants from a guest: batches of prepared ops (Zephyr
``gnttab_map_refs``/``gnttab_unmap_refs``, Linux ``gnttab_batch_copy``) and
gntdev-style all-or-nothing mappings (libxengnttab ``map_grant_refs``).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any, NoReturn

from ..abi import grant_table as gt
from ..errors import BatchError, GrantError
from ..hypercall import WritableBuffer, check_rc
from .domain import Domain
from .eagain import retry_eagain_gop
from .ops import MAP_OP, VECTOR, map_results, pack_map_ops, pack_unmap_ops, unmap_statuses
from .share import Mapping
from .table_base import GrantTableBase


def map_failure(
    domids: Sequence[int], refs: Sequence[int], statuses: list[int], reasons: str
) -> GrantError | BatchError:
    """What a map of ``refs`` that failed raises (gntdev's all-or-nothing batch).

    Args:
        domids, refs: the grants asked for.
        statuses: each op's GNTST code.
        reasons: Xen's debug reasons for the failed ops, joined.

    Returns:
        A :class:`GrantError` for one grant (with its domid, ref and reason),
        a :class:`BatchError` with every status for several.
    """
    if len(refs) == 1:
        why = f"d{domids[0]} ref {refs[0]}" + (f": {reasons}" if reasons else "")
        return GrantError("map_grant_ref", statuses[0], why)
    return BatchError("map_grant_refs", statuses, reasons)


def map_ops_at_holes(
    domain: Domain, domids: Sequence[int], refs: Sequence[int], writable: bool
) -> tuple[list[int], bytearray]:
    """Fresh holes for ``refs`` and the ``gnttab_map_grant_ref`` ops mapping them there.

    The first half of gntdev's ``gntdev_map_grant_pages``: the pages that will
    host the foreign frames (Zephyr's ``gnttab_get_pages``), then one op each.

    Returns:
        ``(gfns, ops)``: the holes, and the ops packed for GNTTABOP_map_grant_ref.

    Raises:
        ValueError: no grants, or a domid or ref that does not fit the op (the
            holes are given back).
    """
    if not refs:
        raise ValueError("map_grants: no grants to map")
    gfns = domain.get_pages(len(refs))
    flags = gt.GNTMAP_host_map | (0 if writable else gt.GNTMAP_readonly)
    try:
        return gfns, pack_map_ops(gfns, flags, refs, domids)
    except Exception:
        domain.put_pages(gfns)
        raise


class GrantMaps(GrantTableBase):
    """The mapping side of a :class:`~xengrant.guest.gnttab.GrantTable`."""

    def map_refs(self, ops: WritableBuffer, count: int | None = None) -> int:
        """Map a batch of prepared ``gnttab_map_grant_ref`` ops (Zephyr ``gnttab_map_refs``).

        Each op's ``status``, ``handle`` and ``dev_bus_addr`` are filled in;
        ``host_addr`` should be ``gfn << 12`` of a gfn from :meth:`Domain.get_pages`.
        An op answered ``GNTST_eagain`` (its frame paged out) is re-issued
        alone, 1 ms, 2 ms, ... up to 255 ms apart, then marked
        ``GNTST_bad_page`` (Linux ``gnttab_map_refs`` / ``gnttab_retry_eagain_gop``).

        Returns:
            The hypercall's return, 0: check each op's status.
        """
        rc = self.domain.grant_table_op(gt.GNTTABOP_map_grant_ref, ops, count)
        self._retry_eagain(gt.GNTTABOP_map_grant_ref, ops, count)
        return rc

    def _retry_eagain(self, cmd: int, ops: Any, count: int | None) -> None:
        """Re-issue each op of ``ops`` that answered ``GNTST_eagain``, alone
        (Linux ``gnttab_batch_map``/``gnttab_batch_copy``)."""
        if isinstance(ops, ctypes.Structure):
            ops = (type(ops) * 1).from_buffer(ops)
        n = len(ops) if count is None else count
        for i in range(n):
            op = ops[i]
            if op.status != gt.GNTST_eagain:
                continue

            def issue(op: Any = op) -> int:
                self.domain.grant_table_op(cmd, op, 1)
                return int(op.status)

            op.status = retry_eagain_gop(issue)

    def unmap_refs(self, ops: WritableBuffer, count: int | None = None) -> int:
        """Unmap a batch of ``gnttab_unmap_grant_ref`` ops (Zephyr ``gnttab_unmap_refs``)."""
        return self.domain.grant_table_op(gt.GNTTABOP_unmap_grant_ref, ops, count)

    def copy(self, ops: ctypes.Array[gt.gnttab_copy], count: int | None = None) -> list[int]:
        """A batch of ``gnttab_copy`` ops (Linux ``gnttab_batch_copy``).

        An op answered ``GNTST_eagain`` is retried as :meth:`map_refs` retries.

        Returns:
            Each op's status.
        """
        self.domain.grant_table_op(gt.GNTTABOP_copy, ops, count)
        self._retry_eagain(gt.GNTTABOP_copy, ops, count)
        n = len(ops) if count is None else count
        # mutation: equivalent — for the ops copy() takes (a ctypes array of
        # gnttab_copy, count within it) this test only chooses the strided read; the
        # per-op reads below give the same statuses.
        if (
            VECTOR
            and isinstance(ops, ctypes.Array)
            and ops._type_ is gt.gnttab_copy
            and 0 <= n <= len(ops)
        ):
            # struct gnttab_copy is 40 bytes, status an int16_t at offset 36:
            # one strided read instead of n ctypes attribute reads.
            with memoryview(ops) as raw, raw.cast("B") as b, b.cast("h") as h:
                return h[18 : 20 * n : 20].tolist()
        return [int(ops[i].status) for i in range(n)]

    def map_grants(self, grants: Sequence[tuple[int, int]], writable: bool = True) -> Mapping:
        """Map ``(domid, ref)`` grants contiguously (libxengnttab ``map_grant_refs``).

        All or nothing: if any page fails, the others are unmapped again.

        Raises:
            GrantError: a single grant failed (its GNTST code).
            BatchError: some of several failed (every entry's status).
            ValueError: no grants.
        """
        return self._map([d for d, _ in grants], [r for _, r in grants], writable)

    def map_domain_refs(self, domid: int, refs: Sequence[int], writable: bool = True) -> Mapping:
        """:meth:`map_grants` of several refs of one domain (``map_domain_grant_refs``)."""
        return self._map([domid] * len(refs), list(refs), writable)

    def _map(self, domids: list[int], refs: list[int], writable: bool) -> Mapping:
        """:meth:`map_grants` with the domids and refs apart."""
        domain = self.domain
        gfns, buf = map_ops_at_holes(domain, domids, refs, writable)
        n = len(gfns)
        rc = self._hc.grant_table_op(gt.GNTTABOP_map_grant_ref, memoryview(buf), n)
        if rc < 0:
            domain.put_pages(gfns)
            check_rc("map_grant_ref", rc)
        statuses, handles = map_results(buf, n)
        if gt.GNTST_eagain in statuses:
            statuses, handles = self._retry_eagain_packed(buf, n, statuses)
        if any(statuses):
            self._map_failed(domids, refs, gfns, statuses, handles)
        view = self._hc.map_gfns(gfns, writable)
        return Mapping(
            self,
            domids,
            refs,
            writable,
            view,
            handles,
            resource=gfns,
        )

    def _retry_eagain_packed(
        self, buf: bytearray, n: int, statuses: list[int]
    ) -> tuple[list[int], list[int]]:
        """gntdev's map (Linux ``gnttab_map_refs``): re-issue each packed op that
        answered ``GNTST_eagain``; a retry refused as a whole counts as bad_page.

        Returns:
            The statuses and handles after the retries.
        """
        size = MAP_OP.size
        for i, st in enumerate(statuses):
            if st != gt.GNTST_eagain:
                continue
            one = memoryview(buf)[i * size : (i + 1) * size]

            def issue(one: memoryview = one) -> int:
                if self._hc.grant_table_op(gt.GNTTABOP_map_grant_ref, one, 1) < 0:
                    return gt.GNTST_bad_page
                return int(MAP_OP.unpack_from(one)[4])

            final = retry_eagain_gop(issue)
            struct.pack_into("<h", buf, i * size + 18, final)
        return map_results(buf, n)

    def _map_failed(
        self,
        domids: Sequence[int],
        refs: Sequence[int],
        gfns: list[int],
        statuses: list[int],
        handles: list[int],
    ) -> NoReturn:
        """All or nothing (gntdev_map_grant_pages): unmap the ops that did map,
        give the holes back, raise.

        Raises:
            GrantError: one grant (its GNTST code and Xen's debug reason).
            BatchError: several, some failed (each entry's status).
            HypercallError: the unmap of the ones that did map was refused
                (the holes are kept then: they may still hold pages).
        """
        reasons = "; ".join(getattr(self._hc, "last_reasons", ()))
        ok = [(g, h) for g, h, s in zip(gfns, handles, statuses) if s == gt.GNTST_okay]
        self._unmap_handles([g for g, _ in ok], [h for _, h in ok])
        self.domain.put_pages(gfns)
        raise map_failure(domids, refs, statuses, reasons)

    def _unmap_handles(self, gfns: Sequence[int], handles: Sequence[int]) -> list[int]:
        n = len(handles)
        if not n:
            # mutation: equivalent — only _map_failed gets here with no handle, and it
            # ignores the answer (a Mapping always has handles)
            return []
        buf = pack_unmap_ops(gfns, handles)
        check_rc(
            "unmap_grant_ref",
            self._hc.grant_table_op(gt.GNTTABOP_unmap_grant_ref, memoryview(buf), n),
        )
        return unmap_statuses(buf, n)

    def _unmap(self, mapping: Mapping) -> None:
        mapping._release_memory()
        gfns: list[int] = mapping.resource
        assert mapping.handles is not None
        statuses = self._unmap_handles(gfns, mapping.handles)
        mapping.released = True
        self.domain.put_pages(gfns)
        if any(statuses):
            raise BatchError("unmap_grant_ref", statuses)
