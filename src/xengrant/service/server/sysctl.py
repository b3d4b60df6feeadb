"""The toolstack's view (dom0's only): ``STATS`` (as ``XEN_SYSCTL_*`` and
xentop read it) and Xen's debug keys (``keyhandler.c``: 'g', 'G', 'e', plus
'x' for the xenstore tree), each reply bounded by the protocol's limit.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from ...debugkeys import dump_all
from ...errors import HypercallError
from .. import protocol as p
from ..evtchn import ECS_INTERDOMAIN, ECS_UNBOUND
from ..ring import INDICES as RING_INDICES
from .base import ServerBase
from .connection import Connection


class Sysctl(ServerBase):
    """STATS, debug keys and the snapshot behind them."""

    def snapshot(self) -> dict[str, Any]:
        """Counts and tables, JSON-ready (what STATS answers)."""
        doms: dict[str, Any] = {}
        for d in self.hv.iter_domains():
            doms[str(d.domid)] = {
                "pv": d.pv,
                "dying": d.is_dying,
                "privileged": d.privileged,
                "attached": d.domid in self.bound,
                "tot_pages": d.tot_pages,
                "p2m": len(d.p2m),
                "nr_grant_frames": d.gt.nr_grant_frames,
                "version": d.gt.version,
                "active": {str(r): a.pin for r, a in sorted(d.gt.active.items())},
                "maptrack_in_use": d.maptrack.in_use,
                "ring": self._ring_snapshot(d.domid),
            }
        return {
            "nr_frames": self.hv.machine.nr_frames,
            "free_frames": self.hv.machine.free_frames,
            "domains": doms,
            "evtchn": {str(k): v for k, v in self.ev.snapshot().items()},
            "xenstore": self.xs.dump(),
            "xenstore_nodes": self.xs.nodes,
            "xenstore_watches": len(self.xs.watches),
            "notifies": sum(len(v) for v in self.notifies.values()),
            "memory": self.backing.snapshot(),
            "connections": len(self.conns),
            "unread_bytes_max": max((c.out_bytes for c in self.conns.values()), default=0),
            "pending_requests": sum(len(c.pending) for c in self.conns.values()),
            "counters": {**self.counters, "log_lines_suppressed": self._warn.suppressed},
        }

    def _ring_snapshot(self, domid: int) -> dict[str, int] | None:
        """The indices of the request ring of ``domid``'s connection (None: it has none).

        ``req_cons`` and ``rsp_prod_pvt`` are the service's own; the rest are
        read from the shared page (the producer and event indices).
        """
        conn = self.bound.get(domid)
        ring = None if conn is None else conn.ring
        if ring is None or ring.mem.closed:
            return None
        req_prod, req_event, rsp_prod, rsp_event = RING_INDICES.unpack_from(ring.mem)
        req_cons, rsp_pvt = struct.unpack_from("<II", ring.state)
        return {"req_prod": req_prod, "req_event": req_event, "req_cons": req_cons,
                "rsp_prod": rsp_prod, "rsp_prod_pvt": rsp_pvt, "rsp_event": rsp_event}

    def _require_toolstack(self, conn: Connection, token: bytes, op: str) -> None:
        """dom0's connection, or an unbound one of the service's uid with the dom0 token.

        Raises:
            HypercallError: EPERM otherwise (as ``XEN_SYSCTL_*`` answers a domU).
        """
        if conn.domid is not None:
            if token or not self._privileged(conn.domid):
                raise HypercallError(op, errno.EPERM, f"d{conn.domid} is not privileged")
        elif not self.identity.is_owner(conn.cred, token):
            raise HypercallError(op, errno.EPERM, "dom0 or the service's token only")

    def _stats(self, conn: Connection, payload: bytes) -> bytes:
        """STATS (dom0's): :meth:`snapshot`, at most :data:`protocol.MAX_PAYLOAD`.

        Too big, the xenstore tree and the pin tables give way to their
        counts, then domains are left out; ``"truncated"`` says which.
        """
        self._require_toolstack(conn, payload, "stats")
        snap = self.snapshot()
        limit = p.MAX_PAYLOAD - 4
        body = json.dumps(snap, sort_keys=True).encode()
        if len(body) <= limit:
            return self._ok(body)
        snap["xenstore"] = {}
        for dom in snap["domains"].values():
            dom["active"] = len(dom["active"])
        snap["truncated"] = {"xenstore": "left out (its node count is xenstore_nodes)",
                             "active": "counts instead of tables"}
        body = json.dumps(snap, sort_keys=True).encode()
        doms = snap["domains"]
        while len(body) > limit and doms:
            keep = sorted(doms, key=int)[: len(doms) // 2]
            left = len(doms) - len(keep)
            snap["domains"] = doms = {k: doms[k] for k in keep}
            snap["truncated"]["domains"] = f"{left} more left out"
            body = json.dumps(snap, sort_keys=True).encode()
        return self._ok(body)

    def _debug_key(self, conn: Connection, payload: bytes) -> bytes:
        """Xen's debug keys (dom0's): 'g' grant tables (pinned entries), 'G' every
        valid entry, 'e' event channels, 'x' the xenstore tree.

        The text stops at :data:`protocol.MAX_PAYLOAD`, with a ``[truncated``
        line saying how much was left out.
        """
        self._require_toolstack(conn, payload[1:], "debug_key")
        key = payload[:1].decode("ascii", "replace")
        if key in ("g", "G"):
            text = dump_all(self.hv, all_entries=key == "G")
        elif key == "e":
            lines = []
            for domid, ports in self.ev.snapshot().items():
                for port, state, rdom, rport in ports:
                    kind = {ECS_UNBOUND: "unbound", ECS_INTERDOMAIN: "interdomain"}.get(
                        state, str(state)
                    )
                    lines.append(f"d{domid} port {port}: {kind} d{rdom} port {rport}")
            text = "\n".join(lines) or "(no event channels)"
        elif key == "x":
            text = "\n".join(
                f"{path} = {value!r} ({','.join(perms)})"
                for path, (value, perms) in self.xs.dump().items()
            )
        else:
            raise p.ProtocolError(errno.EINVAL, f"unknown debug key {key!r}")
        return self._ok(truncate(text.encode(), p.MAX_PAYLOAD - 4))


def truncate(text: bytes, limit: int) -> bytes:
    """``text``, cut at a line end to fit ``limit`` bytes with a marker line saying
    how many bytes were left out."""
    if len(text) <= limit:
        return text
    cut = text.rfind(b"\n", 0, limit - 80)
    cut = cut if cut >= 0 else limit - 80
    return text[:cut] + f"\n[truncated: {len(text) - cut} more bytes]".encode()
