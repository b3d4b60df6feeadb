"""Event channels: the sans-IO core and the portable API on every backend.

- :mod:`xengrant.evtchn.core` -- Xen's rules (common/event_channel.c) over
  ints, shared by the service and :class:`~xengrant.EmbeddedXen`.
- :class:`Evtchn` -- the portable handle (libxenevtchn's calls), implemented
  by :class:`EmbeddedEvtchn` (in this process), the service's
  :class:`~xengrant.service.EventChannelClient` and real Xen's
  :class:`~xengrant.linux.LinuxEvtchn`.
- :class:`~xengrant.EventPort` -- one bound port as a context manager.
"""

from __future__ import annotations

from .core import EventChannels, EvtchnError
from .embedded import EmbeddedEvtchn, EvtchnHub
from .protocol import Evtchn

__all__ = ["EmbeddedEvtchn", "EventChannels", "Evtchn", "EvtchnError", "EvtchnHub"]
