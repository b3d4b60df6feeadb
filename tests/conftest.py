"""Shared fixtures: an embedded Xen per test and a factory for its domains.

Keep this file small and additive: fixtures other test modules can build on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import xengrant


@pytest.fixture
def xen() -> Iterator[xengrant.EmbeddedXen]:
    """An emulated Xen with 64 MiB of machine memory, closed after the test."""
    x = xengrant.EmbeddedXen(memory=64 << 20)
    try:
        yield x
    finally:
        x.close()


@pytest.fixture
def make_domain(xen: xengrant.EmbeddedXen) -> Callable[..., xengrant.Domain]:
    """``make_domain(domid=None, pv=False, max_grant_frames=None, ...)``: a new guest.

    Keyword arguments are those of ``EmbeddedXen.create_domain``.
    """

    def make(domid: int | None = None, **kw: Any) -> xengrant.Domain:
        return xen.create_domain(domid, **kw)

    return make


@pytest.fixture
def pair(make_domain: Callable[..., xengrant.Domain]) -> tuple[xengrant.Domain, xengrant.Domain]:
    """Two HVM guests: ``(granter, mapper)``."""
    return make_domain(), make_domain()
