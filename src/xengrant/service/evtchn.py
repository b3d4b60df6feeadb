"""The sans-IO event-channel core, moved to :mod:`xengrant.evtchn.core`.

Kept so that ``from xengrant.service.evtchn import ...`` still works: the
service, :class:`~xengrant.EmbeddedXen` and every test share that one core.
"""

from __future__ import annotations

from ..evtchn.core import (
    ECS_FREE,
    ECS_INTERDOMAIN,
    ECS_RESERVED,
    ECS_UNBOUND,
    NR_PORTS_2L,
    Delivery,
    DomainPorts,
    EventChannels,
    EvtchnError,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
    Port,
)

__all__ = [
    "ECS_FREE",
    "ECS_INTERDOMAIN",
    "ECS_RESERVED",
    "ECS_UNBOUND",
    "NR_PORTS_2L",
    "Delivery",
    "DomainPorts",
    "EVTCHNSTAT_closed",
    "EVTCHNSTAT_interdomain",
    "EVTCHNSTAT_unbound",
    "EventChannels",
    "EvtchnError",
    "Port",
]
