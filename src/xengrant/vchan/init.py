"""Setting a vchan up, as libxenvchan's ``tools/libs/vchan/init.c`` does:
``libxenvchan_server_init`` (:func:`server_init`) and ``libxenvchan_client_init``
(:func:`client_init`).  Both fill in a fresh :class:`~xengrant.vchan.Vchan`; its
``server``/``client`` constructors close it again if they raise.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from typing import TYPE_CHECKING, Any

from .. import _cext
from ..errors import XenError
from ..evtport import EventPort
from .layout import (
    _M,
    CLI_LIVE,
    GRANTS_OFFSET,
    LEFT,
    PAGE_SIZE,
    RIGHT,
    SRV_LIVE,
    VCHAN_NOTIFY_WRITE,
    VchanError,
    _in_page,
    _pages,
    check_orders,
)

if TYPE_CHECKING:
    from .channel import Vchan, VchanDomain


def _own_domid(dom: Any) -> int:
    """``xs_read("domid")`` as init_xs_srv does, else the domain object's id."""
    with contextlib.suppress(Exception):
        return int(dom.xs.read("domid"))
    return int(dom.domid)


def _share_notify(gntshr: Any, peer: int, offset: int, port: int) -> Any:
    """``xengntshr_share_page_notify`` on the service or on Linux."""
    if hasattr(gntshr, "share_page_notify"):
        return gntshr.share_page_notify(peer, True, offset, port)
    return gntshr.share_pages(peer, 1, True, notify_offset=offset, notify_port=port)


def _map_notify(gnttab: Any, peer: int, ref: int, offset: int, port: int) -> Any:
    """``xengnttab_map_grant_ref_notify`` on the service or on Linux."""
    if hasattr(gnttab, "map_grant_ref_notify"):
        return gnttab.map_grant_ref_notify(peer, ref, offset, port, True)
    return gnttab.map_grant_ref(peer, ref, True, notify_offset=offset, notify_port=port)


def server_init(
    self: Vchan, dom: VchanDomain, peer: int, xs_path: str, read_order: int, write_order: int
) -> None:
    """``libxenvchan_server_init`` on ``self`` (see :meth:`Vchan.server`).

    Raises:
        VchanError, GrantError, XenStoreError, EvtchnError: setup failed (the
            caller closes ``self``: nothing stays shared, bound or written).
    """
    d: Any = dom  # the backends' interfaces differ; VchanDomain names what is used
    self.is_server, self.peer, self._dom = True, peer, dom
    # The server sets cli_notify (22) to ask, and clears srv_notify (23) to tell.
    self._ask_shift, self._tell_shift, self._live = 0, 8, CLI_LIVE
    self._rd_shr, self._wr_shr = LEFT, RIGHT
    self.port = EventPort.offer(d.evtchn, peer)  # init_evt_srv
    ring = _share_notify(d.gntshr, peer, SRV_LIVE, self.port.port)  # init_gnt_srv
    self._ring = ring
    hdr = self._hdr = ring.mem.cast("B")
    hdr[:] = bytes(PAGE_SIZE)
    struct.pack_into("<HHBBBB", hdr, 16, read_order, write_order, 2, 1, VCHAN_NOTIFY_WRITE, 0)
    grants: list[int] = []
    bufs = []
    for order in (read_order, write_order):
        off = _in_page(order)
        if off:
            bufs.append(hdr[off : off + (1 << order)])
        else:
            share = d.gntshr.share_pages(peer, _pages(order), True)
            self._bufs.append(share)
            grants += share.refs
            bufs.append(share.mem.cast("B"))
    struct.pack_into(f"<{len(grants)}I", hdr, GRANTS_OFFSET, *grants)
    self._rd, self._wr = bufs
    self.read_size, self.write_size = 1 << read_order, 1 << write_order
    # init_xs_srv: owner us, nobody else but the peer, who may read.
    perms = [f"n{_own_domid(d)}", f"r{peer}"]
    self.xs_path = xs_path
    for name, value in (("ring-ref", ring.refs[0]), ("event-channel", self.port.port)):
        d.xs.write(f"{xs_path}/{name}", str(value))
        d.xs.set_perms(f"{xs_path}/{name}", perms)


def client_init(self: Vchan, dom: VchanDomain, peer: int, xs_path: str) -> None:
    """``libxenvchan_client_init`` on ``self`` (see :meth:`Vchan.client`).

    Raises:
        VchanError: ENOENT (no such nodes), EPROTO (bad values or orders).
        GrantError, EvtchnError: the grant or port does not map/bind (the caller
            closes ``self``).
    """
    d: Any = dom  # the backends' interfaces differ; VchanDomain names what is used
    self.peer, self._dom = peer, dom
    # The client sets srv_notify (23) to ask, and clears cli_notify (22) to tell.
    self._ask_shift, self._tell_shift, self._live = 8, 0, SRV_LIVE
    self._rd_shr, self._wr_shr = RIGHT, LEFT
    values = []
    for name in ("ring-ref", "event-channel"):
        try:
            raw = d.xs.read(f"{xs_path}/{name}")
        except XenError as e:
            err = getattr(e, "errno", None) or errno.ENOENT
            raise VchanError("client_init", f"{xs_path}/{name}: {e}", err) from e
        try:
            value = int(bytes(raw).split(b"\0")[0])
        except ValueError:
            value = 0
        if not 0 < value <= _M:  # init.c: atoi() == 0 fails
            raise VchanError("client_init", f"{xs_path}/{name} is {bytes(raw)[:32]!r}")
        values.append(value)
    ring_ref, remote_port = values
    self.port = EventPort.bind(d.evtchn, peer, remote_port)  # init_evt_cli
    ring = _map_notify(d.gnttab, peer, ring_ref, CLI_LIVE, self.port.port)
    self._ring = ring
    hdr = self._hdr = ring.mem.cast("B")
    # Read the orders and grants once: the server may change them later.
    left, right = struct.unpack_from("<HH", hdr, 16)
    check_orders(left, right)
    n_left, n_right = _pages(left), _pages(right)
    grants = list(struct.unpack_from(f"<{n_left + n_right}I", hdr, GRANTS_OFFSET))
    bufs = []
    for order, refs, writable in ((left, grants[:n_left], True), (right, grants[n_left:], False)):
        off = _in_page(order)
        if off:
            bufs.append(hdr[off : off + (1 << order)])
        else:
            m = d.gnttab.map_domain_grant_refs(peer, refs, writable)
            self._bufs.append(m)
            bufs.append(m.mem.cast("B"))
    self._wr, self._rd = bufs
    self.write_size, self.read_size = 1 << left, 1 << right
    # Start where the server's rings are (0 for a fresh server).
    self._wr_prod = _cext.load32(hdr, LEFT + 4)
    self._rd_cons = _cext.load32(hdr, RIGHT)
    self._set_byte(CLI_LIVE, 1)
    self._fetch_or(8, VCHAN_NOTIFY_WRITE)  # srv_notify = VCHAN_NOTIFY_WRITE
    self.port.notify()  # wake up the server
