"""A request/reply client over a domain's channel (the base of ``.xs`` and ``.evtchn``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .evtchn import EvtchnError
from .xenstore import XenStoreError

if TYPE_CHECKING:
    from .client import Channel


class ServiceCallClient:
    """A request/reply client over the domain's channel; errors raise ``error``."""

    error: type[XenStoreError] | type[EvtchnError]

    def __init__(self, channel: Channel, domid: int) -> None:
        self.channel = channel
        self.domid = domid

    def _call(self, mtype: int, payload: bytes) -> bytes:
        status, body = self.channel.call(mtype, payload)
        if status < 0:
            raise self.error(-status, body.decode("utf-8", "replace"))
        return body


_T = TypeVar("_T")


def or_timeout(item: _T | None, what: str, timeout: float | None) -> _T:
    """``item``, or TimeoutError if the wait for it gave up (``wait_for`` returned None)."""
    if item is None:
        raise TimeoutError(f"{what} within {timeout} s")
    return item
