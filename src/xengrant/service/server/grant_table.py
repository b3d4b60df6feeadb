"""``HYPERVISOR_grant_table_op`` as a service message (``MSG_GNTTAB_OP``).

The ops run on the receive buffer in place; the reply carries their OUT
fields, the caller's p2m entries they changed and the debug reasons.  A
batch over ``limits.preempt_ops`` ops runs in chunks, preemptible as
``do_grant_table_op``'s continuation (:mod:`.preempt`).
"""

from __future__ import annotations

import ctypes
import errno
import struct
import sys
from collections.abc import Sequence
from itertools import repeat
from operator import rshift

from ...abi import grant_table as gt
from .. import protocol as p
from .base import ServerBase
from .connection import Connection, Payload
from .unmap_notify import Notify

_LITTLE = sys.byteorder == "little"
_NO_REASONS = p.pack_reasons([])
_NO_DELTA = p.pack_p2m([], [])


#: Where each batched op keeps the addresses whose gfns it maps or unmaps:
#: ``(op size, offsets of u64 addresses)``; gnttab_transfer's ``mfn`` is a gfn.
_ADDR_FIELDS = {
    gt.GNTTABOP_map_grant_ref: (32, (0,)),
    gt.GNTTABOP_unmap_grant_ref: (24, (0,)),
    gt.GNTTABOP_unmap_and_replace: (24, (0, 8)),
    gt.GNTTABOP_transfer: (24, (0,)),
}
_ADDR_SHIFT = {gt.GNTTABOP_transfer: 0}
#: Ops that never change the caller's p2m.
_NO_P2M = frozenset(
    {
        gt.GNTTABOP_copy,
        gt.GNTTABOP_query_size,
        gt.GNTTABOP_get_version,
        gt.GNTTABOP_get_status_frames,
        gt.GNTTABOP_swap_grant_ref,
        gt.GNTTABOP_dump_table,
        gt.GNTTABOP_cache_flush,
    }
)
#: Batches Xen preempts with a continuation (``do_grant_table_op``).
_PREEMPTIBLE = frozenset({
    gt.GNTTABOP_map_grant_ref, gt.GNTTABOP_unmap_grant_ref, gt.GNTTABOP_unmap_and_replace,
    gt.GNTTABOP_copy, gt.GNTTABOP_transfer, gt.GNTTABOP_swap_grant_ref,
})
_OP_SIZE = {cmd: ctypes.sizeof(st) for cmd, st in gt.GNTTABOP_STRUCTS.items()}
#: Ops that may change any gfn of the caller (its table frames): the whole p2m goes back.
_ANY_P2M = frozenset({gt.GNTTABOP_setup_table, gt.GNTTABOP_set_version})
_U64 = struct.Struct("<Q")
#: ops whose one op changes at most the gfn of its host_addr (u64 at offset 0)
_ONE_GFN = (gt.GNTTABOP_map_grant_ref, gt.GNTTABOP_unmap_grant_ref)
#: A GNTTAB_OP reply's header and head: length, type, flags, seq; status, the
#: hypercall's rc, the length of the ops.
_GNTTAB_REPLY = struct.Struct("<IHHIiiI")
#: A p2m delta of one entry: count, gfn, mfn, type (:func:`protocol.pack_p2m`).
_ONE_DELTA = struct.Struct("<Iqqq")




