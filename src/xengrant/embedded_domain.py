"""An :class:`~xengrant.EmbeddedXen` domain: a guest with event channels and xenstore.

What a domain of the service has on its connection (``domain.evtchn``,
``domain.xs``), an embedded domain has in this process, through the same
sans-IO cores the service runs: so a frontend and a backend work in one
process with no service and no thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .guest.domain import Domain
from .hypercall import Hypercalls

if TYPE_CHECKING:
    from .embedded import EmbeddedXen
    from .evtchn.embedded import EmbeddedEvtchn
    from .xs_embedded import EmbeddedXenStore


class EmbeddedDomain(Domain):
    """A :class:`~xengrant.Domain` of an :class:`~xengrant.EmbeddedXen`.

    Args:
        xen: the hypervisor.
        hypercalls: its hypercalls, bound to this domain.
        pv: a PV guest.
    """

    def __init__(self, xen: EmbeddedXen, hypercalls: Hypercalls, *, pv: bool = False) -> None:
        super().__init__(hypercalls, pv=pv)
        self.xen = xen
        self._evtchn: EmbeddedEvtchn | None = None
        self._xs: EmbeddedXenStore | None = None

    def __repr__(self) -> str:
        return f"<EmbeddedDomain d{self.domid}{' pv' if self.pv else ''}>"

    @property
    def evtchn(self) -> EmbeddedEvtchn:
        """This domain's event-channel handle (an :class:`~xengrant.evtchn.Evtchn`);
        :meth:`EmbeddedXen.evtchn_open` opens more."""
        if self._evtchn is None:
            self._evtchn = self.xen.evtchn_open(self.domid)
        return self._evtchn

    @property
    def xs(self) -> EmbeddedXenStore:
        """This domain's xenstore connection (an :class:`~xengrant.xsapi.XenStore`);
        :meth:`EmbeddedXen.xs_open` opens more."""
        if self._xs is None:
            self._xs = self.xen.xs_open(self.domid)
        return self._xs
