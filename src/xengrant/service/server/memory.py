"""``HYPERVISOR_memory_op`` as service messages (populate, decrease, add to
physmap, translate) and the memory files a domain process may reach
(:mod:`xengrant.service.backing`).
"""

from __future__ import annotations

import errno

from ...abi.memory import XENMAPIDX_grant_table_status
from .. import protocol as p
from .base import ServerBase
from .connection import Connection


class MemoryOps(ServerBase):
    """POPULATE, DECREASE, ADD_TO_PHYSMAP, TRANSLATE; REACH and the grant files."""

    def _populate(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        gfns = p.unpack_i64s(payload, "POPULATE")
        done = self.hv.populate_physmap(domid, gfns)
        return self._ok(p.U32.pack(len(done)) + p.pack_i64s(done) + self._delta(domid, done))

    def _decrease(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        gfns = p.unpack_i64s(payload, "DECREASE")
        n = self.hv.decrease_reservation(domid, gfns)
        return self._ok(p.U32.pack(n) + self._delta(domid, gfns[: n + 1]))

    def _add_to_physmap(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        space, idx, gpfn = p.unpack_exact(p.ADD_TO_PHYSMAP_REQ, payload, "ADD_TO_PHYSMAP")
        g = self.hv.domains[domid].gt
        # the frame's previous gfn loses it (gnttab_map_frame moves, not copies)
        frames = g.status_gfn if idx & XENMAPIDX_grant_table_status else g.shared_gfn
        i = idx & ~XENMAPIDX_grant_table_status
        touched = [gpfn] + ([frames[i]] if 0 <= i < len(frames) else [])
        rc = self.hv.add_to_physmap(domid, space, idx, gpfn)
        return self._ok(p.I32.pack(rc) + self._delta(domid, touched))

    def _translate(self, conn: Connection, payload: bytes) -> bytes:
        domid = self._dom(conn)
        if len(payload) < 4:
            raise p.ProtocolError(errno.EBADMSG, "TRANSLATE: short")
        (writable,) = p.U32.unpack_from(payload)
        gfns = p.unpack_i64s(payload[4:], "TRANSLATE")
        mfns = self.hv.translate(domid, gfns, bool(writable))
        p2m = self.hv.domains[domid].p2m
        body = b"".join(p.TRANSLATE_ENTRY.pack(m, p2m[g][1]) for g, m in zip(gfns, mfns))
        return self._ok(body + self._delta(domid, gfns))

    def _reach(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_REACH``: the files backing gfns of the caller (Backing.reach)."""
        if len(payload) < 4:
            raise p.ProtocolError(errno.EBADMSG, "REACH: short")
        (writable,) = p.U32.unpack_from(payload)
        gfns = p.unpack_i64s(payload[4:], "REACH")
        d = self.hv.domains[self._dom(conn)]
        return self._ok(p.U32.pack(self.backing.reach(self.hv.domains, d, gfns, bool(writable))))

    def _grant_prepare(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_GRANT_PREPARE``: pages about to be granted get files of their own."""
        if len(payload) < 4:
            raise p.ProtocolError(errno.EBADMSG, "GRANT_PREPARE: short")
        (grantee,) = p.U32.unpack_from(payload)
        gfns = p.unpack_i64s(payload[4:], "GRANT_PREPARE")
        d = self.hv.domains[self._dom(conn)]
        return self._ok(p.U32.pack(self.backing.prepare_grant(d, gfns, grantee)))

    def _grant_end(self, conn: Connection, payload: bytes) -> bytes:
        """``MSG_GRANT_END``: pages whose grant ended move off files a peer holds."""
        gfns = p.unpack_i64s(payload, "GRANT_END")
        d = self.hv.domains[self._dom(conn)]
        return self._ok(p.U32.pack(self.backing.end_grant(d, gfns)))

    def _memory_overflow(self, domid: int) -> None:
        """A domain's memory socket is full (it stopped reading): drop its connection."""
        conn = self.bound.get(domid)
        if conn is not None:
            self.log(f"{conn!r}: memory socket full, dropping it")
            self._schedule_close(conn)
