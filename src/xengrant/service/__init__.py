"""The emulated hypervisor as a service: domains as processes (in progress).

Sans-IO parts: :mod:`~xengrant.service.protocol` (framing),
:mod:`~xengrant.service.xenstore`, :mod:`~xengrant.service.evtchn`.
"""

from __future__ import annotations

from .evtchn import EventChannels, EvtchnError
from .xenstore import XenStore, XenStoreError

__all__ = ["EventChannels", "EvtchnError", "XenStore", "XenStoreError"]
