"""Event channels: ports per domain, interdomain binding, pending and mask bits.

Sans-IO.  Operations return what must be delivered -- ``(domid, port)``
pairs -- and the server sends those as EVENT messages.  Rules follow
xen/common/event_channel.c (Xen 4.17) for the hypercalls and Linux's
drivers/xen/evtchn.c for what a user process sees:

- Ports run from 1 to ``nr_ports - 1`` (port 0 is reserved, ``evtchn_init``);
  the 2-level ABI of a 64-bit guest has 4096 (``EVTCHN_2L_NR_CHANNELS``).
  No free port: -ENOSPC (``get_free_port``).
- ``alloc_unbound(dom, remote_dom)``: a port of ``dom`` (DOMID_SELF or the
  caller; another domain needs privilege, else -EPERM) that ``remote_dom``
  (DOMID_SELF: the caller) may bind.  ``dom`` unknown: -ESRCH.
- ``bind_interdomain(remote_dom, remote_port)``: -ESRCH for an unknown
  domain, -EINVAL unless the remote port is unbound and offered to the
  caller.  Both ends become interdomain and, as Xen does ("we may have lost
  notifications on the remote unbound port"), the new local port is set
  pending, so the binder sees one event at once.
- ``send(port)``: an interdomain port sets the peer's pending bit; an unbound
  one drops the event silently; anything else (free, out of range) -EINVAL.
- ``close(port)``: -EINVAL unless in use; the peer of an interdomain port
  goes back to unbound, offered to the closer (``evtchn_close``).
- Delivery (coalescing), as xen/common/event_2l.c's ``evtchn_2l_set_pending``:
  a send to a port already pending sets nothing new and wakes nobody; one to
  a masked port leaves it pending; setting a pending bit that was clear on an
  unmasked port is an upcall.  As /dev/xen/evtchn does (``lateeoi_ack_dynirq``,
  ``evtchn_interrupt``), the upcall masks the port, clears its pending bit and
  hands it to the process; ``unmask(port)`` re-enables it and delivers again,
  once, if it became pending meanwhile (``evtchn_2l_unmask``).  So however
  many sends come while a port waits for its process, it is delivered at most
  twice: once at the first, once at the unmask.  Unmasking a port not bound
  is ignored (``evtchn_write``).  :attr:`EventChannels.counters` counts what
  each send did.
- A domain destroyed closes all its ports (``evtchn_destroy``).
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..abi.grant_table import DOMID_SELF
from ..errors import ErrnoError

#: EVTCHN_2L_NR_CHANNELS for a 64-bit guest.
NR_PORTS_2L = 4096

# EVTCHNOP_status states (public/event_channel.h)
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2

#: Internal states (Xen's ECS_*).
ECS_FREE = 0
ECS_RESERVED = 1
ECS_UNBOUND = 2
ECS_INTERDOMAIN = 3

_STAT = {
    ECS_FREE: EVTCHNSTAT_closed,
    ECS_RESERVED: EVTCHNSTAT_closed,
    ECS_UNBOUND: EVTCHNSTAT_unbound,
    ECS_INTERDOMAIN: EVTCHNSTAT_interdomain,
}


class EvtchnError(ErrnoError):
    """An event-channel hypercall failed.

    Attributes:
        errno: the positive errno (the hypercall returns its negation).
        detail: the explanation.
    """

    prefix = "evtchn: -{name}"


@dataclass
class Port:
    """One event channel end (``struct evtchn``)."""

    state: int = ECS_FREE
    remote_dom: int = 0
    remote_port: int = 0
    pending: bool = False
    masked: bool = False


@dataclass
class DomainPorts:
    """A domain's ports; index 0 is the reserved port."""

    domid: int
    nr_ports: int = NR_PORTS_2L
    ports: dict[int, Port] = field(default_factory=dict)

    def in_use(self) -> list[int]:
        """Ports not free, lowest first (port 0 excluded)."""
        return sorted(p for p, c in self.ports.items() if p and c.state != ECS_FREE)


Delivery = tuple[int, int]


