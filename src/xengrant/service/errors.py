"""Errors of a domain process's connection to the service."""

from __future__ import annotations

from ..errors import XenError


class ServiceError(XenError, ConnectionError):
    """The service closed the connection or answered something unreadable."""
