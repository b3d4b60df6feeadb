"""Moved to :mod:`xengrant.xenstore.store`; this module re-exports it."""

from ..xenstore.store import *  # noqa: F403
