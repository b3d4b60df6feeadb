"""A domain process's side of the service: the same guest API over a socket.

:func:`connect` creates (or attaches to) a domain in a running ``xengrant
hypervisor`` and returns a :class:`RemoteDomain`: a
:class:`~xengrant.guest.domain.Domain` whose hypercalls go to the service --
one message per call, so a batch of map/unmap/copy ops is one round trip --
plus a xenstore handle (:attr:`RemoteDomain.xs`) and event channels
(:attr:`RemoteDomain.evtchn`).

Memory never crosses the socket.  The service sends the memfds backing the
frames this domain may reach (its own, and foreign ones it maps, see
:mod:`xengrant.service.memview`), with SCM_RIGHTS; the domain's hypercalls
(:mod:`xengrant.service.hypercalls`) keep a mirror of its p2m (every reply
carries the changes) and map frames themselves: a write by one process is
seen by the other with no copy.

The pieces: :mod:`~xengrant.service.channel` (the connection: one reader,
the request ring as the one fast path, nothing given up),
:mod:`~xengrant.service.calls` (the requests in flight, sans-IO),
:mod:`~xengrant.service.hypercalls`, :mod:`~xengrant.service.gnttab`
(gntdev/gntalloc's calls), :mod:`~xengrant.service.xsclient` and
:mod:`~xengrant.service.evtclient`.  A process that dies closes its socket,
and the service destroys its domain.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os

from ..errors import HypercallError
from ..guest.domain import Domain
from . import protocol as p
from .channel import Channel as Channel
from .errors import ServiceError as ServiceError
from .evtclient import EventChannelClient as EventChannelClient
from .gnttab import RemoteGntshr as RemoteGntshr
from .gnttab import RemoteGnttab as RemoteGnttab
from .hypercalls import RemoteHypercalls as RemoteHypercalls
from .paths import read_token, token_path
from .ring import ClientRing
from .stats_types import ServiceStats
from .xsclient import XenStoreClient as XenStoreClient
from .xsclient import XenStoreWatch as XenStoreWatch


class RemoteDomain(Domain):
    """A :class:`~xengrant.guest.domain.Domain` living in the service.

    Attributes:
        xs: its xenstore connection.
        evtchn: its event channels.
        channel: the socket to the service.
    """

    def __init__(self, hypercalls: RemoteHypercalls, *, pv: bool = False) -> None:
        super().__init__(hypercalls, pv=pv)
        self.channel = hypercalls.channel
        self.xs = XenStoreClient(self.channel, self.domid)
        self.evtchn = EventChannelClient(self.channel, self.domid)
        self._remote_gntshr: RemoteGntshr | None = None
        self._remote_gnttab: RemoteGnttab | None = None
        self.closed = False
        #: attach secrets of the domains this one created (:meth:`domain_secret`)
        self.secrets: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"<RemoteDomain d{self.domid}{' pv' if self.pv else ''} at {self.channel.path}>"

    @property
    def gntshr(self) -> RemoteGntshr:
        """Portable sharing interface (libxengntshr), with unmap notification."""
        if self._remote_gntshr is None:
            self._remote_gntshr = RemoteGntshr(self)
        return self._remote_gntshr

    @property
    def gnttab(self) -> RemoteGnttab:
        """Portable mapping interface (libxengnttab), with unmap notification."""
        if self._remote_gnttab is None:
            self._remote_gnttab = RemoteGnttab(self)
        return self._remote_gnttab

    # ----------------------------------------------------------- toolstack
    def create_domain(
        self,
        domid: int | None = None,
        *,
        pv: bool = False,
        max_grant_frames: int | None = None,
        max_maptrack_frames: int | None = None,
        max_pages: int | None = None,
    ) -> int:
        """``XEN_DOMCTL_createdomain`` (dom0 only): a domain another process attaches to.

        The process attaching needs the domain's secret
        (:meth:`domain_secret`): ``connect(path, domid, secret=...)``.  The
        domain is destroyed if this connection closes before anyone attaches.

        Raises:
            HypercallError: EPERM (not privileged), EEXIST, EINVAL, ENOMEM.
        """
        body = self.channel.call_ok(
            p.MSG_DOMCTL_CREATE,
            _create_payload(domid, pv, max_grant_frames, max_maptrack_frames, max_pages),
            "createdomain",
        )
        got = int(p.DOMID.unpack_from(body)[0])
        self.secrets[got] = bytes(body[p.DOMID.size : p.DOMID.size + p.SECRET_SIZE])
        return got

    def domain_secret(self, domid: int) -> bytes:
        """The secret that attaches to ``domid``, made by :meth:`create_domain`.

        Raises:
            KeyError: this domain did not create ``domid``.
        """
        return self.secrets[domid]

    def destroy_domain(self, domid: int) -> None:
        """``XEN_DOMCTL_destroydomain`` (dom0 only).

        Raises:
            HypercallError: EPERM, ESRCH.
        """
        self.channel.call_ok(p.MSG_DOMCTL_DESTROY, p.DOMID.pack(domid), "destroydomain")

    def sync(self) -> None:
        """Wait until the service has done every posted request (``gnttab`` unmaps).

        Raises:
            BatchError, HypercallError: the oldest posted unmap that failed.
            ServiceError: the connection closed.
        """
        self.channel.sync()

    # ------------------------------------------------------------- closing
    def close(self) -> None:
        """Leave: the service destroys this domain (as if the process died).

        Raises:
            BatchError, HypercallError: a posted unmap failed and nothing
                raised it yet (the domain is gone all the same).
        """
        if self.closed:
            return
        self.closed = True
        channel = self.channel
        if not channel.closed:
            # destroy now and wait for it, so that whoever looks next sees it
            # gone; its reply comes after every posted one
            with contextlib.suppress(ServiceError):
                channel.request(p.MSG_CLOSE)
        late = list(channel.deferred)
        channel.deferred.clear()
        channel.close()
        hc = self.hypercalls
        assert isinstance(hc, RemoteHypercalls)
        hc.close()
        if late:
            raise late[0]

    def __enter__(self) -> RemoteDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_payload(
    domid: int | None,
    pv: bool,
    max_grant_frames: int | None,
    max_maptrack_frames: int | None,
    max_pages: int | None,
) -> bytes:
    return p.CREATE_REQ.pack(
        p.PROTOCOL_VERSION,
        -1 if domid is None else domid,
        p.DOMFLAG_PV if pv else 0,
        -1 if max_grant_frames is None else max_grant_frames,
        -1 if max_maptrack_frames is None else max_maptrack_frames,
        -1 if max_pages is None else max_pages,
    )


def connect(
    path: str | None = None,
    domid: int | None = None,
    *,
    pv: bool = False,
    max_grant_frames: int | None = None,
    max_maptrack_frames: int | None = None,
    max_pages: int | None = None,
    timeout: float | None = None,
    spin: float | None = None,
    ring: bool | None = None,
    secret: bytes | None = None,
) -> RemoteDomain:
    """Join a running ``xengrant hypervisor`` as a domain.

    Args:
        path: the socket (default: ``$XENGRANT_SOCKET``, then
            ``$XDG_RUNTIME_DIR/xengrant.sock``, then
            ``<tmp>/xengrant-<uid>/xengrant.sock``).
        domid: None for a new domain with the next free id; 0 to become dom0
            (the service's uid, with the token it wrote beside its socket);
            another id to attach to the domain dom0 created with it.
        secret: the attach secret dom0 got for ``domid``
            (:meth:`RemoteDomain.domain_secret`); for dom0, the token
            (default: read from :func:`~xengrant.service.paths.token_path`).
        pv: create a PV domain.
        max_grant_frames, max_maptrack_frames, max_pages: limits of a new domain.
        timeout: seconds to wait for each reply (None: forever).
        spin: seconds a caller polls for its reply before sleeping
            (default :attr:`Channel.SPIN`; 0: sleep at once).
        ring: one-op maps and unmaps on a request ring shared with the
            service (service/ring.py) instead of the socket; None: yes,
            unless ``$XENGRANT_RING`` is ``0``.

    Returns:
        The domain; ``close()`` it (or exit) and the service destroys it.

    Raises:
        OSError: nothing listens at ``path``; PermissionError: another uid
            serves it, or the token file is not private.
        ValueError: a domid to attach to without its secret.
        HypercallError: EPERM (dom0 not to be had), EACCES (not the
            domain's secret), EINVAL, ENOMEM.
    """
    if domid not in (None, 0) and secret is None:
        raise ValueError(f"attaching to d{domid} takes the secret dom0 got for it")
    channel = Channel(path, timeout, spin)
    try:
        if domid is None or domid == 0:
            payload = _create_payload(domid, pv, max_grant_frames, max_maptrack_frames, max_pages)
            if domid == 0:
                payload += secret if secret is not None else read_token(token_path(channel.path))
            status, body = channel.call(p.MSG_CREATE, payload)
        else:
            assert secret is not None
            status, body = channel.call(
                p.MSG_ATTACH, p.ATTACH_REQ.pack(p.PROTOCOL_VERSION, domid) + secret
            )
        if status < 0:
            raise HypercallError("connect", -status, body.decode("utf-8", "replace"))
        _version, got, flags, nr_frames = p.DOMAIN_REPLY.unpack_from(body)
        fds = channel.take_fds()
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ServiceError(errno.EBADMSG, f"expected the memory socket, got {len(fds)} fds")
        hc = RemoteHypercalls(channel, got, fds[0], nr_frames)
        hc._apply_delta(body, p.DOMAIN_REPLY.size)
        if ring if ring is not None else os.environ.get("XENGRANT_RING", "1") != "0":
            channel.ring = _setup_ring(channel)
        channel.want_fds = False  # nothing else brings descriptors: plain recv_into
        domain = RemoteDomain(hc, pv=bool(flags & p.DOMFLAG_PV))
        channel.ring_p2m, channel.ring_holes = hc.p2m, domain.put_pages
        return domain
    except BaseException:
        channel.close()
        raise


def _setup_ring(channel: Channel) -> ClientRing | None:
    """Ask for the connection's request ring (``MSG_RING_SETUP``).

    Returns:
        The ring; None if the service has none to give (an older service,
        or it could not make one): everything stays on the socket then.
    """
    status, _body = channel.call(p.MSG_RING_SETUP)
    fds = channel.take_fds()
    if status == 0 and len(fds) == 3:
        try:
            return ClientRing(*fds)
        except OSError:
            fds = fds[1:]  # ClientRing closed the memfd
    for fd in fds:
        os.close(fd)
    return None


# ------------------------------------------------------------ observation
def _token(channel: Channel, token: bytes | None) -> bytes:
    return token if token is not None else read_token(token_path(channel.path))


def stats(
    path: str | None = None, timeout: float | None = 10.0, token: bytes | None = None
) -> ServiceStats:
    """The service's tables and counts (free frames, domains, pins, ports, xenstore).

    The toolstack's view: it takes the dom0 token (default: read from
    beside the socket, which only the service's uid can).  At most 1 MiB:
    a ``"truncated"`` key says what was left out.

    Raises:
        OSError: nothing listens at ``path``; PermissionError: no token to read.
        HypercallError: EPERM, not the service's token or uid.
    """
    channel = Channel(path, timeout)
    try:
        body = channel.call_ok(p.MSG_STATS, _token(channel, token), "stats")
        result: ServiceStats = json.loads(body)
        return result
    finally:
        channel.close()


def debug_key(
    key: str, path: str | None = None, timeout: float | None = 10.0, token: bytes | None = None
) -> str:
    """Press a Xen debug key on the service: ``g``/``G`` grant tables, ``e``, ``x``.

    Takes the dom0 token as :func:`stats` does; the text is cut at 1 MiB
    (a ``[truncated`` line says so).

    Raises:
        OSError: nothing listens at ``path``.
        HypercallError: EINVAL for an unknown key, EPERM without the token.
    """
    channel = Channel(path, timeout)
    try:
        payload = key.encode()[:1] + _token(channel, token)
        return channel.call_ok(p.MSG_DEBUG_KEY, payload, "debug_key").decode()
    finally:
        channel.close()


def ping(path: str | None = None, timeout: float | None = 10.0) -> bool:
    """True if a service answers at ``path``."""
    try:
        channel = Channel(path, timeout)
    except OSError:
        return False
    try:
        return channel.call(p.MSG_PING, b"ping")[0] == 0
    except ServiceError:
        return False
    finally:
        channel.close()
