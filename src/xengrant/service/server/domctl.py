"""Domains and who they belong to: create, attach (with the secret), destroy,
dom0 (``XEN_DOMCTL_createdomain``/``destroydomain``, ``domain_kill``).

When a connection closes (the process exited or was killed), its domain is
destroyed as Xen's ``domain_kill`` would: unmap notifications fire, its
mappings of others' grants are released (preemptibly, as
``domain_relinquish_resources``), its event channels close, its watches go,
its xenstore home is removed as libxl does and ``@releaseDomain`` fires.
Pages it granted stay valid for their mappers until they unmap.
"""

from __future__ import annotations

import contextlib
import errno

from ...errors import HypercallError
from .. import protocol as p
from ..evtchn import EvtchnError
from ..xenstore import XenStoreError
from .base import ServerBase
from .connection import Connection


class DomainControl(ServerBase):
    """CREATE, ATTACH, DOMCTL_CREATE/DESTROY, CLOSE and the teardown."""

    def _privileged(self, domid: int) -> bool:
        """Dom0 (also the toolstack's own identity when no domain 0 exists)."""
        if domid == 0:
            return True
        d = self.hv.domains.get(domid)
        return d is not None and d.privileged

    @property
    def token(self) -> bytes:
        """The dom0 token: claims domid 0, reads STATS and debug keys."""
        return self.identity.token

    def _ping(self, conn: Connection, payload: bytes) -> bytes:
        return self._ok(payload)

    def _new_domain(self, conn: Connection, payload: bytes, by_dom0: bool) -> tuple[int, bool]:
        """Create a domain from a CREATE or DOMCTL_CREATE payload.

        Who picks the domid (``XEN_DOMCTL_createdomain``): dom0 may name one;
        anyone else gets the next free one, handed out incrementally and
        reused only after the ids wrap (:meth:`Hypervisor._free_domid`, as
        ``do_domctl``'s ``rover`` does in xen/common/domctl.c), so a process
        cannot take the id of a domain that just died (and the grants meant
        for it).  Domid 0 takes the dom0 token and the service's uid, once.

        Raises:
            HypercallError: EPERM (a domid not to be had), EINVAL, ENOMEM.
        """
        head = payload[: p.CREATE_REQ.size]
        version, domid, flags, mgf, mmf, max_pages = p.unpack_exact(p.CREATE_REQ, head, "CREATE")
        extra = payload[p.CREATE_REQ.size :]
        if version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(errno.EPROTONOSUPPORT, f"protocol version {version}")
        if flags & ~p.DOMFLAG_PV:
            raise p.ProtocolError(errno.EINVAL, f"unknown domain flags {flags:#x}")
        if domid < -1 or mgf < -1 or mmf < -1 or max_pages < -1:
            raise p.ProtocolError(errno.EINVAL, "negative domain parameter")
        if extra and (by_dom0 or domid != 0 or len(extra) != p.SECRET_SIZE):
            raise p.ProtocolError(errno.EBADMSG, f"CREATE: {len(payload)} bytes")
        if domid == 0:
            if self.identity.dom0_claimed:
                raise HypercallError("createdomain", errno.EPERM, "dom0 was claimed already")
            if not self.identity.is_owner(conn.cred, extra):
                raise HypercallError(
                    "createdomain", errno.EPERM,
                    "dom0 takes the service's uid and its token",
                )
        elif domid != -1 and not by_dom0:
            raise HypercallError(
                "createdomain", errno.EPERM, f"d{conn.domid} may not choose a domid ({domid})"
            )
        pv = bool(flags & p.DOMFLAG_PV)
        max_pages, mgf, mmf = self.limits.domain(max_pages, mgf, mmf)
        new = self.hv.create_domain(
            None if domid == -1 else domid,
            pv=pv,
            max_grant_frames=mgf,
            max_maptrack_frames=mmf,
            max_pages=max_pages,
        )
        if new == 0:
            self.identity.dom0_claimed = True
        self.ev.add_domain(new)
        self.xs.make_domain_home(new)
        self.xs_domains.introduced.add(new)
        self.xs.introduce_domain(new)
        return new, pv

    def _bind(self, conn: Connection, domid: int) -> bytes:
        d = self.hv.domains[domid]
        conn.domid = domid
        self.bound[domid] = conn
        side = self.backing.open_side(domid)
        conn.handover[side.fileno()] = side.close  # closed once sent
        self._pending_fds = (side.fileno(),)
        self._deliveries += self.ev.redeliver(domid)
        body = p.DOMAIN_REPLY.pack(
            p.PROTOCOL_VERSION, domid, p.DOMFLAG_PV if d.pv else 0, self.xen.nr_frames
        )
        return self._ok(body + self._delta(domid, None))  # the p2m so far (PV: table frames)

    def _check_unbound(self, conn: Connection) -> None:
        if conn.domid is not None:
            raise p.ProtocolError(errno.EISCONN, f"already bound to d{conn.domid}")
        if conn.destroyed is not None:
            raise HypercallError(
                "connect", errno.ESRCH, f"d{conn.destroyed} was destroyed by the toolstack"
            )

    def _create(self, conn: Connection, payload: bytes) -> bytes:
        self._check_unbound(conn)
        domid, _pv = self._new_domain(conn, payload, False)
        return self._bind(conn, domid)

    def _attach(self, conn: Connection, payload: bytes) -> bytes:
        """ATTACH: take a domain dom0 made, with the secret DOMCTL_CREATE gave it."""
        self._check_unbound(conn)
        if len(payload) != p.ATTACH_REQ.size + p.SECRET_SIZE:
            raise p.ProtocolError(
                errno.EBADMSG,
                f"ATTACH: {len(payload)} bytes, want {p.ATTACH_REQ.size + p.SECRET_SIZE}",
            )
        version, domid = p.ATTACH_REQ.unpack_from(payload)
        if version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(errno.EPROTONOSUPPORT, f"protocol version {version}")
        if not self.identity.check_secret(domid, payload[p.ATTACH_REQ.size :]):
            # the same answer whether d<domid> exists or not: nothing to learn
            raise HypercallError("attach", errno.EACCES, f"d{domid}: not its secret")
        d = self.hv.domains.get(domid)
        if d is None or d.is_dying:  # pragma: no cover - the secret goes with the domain
            raise HypercallError("attach", errno.ESRCH, f"no domain {domid}")
        if domid in self.bound:  # pragma: no cover - the secret goes at the first attach
            raise HypercallError("attach", errno.EBUSY, f"d{domid} is attached already")
        self.identity.forget(domid)
        for other in self.conns.values():
            other.created.discard(domid)
        return self._bind(conn, domid)

    def _require_privileged(self, conn: Connection, op: str) -> None:
        if not self._privileged(self._dom(conn)):
            raise HypercallError(op, errno.EPERM, f"d{conn.domid} is not privileged")

    def _domctl_create(self, conn: Connection, payload: bytes) -> bytes:
        self._require_privileged(conn, "createdomain")
        domid, _pv = self._new_domain(conn, payload, True)
        conn.created.add(domid)
        return self._ok(p.DOMID.pack(domid) + self.identity.new_secret(domid))

    def _domctl_destroy(self, conn: Connection, payload: bytes) -> bytes:
        self._require_privileged(conn, "destroydomain")
        (domid,) = p.unpack_exact(p.DOMID, payload, "DOMCTL_DESTROY")
        d = self.hv.domains.get(domid)
        if d is None or d.is_dying:
            raise HypercallError("destroydomain", errno.ESRCH, f"no domain {domid}")
        self._destroy(domid)
        return self._ok()

    def _close_domain(self, conn: Connection, payload: bytes) -> bytes:
        """The client is leaving: destroy its domain now, as its disconnect would."""
        self._destroy(self._dom(conn))
        for domid in sorted(conn.created):
            if domid not in self.bound:
                self._destroy(domid)
        conn.created.clear()
        return self._ok()

    def _destroy(self, domid: int) -> None:
        """Kill a domain: notifies, mappings, ports, watches, xenstore home, @releaseDomain."""
        d = self.hv.domains.get(domid)
        conn = self.bound.pop(domid, None)
        self.identity.forget(domid)
        if conn is not None:
            conn.domid = None
            conn.destroyed = domid  # its next call hears why
            self._xs_close(conn.ident)
        if d is None or d.is_dying:
            return
        sends = self._fire_all_notifies(d)
        self.hv.kill_domain(domid)
        # domain_relinquish_resources is preemptible (-ERESTART): so is this
        budget = self.limits.preempt_teardown
        while not self.hv.relinquish_resources(d, budget):
            self._preempt("teardown")
        for port in sends:
            with contextlib.suppress(EvtchnError):
                self._deliveries += self.ev.send(domid, port)
        self._deliveries += self.ev.destroy_domain(domid)
        with contextlib.suppress(XenStoreError):
            self.xs.rm(0, f"/local/domain/{domid}")
        self.xs_domains.introduced.discard(domid)
        self.xs.release_domain(domid)
        self.backing.close_side(domid)
        self._dispatch_async()