class GrantTableOps(ServerBase):
    """GNTTAB_OP: the hypercall, its reply, a preemptible batch."""

    def _gnttab_op(self, conn: Connection, payload: Payload) -> bytes:
        """GNTTAB_OP as a table handler: the reply's payload (``_request`` takes
        the hot path, :meth:`_gnttab_reply`, whenever it can)."""
        return self._gnttab_reply(self._dom(conn), payload, 0)[p.HEADER_SIZE :]

    def _gnttab_reply(self, domid: int, payload: Payload, seq: int, first_op: int = 0) -> bytes:
        """``HYPERVISOR_grant_table_op``: the whole reply message.

        ``payload`` is bytes or a writable view of the receive buffer: then
        the ops are the hypercall's ``uop`` in place, and its OUT fields are
        copied once, into the reply.  ``first_op`` > 0 (map or unmap only):
        the ops before it already ran (:meth:`_serve_fast`); the hypercall
        goes on from there, and the reply covers every op.

        Raises:
            ProtocolError: EBADMSG, no room for the command and count.
        """
        if len(payload) < p.GNTTAB_REQ.size:
            raise p.ProtocolError(errno.EBADMSG, "GNTTAB_OP: short header")
        cmd, count = p.GNTTAB_REQ.unpack_from(payload)
        if type(payload) is memoryview and not payload.readonly:
            uop = payload[p.GNTTAB_REQ.size :]
        else:
            uop = memoryview(bytearray(payload[p.GNTTAB_REQ.size :]))
        ops, left = uop, count
        if first_op:  # do_grant_table_op goes on with the ops left
            ops = uop[first_op * _ADDR_FIELDS[cmd][0] :]
            left = count - first_op
        notes = self.notifies.get(domid)
        fired: list[tuple[int, Notify]] = []
        if notes and cmd in (gt.GNTTABOP_unmap_grant_ref, gt.GNTTABOP_unmap_and_replace):
            fired = self._notify_before_unmap(domid, notes, ops, left)
        if count == 1 and cmd in _ONE_GFN and len(uop) >= 24:
            touched: list[int] | None = [_U64.unpack_from(uop)[0] >> 12]
        else:
            touched = _gfns_touched(cmd, uop, count)
        xen = self.xen
        before = xen.log_count
        if left > self.limits.preempt_ops and cmd in _PREEMPTIBLE:
            rc = self._preemptible_op(domid, cmd, ops, left)
        else:
            rc = self.hv.grant_table_op(domid, cmd, ops, left)
        tail = _NO_REASONS
        if xen.log_count != before:
            fresh = xen.debug_log[-min(xen.log_count - before, len(xen.debug_log)) :]
            tail = p.pack_reasons([r for dd, _op, _st, r in fresh if dd == domid])
        if fired:
            self._notify_after_unmap(domid, notes or {}, ops, fired)
        if touched is not None and len(touched) == 1:
            d = self.hv.domains.get(domid)
            gfn = touched[0]
            mfn, p2mt = p.P2M_GONE if d is None else d.p2m.get(gfn, p.P2M_GONE)
            delta = _ONE_DELTA.pack(1, gfn, mfn, p2mt)
        else:
            delta = self._delta(domid, touched)
        if cmd not in gt.GNTTABOP_STRUCTS:  # an unknown command: -ENOSYS and nothing else
            uop = uop[:0]
        size = len(uop)
        return b"".join((
            _GNTTAB_REPLY.pack(12 + size + len(delta) + len(tail), p.MSG_GNTTAB_OP, p.F_REPLY,
                               seq, 0, rc, size),
            uop, delta, tail,
        ))

    def _preemptible_op(self, domid: int, cmd: int, ops: memoryview, count: int) -> int:
        """A long batch, ``limits.preempt_ops`` ops at a time, the lock given up between.

        As ``do_grant_table_op``: between two ops it checks
        ``hypercall_preempt_check()`` and, if others wait, returns to the
        guest with a continuation for the ops left (xen/common/grant_table.c).
        What others do meanwhile is seen by the ops after, as in Xen.
        """
        size = _OP_SIZE[cmd]
        if len(ops) < size * count:  # -EFAULT, as the whole call would
            return self.hv.grant_table_op(domid, cmd, ops, count)
        step = self.limits.preempt_ops
        self.counters["preempted_batches"] += 1
        done = 0
        while True:
            k = min(step, count - done)
            rc = self.hv.grant_table_op(domid, cmd, ops[done * size : (done + k) * size], k)
            done += k
            if rc < 0 or done >= count:
                return rc
            self._preempt("batch")

    def _delta(self, domid: int, gfns: Sequence[int] | None) -> bytes:
        """The caller's p2m entries for ``gfns`` as they are now (None: all of them).

        Each handler names the gfns its call can change, so the domain's p2m
        stays a plain dict the core (and its C fast paths) can use as is.
        The entries are looked up and packed by C loops (``map``, ``array``).
        """
        d = self.hv.domains.get(domid)
        if d is None or (gfns is not None and not gfns):
            return _NO_DELTA
        p2m = d.p2m
        if gfns is None:
            return p.pack_p2m(list(p2m), list(p2m.values()), full=True)
        return p.pack_p2m(gfns, list(map(p2m.get, gfns, repeat(p.P2M_GONE))))


def _gfns_touched(cmd: int, uop: memoryview, count: int) -> list[int] | None:
    """The caller's gfns a GNTTABOP can change; None when any may (setup_table,
    set_version, unknown commands): the reply then carries the whole p2m.

    The addresses are read as a strided ``u64`` view and shifted by a C loop.
    """
    if cmd in _NO_P2M or (cmd not in _ANY_P2M and cmd not in _ADDR_FIELDS):
        return []  # an unknown command changes nothing: -ENOSYS, no p2m
    fields = _ADDR_FIELDS.get(cmd)
    if fields is None:
        return None
    size, offsets = fields
    shift = _ADDR_SHIFT.get(cmd, 12)
    n = min(max(count, 0), len(uop) // size)
    if n == 1:
        return [_U64.unpack_from(uop, off)[0] >> shift for off in offsets]
    if not n:
        return []
    if not _LITTLE:  # pragma: no cover - the ops are little-endian
        return [_U64.unpack_from(uop, i * size + off)[0] >> shift
                for i in range(n) for off in offsets]
    words = uop[: n * size].cast("Q")
    step = size // 8
    out: list[int] = []
    for off in offsets:
        column = words[off // 8 :: step]
        out += map(rshift, column, repeat(shift)) if shift else column.tolist()
    return out