class EventChannels:
    """Every domain's event channels.

    Args:
        is_privileged: whether a domain may act on others' ports (dom0).
        nr_ports: ports per domain.
    """

    def __init__(
        self, is_privileged: Callable[[int], bool] | None = None, nr_ports: int = NR_PORTS_2L
    ) -> None:
        self.is_privileged = is_privileged or (lambda domid: domid == 0)
        self.nr_ports = nr_ports
        self.domains: dict[int, DomainPorts] = {}
        #: ``delivered``: upcalls (a port queued for its handle);
        #: ``coalesced``: sends to a port already pending (nothing new, nobody woken);
        #: ``held``: sends that left a masked port pending (delivered at its unmask)
        self.counters: Counter[str] = Counter(delivered=0, coalesced=0, held=0)

    # ----------------------------------------------------------- domains
    def add_domain(self, domid: int) -> None:
        """``evtchn_init``: a new domain with only port 0, reserved."""
        d = DomainPorts(domid, self.nr_ports)
        d.ports[0] = Port(ECS_RESERVED)
        self.domains[domid] = d

    def destroy_domain(self, domid: int) -> list[Delivery]:
        """``evtchn_destroy``: close every port of a dying domain.

        Returns:
            Deliveries caused (none: closing never notifies).
        """
        d = self.domains.get(domid)
        if d is None:
            return []
        for port in d.in_use():
            self._close(d, port)
        del self.domains[domid]
        return []

    def _domain(self, domid: int) -> DomainPorts:
        d = self.domains.get(domid)
        if d is None:
            raise EvtchnError(errno.ESRCH, f"no domain {domid}")
        return d

    def _target(self, caller: int, dom: int) -> DomainPorts:
        """``rcu_lock_domain_by_any_id`` + the XSM target check."""
        if dom == DOMID_SELF:
            dom = caller
        if dom != caller and not self.is_privileged(caller):
            raise EvtchnError(errno.EPERM, f"d{caller} may not act on d{dom}")
        return self._domain(dom)

    def _free_port(self, d: DomainPorts) -> int:
        for p in range(1, d.nr_ports):
            c = d.ports.get(p)
            if c is None or c.state == ECS_FREE:
                return p
        raise EvtchnError(errno.ENOSPC, f"d{d.domid} has no free event channel")

    def _valid(self, d: DomainPorts, port: int) -> Port:
        c = d.ports.get(port) if 0 <= port < d.nr_ports else None
        if c is None:
            raise EvtchnError(errno.EINVAL, f"d{d.domid} port {port} is not valid")
        return c

    # ------------------------------------------------------------ ops
    def alloc_unbound(self, caller: int, dom: int, remote_dom: int) -> int:
        """EVTCHNOP_alloc_unbound.

        Returns:
            The new port of ``dom``.

        Raises:
            EvtchnError: ESRCH, EPERM, ENOSPC.
        """
        self._domain(caller)
        d = self._target(caller, dom)
        if remote_dom == DOMID_SELF:
            remote_dom = caller
        port = self._free_port(d)
        d.ports[port] = Port(ECS_UNBOUND, remote_dom, 0)
        return port

    def bind_interdomain(
        self, caller: int, remote_dom: int, remote_port: int
    ) -> tuple[int, list[Delivery]]:
        """EVTCHNOP_bind_interdomain.

        Returns:
            ``(local port, deliveries)`` -- the local port is set pending.

        Raises:
            EvtchnError: ESRCH, ENOSPC, EINVAL.
        """
        ld = self._domain(caller)
        if remote_dom == DOMID_SELF:
            remote_dom = caller
        rd = self.domains.get(remote_dom)
        if rd is None:
            raise EvtchnError(errno.ESRCH, f"no domain {remote_dom}")
        lport = self._free_port(ld)
        rchn = rd.ports.get(remote_port) if 0 <= remote_port < rd.nr_ports else None
        if rchn is None or rchn.state != ECS_UNBOUND or rchn.remote_dom != caller:
            raise EvtchnError(
                errno.EINVAL, f"d{remote_dom} port {remote_port} is not unbound for d{caller}"
            )
        lchn = Port(ECS_INTERDOMAIN, remote_dom, remote_port)
        ld.ports[lport] = lchn
        rchn.state = ECS_INTERDOMAIN
        rchn.remote_dom = caller
        rchn.remote_port = lport
        return lport, self._set_pending(ld, lport)

    def send(self, caller: int, port: int) -> list[Delivery]:
        """EVTCHNOP_send.

        Returns:
            Deliveries (the peer's port, if that was an upcall).

        Raises:
            EvtchnError: ESRCH (caller unknown), EINVAL (port not in use).
        """
        d = self._domain(caller)
        c = self._valid(d, port)
        if c.state == ECS_INTERDOMAIN:
            rd = self.domains.get(c.remote_dom)
            if rd is None:  # pragma: no cover - destroy unbinds peers first
                return []
            return self._set_pending(rd, c.remote_port)
        if c.state == ECS_UNBOUND:
            return []
        raise EvtchnError(errno.EINVAL, f"d{caller} port {port} is not bound")

    def close(self, caller: int, port: int) -> None:
        """EVTCHNOP_close.

        Raises:
            EvtchnError: ESRCH, EINVAL (free, reserved or out of range).
        """
        d = self._domain(caller)
        c = self._valid(d, port)
        if c.state in (ECS_FREE, ECS_RESERVED):
            raise EvtchnError(errno.EINVAL, f"d{caller} port {port} is not in use")
        self._close(d, port)

    def _close(self, d: DomainPorts, port: int) -> None:
        c = d.ports[port]
        if c.state == ECS_INTERDOMAIN:
            rd = self.domains.get(c.remote_dom)
            if rd is not None:
                rc = rd.ports.get(c.remote_port)
                if rc is not None and rc.state == ECS_INTERDOMAIN:
                    rc.state = ECS_UNBOUND
                    rc.remote_dom = d.domid
                    rc.remote_port = 0
        del d.ports[port]

    def status(self, caller: int, dom: int, port: int) -> tuple[int, int, int]:
        """EVTCHNOP_status.

        Returns:
            ``(EVTCHNSTAT_*, remote domid, remote port)`` (0s where unused).

        Raises:
            EvtchnError: ESRCH, EPERM, EINVAL.
        """
        self._domain(caller)
        d = self._target(caller, dom)
        if not 0 <= port < d.nr_ports:
            raise EvtchnError(errno.EINVAL, f"port {port} out of range")
        c = d.ports.get(port, Port())
        if c.state == ECS_UNBOUND:
            return EVTCHNSTAT_unbound, c.remote_dom, 0
        if c.state == ECS_INTERDOMAIN:
            return EVTCHNSTAT_interdomain, c.remote_dom, c.remote_port
        return _STAT[c.state], 0, 0

    def unmask(self, caller: int, port: int) -> list[Delivery]:
        """Re-enable delivery on a port (writing it to /dev/xen/evtchn).

        ``evtchn_write`` -> ``xen_irq_lateeoi`` -> ``unmask_evtchn``, which
        reaches Xen's ``evtchn_2l_unmask``: the mask bit clears, and a port
        that became pending while masked is delivered now (once, however many
        sends it took meanwhile).

        Returns:
            The port again if it became pending while masked.  Ports not in
            use are ignored, as the Linux driver ignores them.
        """
        d = self.domains.get(caller)
        if d is None:
            return []
        c = d.ports.get(port)
        if c is None or c.state in (ECS_FREE, ECS_RESERVED):
            return []
        c.masked = False
        if c.pending:
            return self._upcall(d, port, c)
        return []

    def _set_pending(self, d: DomainPorts, port: int) -> list[Delivery]:
        """``evtchn_2l_set_pending`` (xen/common/event_2l.c), for one port.

        A port already pending sets nothing new and wakes nobody (the guest
        has not cleared it yet); a masked one is left pending, delivered at
        its unmask; else the guest gets its upcall.
        """
        c = d.ports.get(port)
        if c is None:
            return []
        if c.pending:  # guest_test_and_set_bit(evtchn_pending) was already set
            self.counters["coalesced"] += 1
            return []
        c.pending = True
        if c.masked:  # guest_test_bit(evtchn_mask): no upcall
            self.counters["held"] += 1
            return []
        return self._upcall(d, port, c)

    def _upcall(self, d: DomainPorts, port: int, c: Port) -> list[Delivery]:
        """The guest takes a pending, unmasked port: Linux's ``lateeoi_ack_dynirq``
        masks it and clears its pending bit (``mask_evtchn``, ``clear_evtchn``),
        and drivers/xen/evtchn.c's ``evtchn_interrupt`` queues it for the process
        (``enabled = false`` until the process writes it back: :meth:`unmask`)."""
        c.pending = False
        c.masked = True
        self.counters["delivered"] += 1
        return [(d.domid, port)]

    def redeliver(self, domid: int) -> list[Delivery]:
        """Ports of ``domid`` pending and unmasked (delivered when it attaches)."""
        d = self.domains.get(domid)
        if d is None:
            return []
        out: list[Delivery] = []
        for p in d.in_use():
            c = d.ports[p]
            if c.pending and not c.masked:
                out += self._upcall(d, p, c)
        return out

    # ------------------------------------------------------------ inspect
    def snapshot(self) -> dict[int, list[tuple[int, int, int, int]]]:
        """``{domid: [(port, state, remote_dom, remote_port), ...]}`` of ports in use."""
        return {
            domid: [(p, d.ports[p].state, d.ports[p].remote_dom, d.ports[p].remote_port)
                    for p in d.in_use()]
            for domid, d in sorted(self.domains.items())
        }
